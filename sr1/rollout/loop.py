"""The batched multi-turn Search-R1 rollout, building ids and the loss mask together.

Per turn, every active trajectory generates until ``</search>``, ``</answer>`` or EOS. All
queries of the turn go to the retriever in one batched call; each searching trajectory gets
``\\n\\n<information>Doc 1(Title: …) …</information>\\n\\n`` appended, an invalid turn gets
the paper's notice. Tokens the engine sampled are appended with mask 1 and their log-probs;
inserted tokens with mask 0 and log-prob 0. Nothing is ever re-tokenised: ``response_ids``
is exactly the sequence the model saw, and ``text`` is its decode.

Turns: ``max_turns`` turns may search; then one final turn runs in which a search is not
executed (Search-R1's final rollout), so at most ``max_turns`` searches happen. A turn that
hits ``max_response_length`` without a tag is invalid (notice). The whole response is capped
at ``max_total_response_length`` tokens and the context at the model's limit.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from sr1.config import RolloutConfig
from sr1.retrieval.base import Passage, Retriever, format_passages
from sr1.rollout.types import Trajectory
from sr1.scoring import answer_in_text, extract_answer, score

INVALID_NOTICE = (
    "\nMy previous action is invalid. If I want to search, I should put the query between "
    "<search> and </search>. If I want to give the final answer, I should put the answer "
    "between <answer> and </answer>. Let me try again.\n"
)
STOPS = ["</search>", "</answer>"]
_SEARCH_RE = re.compile(r"<search>(.*?)</search>", re.DOTALL)


def parse_query(turn_text: str) -> str | None:
    """The query of the last complete ``<search>…</search>`` in this turn's text (stripped)."""
    found = _SEARCH_RE.findall(turn_text)
    if not found:
        return None
    q = found[-1].strip()
    return q or None


class _State:
    """A trajectory under construction; ``append`` is the only way tokens get in."""

    def __init__(self, traj: Trajectory) -> None:
        self.t = traj
        self.done = False
        self.passages: list[Passage] = []

    def append(
        self, ids: Sequence[int], sampled: bool, logprobs: Sequence[float] | None = None
    ) -> None:
        self.t.response_ids.extend(int(i) for i in ids)
        self.t.loss_mask.extend([1 if sampled else 0] * len(ids))
        if sampled:
            assert logprobs is not None and len(logprobs) == len(ids)
            self.t.logprobs.extend(float(x) for x in logprobs)
        else:
            self.t.logprobs.extend([0.0] * len(ids))

    def context(self) -> list[int]:
        return self.t.prompt_ids + self.t.response_ids


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def observation_ids(
    tokenizer: Any, passages: Sequence[Passage], max_obs_length: int, after: str
) -> list[int]:
    """Token ids of the information block; the passages are cut to ``max_obs_length`` tokens
    while the opening and closing tags are always kept."""
    lead = "<information>" if after.endswith("\n\n") else "\n\n<information>"
    body = _encode(tokenizer, format_passages(passages))[:max_obs_length]
    return _encode(tokenizer, lead) + body + _encode(tokenizer, "</information>\n\n")


