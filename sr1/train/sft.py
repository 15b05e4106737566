"""``sr1 sft``: a short supervised format warm-start on well-formed gold trajectories.

Models too small to follow the Search-R1 format (SmolLM2-135M never emits ``<search>``) give
RL no signal. This builds, for each training question, the trajectory a good policy would
write: ``<think>…</think><search> q </search>``, the *real* retrieved ``<information>`` block
(mask 0, exactly as the rollout loop inserts it), and ``<think>…</think><answer> gold
</answer>``. Queries are the row's gold queries (``metadata["gold_queries"]`` or
``metadata["queries"]``, as the synthetic world provides for two-hop questions), else the
question itself. Tokens are appended segment by segment with their mask bit, never
re-tokenised as a whole, so the SFT data has the token/mask layout RL will see. The loss is
the masked token-mean NLL over policy tokens only (the same :func:`agg_loss`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import signal
import time
from collections.abc import Sequence
from typing import Any

import torch

from sr1 import models
from sr1.algos import core
from sr1.config import ExperimentConfig, to_dict
from sr1.errors import Sr1Error
from sr1.progress import ProgressFactory
from sr1.progress import resolve as resolve_progress
from sr1.rollout.types import Trajectory
from sr1.train.batch import collate, length_order, response_forward
from sr1.train.checkpoint import save_checkpoint

# Every turn says where the plan stands, so each decision sits next to what it depends on:
# the first think states how many searches the question takes (its first token after <think>
# is the decision, conditioned on the question alone), and every think after a search opens
# with "Search i of n done." (search again while i < n, else answer). Measured on the CPU
# quickstart: without the plan a 32-update warm-start searched twice on 24% of single-hop and
# 27% of two-hop questions; with the plan but no count it planned two searches on 75 of 100
# two-hop questions and made them on 16.
PLAN_THINK = "<think> This takes {n}. </think>\n<search> {q} </search>"
NEXT_THINK = "<think> Search {i} of {n} done. {evidence} </think>\n<search> {q} </search>"
ANSWER = "<think> Search {i} of {n} done. {evidence} </think>\n<answer> {a} </answer>"
# rollout.max_turns=0 (no search allowed): the answer alone, nothing quoted from documents
DIRECT_ANSWER = "<think> This takes no search. </think>\n<answer> {a} </answer>"
NO_EVIDENCE = "The documents do not say it directly."
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_CLAUSE = re.compile(r"[,;]\s+")
_RELATIVE = re.compile(r"(where|which|who|whose|when)\b")


def gold_queries(row: dict[str, Any], max_turns: int) -> list[str]:
    """The searches a gold trajectory makes for ``row`` (at most ``max_turns``)."""
    meta = row.get("metadata") or {}
    qs = meta.get("gold_queries") or meta.get("queries") or [row["question"]]
    if isinstance(qs, str):
        qs = [qs]
    return [str(q).strip() for q in qs if str(q).strip()][:max_turns]


def evidence(passages: Sequence[Any], targets: Sequence[str]) -> tuple[str, str | None]:
    """The first clause of the retrieved ``passages`` that mentions one of ``targets``, and
    that target (case-insensitive); ``(NO_EVIDENCE, None)`` when none does.

    A clause is a comma-separated part of a sentence, extended by a following relative clause
    ("…settling in Rothaith, where he lives today."), so the quote keeps the words that say
    which relation the target is in while staying short: a policy turn that quotes it must fit
    in ``rollout.max_response_length``. Quoting it before answering shows a small model
    *where* the answer is (the synthetic world's bridge entity for a first hop, the gold answer
    for the last one).
    """
    for p in passages:
        for sent in _SENTENCE.split(p.text):
            parts = [c.strip() for c in _CLAUSE.split(sent.strip().rstrip(".!?"))]
            for i, part in enumerate(parts):
                low = part.lower()
                for t in targets:
                    if t and t.lower() in low:
                        if i + 1 < len(parts) and _RELATIVE.match(parts[i + 1]):
                            part = f"{part}, {parts[i + 1]}"
                        return part[:1].upper() + part[1:] + ".", t
    return NO_EVIDENCE, None


def gold_trajectory(
    row: dict[str, Any], tokenizer: Any, retriever: Any, cfg: ExperimentConfig
) -> Trajectory:
    """A well-formed trajectory for ``row`` with real retrieval (mask 0 on inserted blocks).

    Policy turns: ``<think> This takes N search(es). </think><search> q1 </search>``; after
    the i-th information block a think that opens ``Search i of N done.`` and quotes the
    retrieved clause holding the next step's key (``metadata["bridge"]`` before the next
    search, a gold answer before answering), then the next search or ``<answer> gold
    </answer>`` (with ``rollout.max_turns=0``, :data:`DIRECT_ANSWER`).
    ``metrics["gold_supported"]`` says whether every quoted key was in the
    retrieved passages (else the quote is :data:`NO_EVIDENCE` and the next query or the
    answer names something the documents did not show).
    """
    from sr1.envs.base import Action
    from sr1.envs.search import SearchEnv
    from sr1.rollout.loop import GEN, OBS, TrajectoryState, finalize

    enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    prompt_ids = enc(row["prompt"])[-cfg.rollout.max_prompt_length :]
    state = TrajectoryState(
        Trajectory(
            id=str(row["id"]),
            question=row["question"],
            golden_answers=list(row["golden_answers"]),
            data_source=row.get("data_source", ""),
            prompt=row["prompt"],
            prompt_ids=prompt_ids,
        )
    )
    env = SearchEnv(retriever, topk=cfg.rollout.topk)

    def say(text: str) -> None:  # a policy turn: mask 1 (gold text has no sampling log-probs)
        ids = enc(text)
        state.append(ids, GEN, [0.0] * len(ids))

    meta = row.get("metadata") or {}
    bridge = [str(meta["bridge"])] if meta.get("bridge") else []
    golds = [str(a) for a in row["golden_answers"]]
    queries = gold_queries(row, cfg.rollout.max_turns)
    n = len(queries)
    supported = True
    passages: list[Any] = []
    turn = ""
    for i, q in enumerate(queries):
        if i == 0:
            turn = PLAN_THINK.format(n=plural(n, "search"), q=q)
        else:
            sent, found = evidence(passages, bridge or golds)
            supported = supported and found is not None
            turn = NEXT_THINK.format(i=i, n=n, evidence=sent, q=q)
        say(turn)
        (obs,) = env.execute([Action("search", q)])
        passages = obs.info["passages"]
        state.append(env.observation_ids(tokenizer, obs, cfg.rollout.max_obs_length, turn), OBS)
        state.observe(env, obs)
    if n == 0:  # no search to quote from: nothing the documents must show
        final = enc(DIRECT_ANSWER.format(a=golds[0]))
    else:
        # longest gold first, so "Poste River" is preferred to "Poste" when the text has both
        sent, found = evidence(passages, sorted(golds, key=len, reverse=True))
        supported = supported and found is not None
        answer = found if found is not None else golds[0]
        if found is not None:  # the answer as the passage spells it
            k = sent.lower().index(found.lower())
            answer = sent[k : k + len(found)]
        final = enc(ANSWER.format(i=n, n=n, evidence=sent, a=answer))
    if tokenizer.eos_token_id is not None:
        final.append(int(tokenizer.eos_token_id))
    state.append(final, GEN, [0.0] * len(final))
    state.finish("answer")
    finalize(state, tokenizer, opts=cfg.scoring.options(), default_task=cfg.scoring.default_task)
    state.t.metrics["gold_supported"] = supported
    return state.t


def plural(n: int, word: str) -> str:
    """``1 search``, ``2 searches``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith(('s', 'ch')) else 's'}"


