"""Run one evaluation: datasets x method on a model or a training run's checkpoint, resumably.

Per-example rows are written to DuckDB after every batch, so an interrupted eval loses at
most one batch. Resuming: ``resume=RUN_ID`` reopens that eval run with its saved request and
config and skips the examples already stored. Without ``resume``, re-running the *identical*
request (same datasets, model, method, index, split, limit, engine and resolved config) picks
up the most recent such eval run that did not finish (failed, interrupted, or killed while
running); ``fresh=True`` (``sr1 eval --fresh``) always starts a new run.

Every dataset's summary is recomputed from the stored rows and saved with the full setup
that makes numbers comparable (index manifest, retriever, top-k, template, model
fingerprint, sampling, seed, split, limit, a hash of the evaluated example ids).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sr1 import paths
from sr1.config import ExperimentConfig, RolloutConfig, resolve_config, to_dict
from sr1.errors import NotFoundError, Sr1Error
from sr1.eval.checkpoints import resolve_run_checkpoint
from sr1.eval.methods import EvalMethod, get_method
from sr1.eval.metrics import macro_average, order_datasets, summarize
from sr1.io import write_json_atomic
from sr1.progress import ProgressFactory
from sr1.progress import resolve as resolve_progress
from sr1.tasks.qa import fallback_answer  # noqa: F401  (re-exported for callers)
from sr1.tracking.run import start_run
from sr1.tracking.store import Store

BatchHook = Callable[[str, int], None]


@dataclasses.dataclass(frozen=True)
class EvalRequest:
    """What was asked for; saved with the run so ``--resume`` can redo exactly this."""

    datasets: list[str]
    model: str | None
    run: str | None
    method: str
    index: str | None
    source_dir: str | None
    split: str
    limit: int | None
    engine: str


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _apply_args(
    cfg: ExperimentConfig,
    *,
    model: str | None,
    method: str | None,
    index: str | None,
    source_dir: str | None,
    split: str | None,
    limit: int | None,
    engine: str | None,
) -> ExperimentConfig:
    """Explicit arguments override the config (the config keeps the resolved values)."""
    r = dataclasses.replace
    if model is not None:
        cfg = r(cfg, model=r(cfg.model, name=model))
    ev = {k: v for k, v in dict(method=method, split=split, limit=limit).items() if v is not None}
    cfg = r(cfg, eval=r(cfg.eval, **ev))
    if index is not None:
        cfg = r(cfg, retrieval=r(cfg.retrieval, index=index))
    if source_dir is not None:
        cfg = r(cfg, data=r(cfg.data, source_dir=str(Path(source_dir).expanduser().resolve())))
    if engine is not None:
        cfg = r(cfg, rollout=r(cfg.rollout, engine=engine))
    return cfg


def eval_rollout_config(cfg: ExperimentConfig, method: EvalMethod) -> RolloutConfig:
    """The rollout settings an eval uses: eval's budget, batch, seed and temperature; one turn
    (max_turns=0) unless the method is the search loop."""
    return dataclasses.replace(
        cfg.rollout,
        max_turns=cfg.rollout.max_turns if method.search_loop else 0,
        max_response_length=cfg.eval.max_new_tokens,
        temperature=cfg.eval.temperature if cfg.eval.temperature > 0 else 1.0,
        n_samples=1,
        batch_size=cfg.eval.batch_size,
        seed=cfg.eval.seed,
    )


def _load_rows(dataset: str, split: str, source_dir: str | None, limit: int | None) -> list[dict]:
    from sr1.data.prepare import load_split

    try:
        return load_split(dataset, split, source_dir=source_dir, limit=limit)
    except FileNotFoundError as e:  # the data module normally raises NotFoundError with a hint
        raise NotFoundError(
            f"dataset {dataset!r} split {split!r} is not prepared ({e.filename or e})",
            hint=f"run `sr1 data prepare {dataset} --source-dir DIR` "
            "(DIR holds <dataset>/<split>.jsonl in FlashRAG format), or pass --source-dir",
        ) from None


def _resolve_split(dataset: str, requested: str, source_dir: str | None = None) -> str:
    from sr1.data.prepare import resolve_eval_split

    return resolve_eval_split(dataset, requested, source_dir)


def _find_unfinished(store: Store, request_hash: str) -> str | None:
    """The latest eval run with this request hash that did not finish, if any."""
    cands = [
        r["run_id"]
        for r in store.list_runs("eval")
        if r["params"].get("request_hash") == request_hash and r["status"] != "finished"
    ]
    return cands[-1] if cands else None


def _example_row(
    dataset: str,
    split: str,
    row: dict,
    traj: Any,
    method: EvalMethod,
    passages: Sequence[Any] | None,
    seconds: float,
    m: dict[str, Any],
) -> dict[str, Any]:
    """One stored eval row: the task scorer's metrics ``m`` (``score_trajectory``, the same
    call training rewards use) plus what search behaviour tables need."""
    golden = list(row["golden_answers"])
    s = m
    answer_source = m.get("answer_source", "tag" if m.get("answer") is not None else "none")
    if method.retrieve_question:
        in_docs: float | None = m.get("answer_in_docs")
        retrieved = [[p.id for p in passages or []]]
    elif method.search_loop:
        # a search-loop answer that retrieved nothing had no gold in its docs
        in_docs = m.get("answer_in_docs")
        in_docs = 0.0 if in_docs is None else in_docs
        retrieved = list(traj.retrieved_ids or [])
    else:
        in_docs, retrieved = None, []
    mask = list(traj.loss_mask or [])
    meta = row.get("metadata") or {}
    return {
        "dataset": dataset,
        "example_id": str(row["id"]),
        "question": row["question"],
        "golden_answers": golden,
        "prediction": s["answer"],
        "em": s["em"],
        "cover_em": s["cover_em"],
        "f1": s["f1"],
        "answer_in_docs": None if in_docs is None else float(in_docs),
        "well_formed": s["well_formed"],
        "num_searches": int(traj.num_searches or 0),
        "response_tokens": len(traj.response_ids or []),
        "response": traj.text,
        # extra (stored in extra_json)
        "generated_tokens": sum(mask) if mask else len(traj.response_ids or []),
        "finish_reason": traj.finish_reason,
        "answer_source": answer_source,
        "queries": list(traj.queries or []),
        "retrieved_ids": retrieved,
        "seconds": seconds,
        "split": split,
        "hops": meta.get("hops") if isinstance(meta, dict) else None,
    }


class _Evaluator:
    """Holds the loaded engine and retriever; evaluates one batch of rows at a time."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        method: EvalMethod,
        model_path: str,
        retriever: Any,
        tokenizer_path: str | None = None,
        engines: contextlib.ExitStack | None = None,
        log_dir: Path | None = None,
    ) -> None:
        from sr1.models import load_tokenizer
        from sr1.rollout.placement import open_engine

        self.cfg, self.method, self.retriever = cfg, method, retriever
        self.rcfg = eval_rollout_config(cfg, method)
        self.greedy = cfg.eval.temperature <= 0
        self.opts = cfg.scoring.options(cfg.eval.answer_fallback)  # refuses unknown fallbacks
        self.tokenizer = load_tokenizer(tokenizer_path or model_path, revision=cfg.model.revision)
        self.opts = dataclasses.replace(
            self.opts,
            special_tokens=tuple(getattr(self.tokenizer, "all_special_tokens", []) or []),
        )
        # in-process, an engine process sr1 starts, or a server (rollout.placement/engine_url);
        # closed (a started process stopped) with ``engines``
        opened = open_engine(
            cfg,
            model_path,
            self.tokenizer,
            rollout=self.rcfg,
            device=cfg.model.device,
            dtype=cfg.model.dtype,
            log_dir=log_dir,
        )
        self.engine = (engines or contextlib.ExitStack()).enter_context(opened)

    def run_batch(self, dataset: str, split: str, rows: list[dict]) -> list[dict[str, Any]]:
        from sr1.data.prompts import render_prompt
        from sr1.envs import make_env
        from sr1.retrieval.base import format_passages
        from sr1.rollout.loop import run_rollouts, score_trajectory

        t0 = time.perf_counter()
        passages: list[list[Any]] | None = None
        if self.method.retrieve_question:
            passages = self.retriever.search(
                [r["question"] for r in rows], k=self.cfg.retrieval.topk
            )
        prompted = [
            {
                **r,
                "prompt": render_prompt(
                    r["question"],
                    self.cfg.data.search_prompt
                    if self.method.prompt == "search"
                    else self.method.prompt,
                    self.cfg.data.template,
                    tokenizer=self.tokenizer,
                    passages=passages[i] if passages is not None else None,
                ),
            }
            for i, r in enumerate(rows)
        ]
        env = None
        if self.method.search_loop:
            env = make_env(self.cfg.rollout.env, retriever=self.retriever, topk=self.rcfg.topk)
        trajs = run_rollouts(
            self.engine,
            env,
            prompted,
            self.rcfg,
            n_samples=1,
            greedy=self.greedy,
            progress=False,
            scoring=self.opts,
            default_task=self.cfg.scoring.default_task,
        )
        if len(trajs) != len(rows):
            raise Sr1Error(f"rollout returned {len(trajs)} trajectories for {len(rows)} prompts")
        by_id = {str(t.id): t for t in trajs}
        if len(by_id) != len(rows) or any(str(r["id"]) not in by_id for r in rows):
            by_id = {str(r["id"]): t for r, t in zip(rows, trajs, strict=True)}
        per_q = (time.perf_counter() - t0) / max(len(rows), 1)
        out = []
        for i, r in enumerate(rows):
            t = by_id[str(r["id"])]
            shown = passages[i] if passages is not None else None
            # rag's passages are in the prompt, not the response: score against them
            docs = [format_passages(shown)] if shown is not None else None
            m = score_trajectory(t, self.tokenizer, self.opts, self.cfg.scoring.default_task, docs)
            out.append(_example_row(dataset, split, r, t, self.method, shown, per_q, m))
        return out


