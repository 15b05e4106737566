"""`sr1 rollout` as a library call: load model, questions and retriever, roll out, write JSON lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sr1.config import ExperimentConfig
from sr1.errors import NotFoundError, Sr1Error
from sr1.io import iter_jsonl, write_jsonl_atomic
from sr1.progress import ProgressFactory
from sr1.rollout.types import Trajectory


def read_flashrag(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows ``{id, question, golden_answers, data_source}`` from a FlashRAG-format JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(
            f"data file not found: {p}",
            hint="give a FlashRAG-format JSONL file: one {id, question, golden_answers} per line",
        )
    rows = []
    for i, (lineno, r) in enumerate(iter_jsonl(p)):
        if limit is not None and i >= limit:
            break
        answers = r.get("golden_answers") if isinstance(r, dict) else None
        if not isinstance(r, dict) or "question" not in r or "golden_answers" not in r:
            raise Sr1Error(
                f"{p}:{lineno}: "
                + (
                    "lacks 'question' or 'golden_answers'"
                    if isinstance(r, dict)
                    else f"expected a JSON object, got {type(r).__name__}"
                ),
                hint="each line needs id, question and golden_answers (FlashRAG format)",
            )
        if isinstance(answers, str | int | float):
            answers = [answers]
        if not isinstance(answers, list):
            raise Sr1Error(
                f"{p}:{lineno}: 'golden_answers' must be a list of strings, "
                f"got {type(answers).__name__}"
            )
        rows.append(
            {
                "id": str(r.get("id", i)),
                "question": r["question"],
                "golden_answers": [str(a) for a in answers if a is not None],
                "data_source": r.get("data_source", p.stem),
            }
        )
    return rows


def load_rows(
    dataset: str | None,
    data_file: str | None,
    split: str,
    limit: int | None,
    tokenizer: Any,
    method: str = "search",
    template: str = "base",
) -> list[dict[str, Any]]:
    """Rows in the common schema (id, question, golden_answers, data_source, prompt), the
    prompt rendered for this tokenizer by ``sr1.data.prompts.render_prompt``."""
    if (dataset is None) == (data_file is None):
        raise Sr1Error(
            "give exactly one of --dataset or --data",
            hint="--dataset NAME for a prepared dataset, --data FILE for a FlashRAG JSONL file",
        )
    if dataset is not None:
        from sr1.data import prepare

        resolve = getattr(prepare, "resolve_eval_split", None)
        rows = prepare.load_split(
            dataset, resolve(dataset, split) if resolve else split, limit=limit
        )
    else:
        rows = read_flashrag(data_file, limit)  # type: ignore[arg-type]
    from sr1.data.prompts import render_prompt

    return [
        dict(
            r,
            prompt=render_prompt(
                r["question"], method=method, template=template, tokenizer=tokenizer
            ),
        )
        for r in rows
    ]


def rollout(
    cfg: ExperimentConfig,
    index: str,
    dataset: str | None = None,
    data_file: str | None = None,
    split: str = "test",
    limit: int | None = None,
    out: str | None = None,
    method: str = "search",
    template: str | None = None,
    greedy: bool = False,
    progress: ProgressFactory | None = None,
) -> dict[str, Any]:
    """Roll out ``cfg.model`` on the questions with the search loop.

    Returns ``{"out", "summary", "trajectories"}``; with ``out`` the trajectories are also
    written there as JSON lines (atomically). ``progress`` reports trajectories finished
    (:mod:`sr1.progress`; None or False: silent).
    """
    from sr1 import models
    from sr1.envs import make_env
    from sr1.retrieval import open_retriever
    from sr1.rollout.loop import run_rollouts
    from sr1.rollout.placement import open_engine

    tok = models.load_tokenizer(cfg.model.name, cfg.model.revision)
    rows = load_rows(dataset, data_file, split, limit, tok, method, template or cfg.data.template)
    retriever = open_retriever(index, cfg.retrieval) if cfg.rollout.env == "search" else None
    env = make_env(cfg.rollout.env, retriever=retriever, topk=cfg.rollout.topk)
    # in-process, in an engine process sr1 starts, or on a server (rollout.placement/engine_url)
    with open_engine(cfg, cfg.model.name, tok) as engine:
        trajs = run_rollouts(
            engine,
            env,
            rows,
            cfg.rollout,
            n_samples=cfg.rollout.n_samples,
            greedy=greedy,
            progress=progress,
            scoring=cfg.scoring.options(),
            default_task=cfg.scoring.default_task,
        )
    if out:
        write_jsonl_atomic(out, (t.to_dict() for t in trajs))
    return {"out": out, "summary": summarize(trajs), "trajectories": trajs}


def summarize(trajs: list[Trajectory]) -> dict[str, Any]:
    """Means over trajectories, the masked share of response tokens, and where time went."""
    n = max(len(trajs), 1)
    gen = sum(t.gen_time_s for t in trajs)
    ret = sum(t.retrieval_time_s for t in trajs)
    sampled = sum(sum(t.loss_mask) for t in trajs)
    total = sum(len(t.response_ids) for t in trajs)
    reasons: dict[str, int] = {}
    for t in trajs:
        reasons[t.finish_reason] = reasons.get(t.finish_reason, 0) + 1
    return {
        "n": len(trajs),
        "em": sum(float(t.metrics.get("em", 0.0)) for t in trajs) / n,
        "f1": sum(float(t.metrics.get("f1", 0.0)) for t in trajs) / n,
        "reward": sum(t.reward for t in trajs) / n,
        "answered": sum(t.answer is not None for t in trajs) / n,
        "well_formed": sum(float(t.metrics.get("well_formed", 0.0)) for t in trajs) / n,
        "answer_in_docs": sum(float(t.metrics.get("answer_in_docs") or 0.0) for t in trajs) / n,
        "searches_per_traj": sum(t.num_searches for t in trajs) / n,
        "response_tokens_mean": total / n,
        "masked_share": (total - sampled) / max(total, 1),
        "finish_reasons": dict(sorted(reasons.items())),
        "gen_s": gen,
        "retrieval_s": ret,
        "retrieval_share": ret / (gen + ret) if gen + ret > 0 else 0.0,
        "sampled_tokens_per_s": sampled / gen if gen > 0 else 0.0,
    }