def gold_trajectories(
    rows: Sequence[dict[str, Any]], tokenizer: Any, retriever: Any, cfg: ExperimentConfig
) -> tuple[list[Trajectory], int]:
    """``trainer.sft_examples`` gold trajectories from ``rows`` in the seeded data order, and
    how many rows were passed over because their retrieval did not show a quoted key
    (``trainer.sft_supported_only``). At most ``trainer.sft_multi_search_share`` of them
    search more than once; further multi-search rows are passed over without retrieval."""
    from sr1.train.trainer import DataOrder

    t = cfg.trainer
    out: list[Trajectory] = []
    skipped = multi = 0
    share = t.sft_multi_search_share
    max_multi = t.sft_examples if share is None else math.floor(share * t.sft_examples)
    for i in DataOrder(len(rows), cfg.data.seed).take(len(rows)):
        if len(out) >= t.sft_examples:
            break
        many = len(gold_queries(rows[i], cfg.rollout.max_turns)) > 1
        if many and multi >= max_multi:
            continue  # decided before its retrieval is run
        x = gold_trajectory(rows[i], tokenizer, retriever, cfg)
        if t.sft_supported_only and not x.metrics["gold_supported"]:
            skipped += 1
            continue
        multi += many
        out.append(x)
    if not out:
        raise Sr1Error(
            f"none of the {len(rows)} training questions has a gold trajectory whose retrieval "
            "shows the answer",
            hint="check the index (sr1 search QUESTION --index NAME), or pass "
            "--set trainer.sft_supported_only=false",
        )
    return out, skipped