def _setup(
    cfg: ExperimentConfig,
    req: EvalRequest,
    split: str,
    fingerprint: dict,
    retriever_desc: dict | None,
    ids: Sequence[str],
) -> dict[str, Any]:
    """Everything that must match for two numbers to be comparable."""
    method = get_method(req.method)
    rc = eval_rollout_config(cfg, method)
    return {
        "method": req.method,
        "model": fingerprint,
        "from_run": req.run,
        "engine": cfg.rollout.engine,
        "split_requested": req.split,
        "split": split,
        "limit": req.limit,
        "source_dir": cfg.data.source_dir,
        "template": cfg.data.template,
        "retriever": retriever_desc,
        "index": cfg.retrieval.index if method.needs_retriever else None,
        # rag retrieves with retrieval.topk; the search loop inserts rollout.topk passages
        "topk": (cfg.retrieval.topk if method.retrieve_question else rc.topk)
        if method.needs_retriever
        else None,
        "sampling": {
            "greedy": cfg.eval.temperature <= 0,
            "temperature": cfg.eval.temperature,
            "top_p": rc.top_p,
            "max_new_tokens": rc.max_response_length,
            "max_turns": rc.max_turns,
            "max_obs_length": rc.max_obs_length,
            "max_total_response_length": rc.max_total_response_length,
            "max_prompt_length": rc.max_prompt_length,
        },
        "seed": cfg.eval.seed,
        "answer_fallback": cfg.eval.answer_fallback,
        "rollout": dataclasses.asdict(rc),  # every loop setting (force-answer, budgets, ...)
        "n_examples": len(ids),
        "examples_hash": _hash(sorted(ids)),
    }