def run_rollouts(
    engine: Any,
    retriever: Retriever | None,
    rows: Sequence[dict[str, Any]],
    cfg: RolloutConfig,
    n_samples: int = 1,
    greedy: bool = False,
    reward_fn: Callable[[Trajectory], float] | None = None,
    progress: bool = True,
    seed: int | None = None,
) -> list[Trajectory]:
    """Roll out ``n_samples`` trajectories per row (rows: id, question, golden_answers,
    data_source, prompt). Returns them grouped by row (``Trajectory.group`` = row index)."""
    tok = engine.tokenizer
    states: list[_State] = []
    prompt_cache: dict[int, list[int]] = {}
    for gi, row in enumerate(rows):
        pids = prompt_cache.setdefault(gi, _encode(tok, row["prompt"])[-cfg.max_prompt_length :])
        for _ in range(n_samples):
            states.append(
                _State(
                    Trajectory(
                        id=str(row["id"]),
                        question=row["question"],
                        golden_answers=list(row["golden_answers"]),
                        data_source=row.get("data_source", ""),
                        prompt=row["prompt"],
                        prompt_ids=list(pids),
                        group=gi,
                    )
                )
            )
    bs = max(1, cfg.batch_size * max(1, n_samples))
    temperature = 0.0 if greedy else cfg.temperature
    base_seed = cfg.seed if seed is None else seed
    bar = None
    if progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        from sr1.cli.common import err_console

        bar = Progress(
            TextColumn("rollout"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        )
        bar.start()
        task = bar.add_task("rollout", total=len(states))
    try:
        for start in range(0, len(states), bs):
            chunk = states[start : start + bs]
            _rollout_chunk(engine, retriever, chunk, cfg, temperature, base_seed + start)
            for s in chunk:
                _finalize(s, tok, reward_fn)
            if bar is not None:
                bar.update(task, advance=len(chunk))
    finally:
        if bar is not None:
            bar.stop()
    return [s.t for s in states]


def _insert(s: _State, ids: list[int], cfg: RolloutConfig, max_context: int) -> None:
    """Append environment tokens (mask 0), cut at the response/context budget (then finished)."""
    room = min(
        cfg.max_total_response_length - len(s.t.response_ids), max_context - len(s.context())
    )
    if len(ids) > room:
        s.append(ids[: max(room, 0)], sampled=False)
        s.done, s.t.finish_reason = True, "length"
    else:
        s.append(ids, sampled=False)


def _rollout_chunk(
    engine: Any,
    retriever: Retriever | None,
    chunk: list[_State],
    cfg: RolloutConfig,
    temperature: float,
    seed: int,
) -> None:
    tok = engine.tokenizer
    can_search = retriever is not None and cfg.max_turns > 0
    n_turns = (cfg.max_turns if can_search else 0) + 1
    for turn in range(n_turns):
        final = turn == n_turns - 1
        active = [s for s in chunk if not s.done]
        if not active:
            break
        budgets = [
            min(
                cfg.max_response_length,
                cfg.max_total_response_length - len(s.t.response_ids),
                engine.max_context - len(s.context()),
            )
            for s in active
        ]
        for s, b in zip(active, budgets, strict=True):
            if b <= 0:
                s.done, s.t.finish_reason = (
                    True,
                    "length"
                    if len(s.t.response_ids) >= cfg.max_total_response_length
                    else "context",
                )
        active = [s for s, b in zip(active, budgets, strict=True) if b > 0]
        if not active:
            break
        t0 = time.perf_counter()
        outs = engine.generate(
            [s.context() for s in active],
            max_new_tokens=max(b for b in budgets if b > 0),
            stop=STOPS,
            temperature=temperature,
            top_p=cfg.top_p,
            seed=seed + turn,
        )
        dt = time.perf_counter() - t0
        searches: list[tuple[_State, str]] = []
        for s, o in zip(active, outs, strict=True):
            budget = min(
                cfg.max_response_length,
                cfg.max_total_response_length - len(s.t.response_ids),
                engine.max_context - len(s.context()),
            )
            ids, lps, fr = o.token_ids, o.logprobs, o.finish_reason
            if len(ids) > budget:  # a batch-wide max: hold each row to its own budget
                ids, lps, fr = ids[:budget], lps[:budget], "length"
            s.t.gen_time_s += dt / len(active)
            s.append(ids, sampled=True, logprobs=lps)
            turn_text = tok.decode(ids, skip_special_tokens=False)
            stop_str = o.stop_str if fr == "stop" else None
            if fr == "eos":
                s.done, s.t.finish_reason = (
                    True,
                    "answer" if extract_answer(turn_text) is not None else "eos",
                )
            elif stop_str == "</answer>":
                s.done, s.t.finish_reason = True, "answer"
            elif final:
                s.done = True
                s.t.finish_reason = "max_turns" if stop_str == "</search>" else "length"
            elif stop_str == "</search>" and (q := parse_query(turn_text)) is not None:
                searches.append((s, q))
            elif len(s.t.response_ids) >= cfg.max_total_response_length:
                s.done, s.t.finish_reason = True, "length"
            else:  # no valid action this turn: the paper's notice (inserted, mask 0)
                _insert(s, _encode(tok, INVALID_NOTICE), cfg, engine.max_context)
        if searches:
            t0 = time.perf_counter()
            results = retriever.search([q for _, q in searches], k=cfg.topk)  # one batched call
            rdt = time.perf_counter() - t0
            for (s, q), ps in zip(searches, results, strict=True):
                s.t.retrieval_time_s += rdt / len(searches)
                s.t.num_searches += 1
                s.t.queries.append(q)
                s.t.retrieved_ids.append([p.id for p in ps])
                s.passages.extend(ps)
                after = tok.decode(s.t.response_ids[-4:], skip_special_tokens=False)
                _insert(
                    s, observation_ids(tok, ps, cfg.max_obs_length, after), cfg, engine.max_context
                )
    for s in chunk:
        if not s.done:
            s.done = True
            s.t.finish_reason = s.t.finish_reason or "max_turns"


def policy_text(t: Trajectory, tok: Any) -> str:
    """The decoded sampled spans (mask 1) of a response, inserted spans left out."""
    parts, cur = [], []
    for i, m in zip(t.response_ids, t.loss_mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            parts.append(cur)
            cur = []
    if cur:
        parts.append(cur)
    return "\n".join(tok.decode(p, skip_special_tokens=False) for p in parts)


def _finalize(s: _State, tok: Any, reward_fn: Callable[[Trajectory], float] | None) -> None:
    t = s.t
    t.text = tok.decode(t.response_ids, skip_special_tokens=False)
    # Score only what the policy wrote: the invalid-action notice itself contains
    # "<answer> and </answer>", which must never count as the model's answer.
    m = score(policy_text(t, tok), t.golden_answers)
    t.answer = m.pop("answer")  # type: ignore[assignment]
    docs = "\n".join(p.contents for p in s.passages)
    m["answer_in_docs"] = answer_in_text(docs, t.golden_answers) if s.passages else 0.0
    t.metrics = m
    t.reward = float(reward_fn(t)) if reward_fn is not None else float(m["em"])