def sft(
    cfg: ExperimentConfig,
    model: str,
    index: str,
    dataset: str | None = None,
    max_steps: int | None = None,
    progress: ProgressFactory | None = None,
    rows: list[dict[str, Any]] | None = None,
    retriever: Any | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` on gold trajectories; returns ``{run_id, checkpoint, steps, ...}``.

    ``trainer.sft_examples`` questions (of ``dataset`` or ``data.train_datasets``), retrieved
    from ``index``, ``trainer.sft_epochs`` epochs at ``trainer.sft_lr``, mini-batches of
    ``trainer.sft_batch_size`` (None: ``trainer.mini_batch_size``) with micro-batches of
    ``trainer.micro_batch_size``; LoRA when ``trainer.lora_rank`` > 0 (merged in the
    checkpoint). ``rows``/``retriever`` replace the configured data and index (library use,
    tests). ``progress`` reports optimiser updates, labelled with the latest loss
    (:mod:`sr1.progress`; None or False: silent).
    """
    from transformers import AutoModelForCausalLM

    from sr1.retrieval import open_retriever
    from sr1.tracking.run import RunInterrupted, StopSignals, start_run
    from sr1.train import allocator
    from sr1.train.trainer import _load_train_rows

    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, name=model),
        retrieval=dataclasses.replace(cfg.retrieval, index=index),
    )
    if dataset is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_datasets=[dataset]))
    t = cfg.trainer
    base = models.resolve(model)
    dev = models.pick_device(cfg.model.device)
    models.mixed_precision_dtype(t.mixed_precision)  # an unknown mode fails before any work
    malloc_cache = allocator.apply(t.cpu_malloc_cache, dev)  # freed memory kept for reuse
    tok = models.load_tokenizer(base, cfg.model.revision)
    torch.manual_seed(t.seed)
    if rows is None:
        rows = _load_train_rows(cfg, tok)
    if retriever is None:
        retriever = open_retriever(index, cfg.retrieval)
    trajs, skipped = gold_trajectories(rows, tok, retriever, cfg)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = collate(trajs, pad)  # the same mask RL uses
    # trained weights: fp32 on CPU under model.dtype=auto (bf16 compute: trainer.mixed_precision)
    policy = AutoModelForCausalLM.from_pretrained(
        base, dtype=models.pick_dtype(cfg.model.dtype, dev, training=True)
    ).to(dev)
    if t.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(
            policy,
            LoraConfig(
                r=t.lora_rank,
                lora_alpha=t.lora_alpha,
                target_modules="all-linear",
                lora_dropout=0.0,
                task_type="CAUSAL_LM",
            ),
        )
    models.freeze_lower_layers(policy, t.freeze_layers)
    if t.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.sft_lr, weight_decay=t.weight_decay)
    bs = t.sft_batch_size or t.mini_batch_size
    n_updates = t.sft_epochs * -(-len(trajs) // bs)
    if max_steps is not None:
        n_updates = min(n_updates, max_steps)
    g = torch.Generator().manual_seed(t.seed)
    steps: list[dict[str, float]] = []
    with start_run(
        kind="sft",
        name=f"sft-{model}",
        config=to_dict(cfg),
        model=model,
        experiment=cfg.tracking.experiment,
        mlflow_uri=cfg.tracking.mlflow_uri,
    ) as run:
        run.log_params(
            {
                "base_model": base,
                "index": index,
                "n_examples": len(trajs),
                "n_unsupported_skipped": skipped,
                "batch_size": bs,
                "n_updates": n_updates,
                "searches_per_example": sum(x.num_searches for x in trajs) / max(1, len(trajs)),
                "masked_share": float(1 - batch.response_mask.sum() / batch.response_valid.sum()),
                "dtype": models.dtype_report(cfg.model.dtype, dev, training=True),
                "mixed_precision": t.mixed_precision,
                "mixed_precision_resolved": models.resolve_mixed_precision(t.mixed_precision, dev),
                "cpu_malloc_cache": malloc_cache,
            }
        )
        step = 0
        # SIGINT/SIGTERM: finish the update, save checkpoints/step-N, stop (twice: at once)
        with StopSignals() as stop, resolve_progress(progress)("sft", n_updates) as advance:
            while step < n_updates and not stop.set:
                perm = torch.randperm(len(trajs), generator=g)
                for s in range(0, len(trajs), bs):
                    if step >= n_updates or stop.set:
                        break
                    t0 = time.perf_counter()
                    # micro-batches of similar lengths (less padding); the sum is the same
                    idx = length_order(batch, perm[s : s + bs])
                    denom = core.agg_denominator(batch.response_mask[idx], "token-mean")
                    total = 0.0
                    for i in range(0, len(idx), t.micro_batch_size):
                        mb = batch.select(idx[i : i + t.micro_batch_size]).to(dev)
                        with models.autocast(t.mixed_precision, dev):
                            lp, _ = response_forward(
                                policy, mb, logits_chunk_mib=t.logits_chunk_mib
                            )
                        loss = core.agg_loss(-lp, mb.response_mask, "token-mean", denom)
                        loss.backward()
                        total += float(loss.detach())
                    gn = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    dt = time.perf_counter() - t0
                    ntok = float(batch.response_valid[idx].sum() + len(idx) * batch.prompt_len)
                    m = {"sft/loss": total, "sft/grad_norm": float(gn), "time/step_s": dt,
                         "perf/train_tokens_per_s": ntok / max(dt, 1e-9)}  # fmt: skip
                    run.log_metrics(step, m)
                    steps.append({"step": step, **m})
                    advance(1, description=f"sft loss {total:.3f}")
        interrupted = stop.set and step < n_updates
        name = f"step-{step}" if interrupted else "final"  # a partial model is never "final"
        with StopSignals():  # a signal now waits for the checkpoint (the work is done)
            out = save_checkpoint(run.dir / "checkpoints" / name, policy, tok, {"step": step})
        run.log_artifact(out, kind="checkpoint")
        result = {
            "run_id": run.run_id,
            "checkpoint": str(out),
            "steps": steps,
            "n_examples": len(trajs),
            "final_loss": steps[-1]["sft/loss"] if steps else None,
        }
        if interrupted:
            run.log_params({"interrupted_at_step": step})
            raise RunInterrupted(
                run_id=run.run_id,
                kind="sft",
                signum=stop.signum or signal.SIGTERM,
                step=step,
                checkpoint=str(out),
                result=result,
            )
        return result