def evaluate(
    datasets: list[str] | None = None,
    model: str | None = None,
    run: str | None = None,
    method: str | None = None,
    index: str | None = None,
    source_dir: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    engine: str | None = None,
    cfg: ExperimentConfig | None = None,
    progress: ProgressFactory | None = None,
    run_name: str | None = None,
    resume: str | None = None,
    fresh: bool = False,
    on_batch: BatchHook | None = None,
) -> dict[str, Any]:
    """Evaluate ``datasets`` with ``method`` on ``model`` (alias/path) or ``run`` (its checkpoint).

    Arguments left as None come from ``cfg`` (``eval.method``, ``eval.split``, ``eval.limit``,
    ``rollout.engine``, ``retrieval.index``, ``data.source_dir``; ``datasets=None`` means
    ``data.eval_datasets``). ``resume=RUN_ID`` continues that eval run with its saved request;
    ``fresh`` disables the automatic resume of an identical unfinished run. ``on_batch(dataset,
    n_stored)`` is called after every batch is stored (tests use it to simulate a crash).
    ``progress`` reports examples evaluated (:mod:`sr1.progress`; None or False: silent).

    Returns a JSON-able summary: ``run_id``, ``method``, ``model``, ``datasets`` (per-dataset
    metrics from :func:`sr1.eval.metrics.summarize`), ``avg``, ``setup`` (per dataset),
    ``resumed`` and ``evaluated_now`` (examples generated by this call).
    """
    store = Store()
    if resume:
        prior = store.get_run(resume)
        if prior["kind"] != "eval" or "request" not in prior["params"]:
            raise Sr1Error(
                f"run {resume!r} is a {prior['kind']} run, not an eval run; --resume takes an eval run id",
                hint="list eval runs with `sr1 runs list --kind eval`",
            )
        req = EvalRequest(**prior["params"]["request"])
        cfg = resolve_config(**prior["config"])
    else:
        cfg = cfg or ExperimentConfig()
        if model is None and run is None:
            raise Sr1Error("nothing to evaluate", hint="pass --model NAME or --run RUN_ID")
        if model is not None and run is not None:
            raise Sr1Error("pass either --model or --run, not both")
        cfg = _apply_args(
            cfg,
            model=model,
            method=method,
            index=index,
            source_dir=source_dir,
            split=split,
            limit=limit,
            engine=engine,
        )
        names = list(datasets) if datasets else list(cfg.data.eval_datasets)
        if not names:
            raise Sr1Error("no datasets to evaluate", hint="pass --dataset D or --all-datasets")
        req = EvalRequest(
            datasets=list(dict.fromkeys(names)),
            model=model,
            run=run,
            method=cfg.eval.method,
            index=cfg.retrieval.index if get_method(cfg.eval.method).needs_retriever else None,
            source_dir=cfg.data.source_dir,
            split=cfg.eval.split,
            limit=cfg.eval.limit,
            engine=cfg.rollout.engine,
        )
    meth = get_method(req.method)

    # Resolve the weights first: unknown run ids / models fail before anything is loaded.
    from sr1.models import model_fingerprint

    tokenizer_path: str | None = None
    if req.run:
        ckpt, train_run = resolve_run_checkpoint(req.run, store)
        model_path = str(ckpt)
        model_label = f"{req.run}/{ckpt.relative_to(paths.runs_dir() / req.run)}"
        if not (ckpt / "tokenizer_config.json").is_file():  # weights-only save: base tokenizer
            base = train_run.get("model") or train_run["config"].get("model", {}).get("name")
            if not base:
                raise Sr1Error(
                    f"checkpoint {ckpt} has no tokenizer and run {req.run} records no base model"
                )
            tokenizer_path = str(base)
    else:
        from sr1.models import resolve

        model_path = resolve(str(req.model))
        model_label = str(req.model)
    fingerprint = {**model_fingerprint(model_path), "label": model_label}
    if cfg.model.revision:
        fingerprint["revision"] = cfg.model.revision

    # Load every dataset before the model: a missing or unknown dataset fails fast.
    data: dict[str, tuple[str, list[dict]]] = {}
    for d in req.datasets:
        sp = _resolve_split(d, req.split, req.source_dir)
        data[d] = (sp, _load_rows(d, sp, req.source_dir, req.limit))

    request_hash = _hash({"request": dataclasses.asdict(req), "config": to_dict(cfg)})
    resume_id = resume or (None if fresh else _find_unfinished(store, request_hash))

    retriever = None
    retriever_desc = None
    if meth.needs_retriever:
        from sr1.retrieval import open_retriever

        retriever = open_retriever(cfg.retrieval.index, cfg.retrieval)
        retriever_desc = retriever.describe()

    evaluator: _Evaluator | None = None
    per_dataset: dict[str, dict[str, Any]] = {}
    setups: dict[str, dict[str, Any]] = {}
    evaluated_now = 0
    with (
        start_run(
            "eval",
            name=run_name,
            config=to_dict(cfg),
            params={"request": dataclasses.asdict(req), "request_hash": request_hash},
            model=model_label,
            parent_run=req.run,
            resume=resume_id,
            experiment=cfg.tracking.experiment,
            mlflow_uri=cfg.tracking.mlflow_uri,
        ) as ctx,
        contextlib.ExitStack() as engines,
    ):
        from sr1.rollout.placement import engine_dtype_report, engine_openmp_report

        # what model.dtype=auto ran as, and the engine's OpenMP runtime
        ctx.log_params({"dtype": engine_dtype_report(cfg), "openmp": engine_openmp_report(cfg)})
        todo_by_ds = {}
        for d, (_, rows) in data.items():
            done = store.done_example_ids(ctx.run_id, d)
            todo_by_ds[d] = [r for r in rows if str(r["id"]) not in done]
        total = sum(len(v) for v in todo_by_ds.values())
        with resolve_progress(progress)(f"eval {meth.name}", total) as advance:
            for d, (sp, rows) in data.items():
                todo = todo_by_ds[d]
                stored = len(rows) - len(todo)
                bs = max(int(cfg.eval.batch_size), 1)
                for i in range(0, len(todo), bs):
                    if evaluator is None:
                        evaluator = _Evaluator(
                            cfg, meth, model_path, retriever, tokenizer_path, engines, ctx.dir
                        )
                    advance(0, description=f"eval {meth.name} {d}")
                    out = evaluator.run_batch(d, sp, todo[i : i + bs])
                    store.add_eval_results(ctx.run_id, out)
                    stored += len(out)
                    evaluated_now += len(out)
                    advance(len(out))
                    if on_batch is not None:
                        on_batch(d, stored)
                stored_rows = store.eval_results([ctx.run_id], d)
                m = summarize(stored_rows)
                setup = _setup(
                    cfg, req, sp, fingerprint, retriever_desc, [str(r["id"]) for r in rows]
                )
                store.add_eval_summary(
                    ctx.run_id, d, m, setup, method=meth.name, model=model_label, n=m["n"]
                )
                per_dataset[d], setups[d] = m, setup
                ctx.log_metrics(
                    0, {f"{d}/{k}": v for k, v in m.items() if isinstance(v, int | float)}
                )
        avg = macro_average(per_dataset)
        ctx.log_metrics(0, {f"avg/{k}": v for k, v in avg.items() if isinstance(v, int | float)})
        summary = {
            "run_id": ctx.run_id,
            "method": meth.name,
            "model": model_label,
            "datasets": {d: per_dataset[d] for d in order_datasets(per_dataset)},
            "avg": avg,
            "setup": setups,
            "resumed": resume_id is not None,
            "evaluated_now": evaluated_now,
        }
        out_path = ctx.dir / "eval_summary.json"
        write_json_atomic(out_path, summary)
        ctx.log_artifact(out_path, kind="eval_summary")
    return summary
