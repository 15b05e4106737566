"""``sr1 quickstart``: the embedded default end to end, as ordinary runs, resumable by stage.

Stages, in order (each one a normal run in MLflow and DuckDB that the other commands can use):

``fetch`` the model → ``synth`` world → BM25 ``index`` → ``eval-<m>`` of the untrained model
for each of ``quickstart.baselines`` → ``sft`` warm-start → ``eval-sft`` (search) →
``eval-sft-rag`` (the same checkpoint, retrieve once: the paper's RAG comparison on one model) →
``train`` (``quickstart.algo`` from the SFT checkpoint) → ``eval-rl`` (search) → the report.
With ``ablations=True`` (``sr1 quickstart --ablations``) two more follow: ``train-nomask``
(the identical recipe with ``algorithm.use_mask=false``: retrieved tokens are trained on) and
``eval-rl-nomask`` (search), reported beside the masked row. An interrupted ``train`` or
``train-nomask`` (Ctrl-C, SIGTERM) is resumed from its last checkpoint on the next call.

The result's ``paired`` compares the RL row with the SFT row (both search) question by
question: delta EM, its paired-bootstrap 95% CI, the sign-flip permutation p-value
(:func:`sr1.report.stats.paired_test`), and the questions gained and lost.

Stages that would each start an engine process (``rollout.placement=process``, the default
config's) share one (:func:`sr1.rollout.placement.shared_engines`): every evaluation loads its
checkpoint into it and RL pushes its weights, so the quickstart pays one engine start-up.

What each finished stage produced (run id, checkpoint) is kept in
``$SR1_HOME/quickstart/<config hash>/state.json``, written atomically after every stage, so
re-running with the same config skips finished stages and an interrupted quickstart continues
where it stopped; a changed config gets its own state (nothing stale is reused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sr1 import paths
from sr1.config import ExperimentConfig, to_dict
from sr1.io import write_json_atomic
from sr1.progress import ProgressFactory
from sr1.progress import resolve as resolve_progress
from sr1.tracking.mlflow_log import tracking_uri

# (stage, what it does) in execution order; eval-<baseline> stages are inserted after index.
FIXED_HEAD = [
    ("fetch", "fetch the model"),
    ("synth", "build the synthetic world"),
    ("index", "build the BM25 index"),
]
FIXED_TAIL = [
    ("sft", "SFT warm-start on gold search trajectories"),
    ("eval-sft", "evaluate the SFT model with search"),
    ("eval-sft-rag", "evaluate the SFT model with rag (retrieve once)"),
    ("train", "RL from the SFT checkpoint"),
    ("eval-rl", "evaluate the RL model with search"),
]
# --ablations: the same RL recipe with retrieved tokens in the loss (the paper's mask ablation)
ABLATION_TAIL = [
    ("train-nomask", "RL from the SFT checkpoint, retrieved tokens not masked (ablation)"),
    ("eval-rl-nomask", "evaluate the unmasked-RL model with search"),
]
TRAIN_STAGES = ("train", "train-nomask")  # resumed from their checkpoint when interrupted
# eval stage -> (row model, row ablation); eval-<baseline> stages are the untrained model
STAGE_ROWS: dict[str, tuple[str, str | None]] = {
    "eval-sft": ("sft", None),
    "eval-sft-rag": ("sft", None),
    "eval-rl": ("sft+rl", None),
    "eval-rl-nomask": ("sft+rl", "no_mask"),
}
# the paired comparisons reported: name -> (stage A, stage B), B - A
PAIRED = {"paired": ("eval-sft", "eval-rl"), "paired_no_mask": ("eval-rl", "eval-rl-nomask")}

Notify = Callable[[str, str, str], None]  # (stage, event: start|skip|done, detail)


def config_hash(cfg: ExperimentConfig) -> str:
    """Short hash of the resolved config: the identity of a quickstart's state."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def state_path(cfg: ExperimentConfig) -> Path:
    return paths.home() / "quickstart" / config_hash(cfg) / "state.json"


def stages(cfg: ExperimentConfig, ablations: bool = False) -> list[tuple[str, str]]:
    """The stage names and descriptions this config runs, in order; ``ablations`` appends
    :data:`ABLATION_TAIL` (the default stages are the same either way)."""
    base = [
        (f"eval-{m}", f"evaluate the untrained model with {m}") for m in cfg.quickstart.baselines
    ]
    return FIXED_HEAD + base + FIXED_TAIL + (ABLATION_TAIL if ablations else [])


def no_mask_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``algorithm.use_mask=false`` and nothing else changed (the ablation)."""
    return dataclasses.replace(cfg, algorithm=dataclasses.replace(cfg.algorithm, use_mask=False))


def _pick(result: dict[str, Any], *keys: str) -> dict[str, Any]:
    """The JSON-able part of a stage's result kept in the state file (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in result.items() if k in keys}


def _load_state(p: Path) -> dict[str, Any]:
    return json.loads(p.read_text()) if p.is_file() else {}


def quickstart(
    cfg: ExperimentConfig,
    fresh: bool = False,
    progress: ProgressFactory | None = None,
    notify: Notify | None = None,
    ablations: bool = False,
) -> dict[str, Any]:
    """Run (or finish) the quickstart for ``cfg``; returns the rows, the paired comparison,
    the report and timings.

    ``fresh`` forgets finished stages of this config. ``ablations`` also runs
    :data:`ABLATION_TAIL` (sharing the default stages' state: a finished default run only adds
    those two). ``notify(stage, event, detail)`` is called at every stage start, skip and end
    (the CLI prints from it). ``progress`` is passed to every long stage (:mod:`sr1.progress`;
    None or False: silent).
    """
    from sr1 import models
    from sr1.data.synth import synthesize
    from sr1.eval.methods import get_method
    from sr1.eval.runner import evaluate
    from sr1.report.build import build_report
    from sr1.retrieval.index import build_index
    from sr1.rollout.placement import shared_engines
    from sr1.tracking.run import RunInterrupted
    from sr1.train.sft import sft
    from sr1.train.trainer import ALGOS, train

    progress = resolve_progress(progress)  # progress=True fails here, before any work
    q = cfg.quickstart
    for m in q.baselines:
        get_method(m)  # unknown names fail before any work
    ALGOS.get(q.algo)
    model = cfg.model.name
    index = cfg.retrieval.index
    sp = state_path(cfg)
    state = {} if fresh else _load_state(sp)
    note = notify or (lambda stage, event, detail: None)

    def save() -> None:
        write_json_atomic(sp, state)

    def eval_stage(m: str, name: str, **where: Any) -> dict[str, Any]:
        r = evaluate(
            datasets=["synth"],
            method=m,
            index=index,
            cfg=cfg,
            progress=progress,
            run_name=name,
            fresh=True,
            **where,
        )
        return {"run_id": r["run_id"], "method": m}

    def train_stage(name: str, run_cfg: ExperimentConfig) -> dict[str, Any]:
        # an interrupted train (SIGINT/SIGTERM) is resumed from its checkpoint, not redone
        out = train(
            run_cfg,
            q.algo,
            state["sft"]["checkpoint"],
            progress=progress,
            resume=state.get(f"{name}-interrupted"),
        )
        return _pick(out, "run_id", "checkpoint")

    actions: dict[str, Callable[[], dict[str, Any]]] = {
        "fetch": lambda: {"path": str(models.fetch(model))},
        "synth": lambda: _pick(
            synthesize(
                seed=q.synth_seed,
                n_entities=q.synth_entities,
                n_train=q.synth_train,
                n_dev=q.synth_dev,
                n_test=q.synth_test,
            ),
            "passages",
            "questions",
            "two_hop",
            "corpus",
        ),
        "index": lambda: {
            "manifest_sha256": build_index(index, cfg=cfg.retrieval, progress=progress).get(
                "manifest_sha256"
            )
        },
        "sft": lambda: _pick(
            sft(cfg, model, index, dataset="synth", progress=progress),
            "run_id",
            "checkpoint",
            "n_examples",
            "final_loss",
        ),
        "eval-sft": lambda: eval_stage(
            "search", f"sft+search ({model})", model=state["sft"]["checkpoint"]
        ),
        "eval-sft-rag": lambda: eval_stage(
            "rag", f"sft+rag ({model})", model=state["sft"]["checkpoint"]
        ),
        "train": lambda: train_stage("train", cfg),
        "eval-rl": lambda: eval_stage(
            "search", f"sft+{q.algo}+search ({model})", run=state["train"]["run_id"]
        ),
        "train-nomask": lambda: train_stage("train-nomask", no_mask_config(cfg)),
        "eval-rl-nomask": lambda: eval_stage(
            "search",
            f"sft+{q.algo}+search, no mask ({model})",
            run=state["train-nomask"]["run_id"],
        ),
    }
    for m in q.baselines:
        actions[f"eval-{m}"] = lambda m=m: eval_stage(m, f"{m} ({model})", model=model)

    todo = stages(cfg, ablations)
    t_all = time.perf_counter()
    # one engine process for every stage that would start its own (placement=process): the
    # evaluations load their checkpoint into it, RL pushes its weights (one start-up, not six)
    with shared_engines():
        for name, desc in todo:
            if name in state:
                note(name, "skip", desc)
                continue
            note(name, "start", desc)
            t0 = time.perf_counter()
            try:
                out = actions[name]()
            except RunInterrupted as e:
                if name in TRAIN_STAGES and e.run_id and e.checkpoint:
                    state[f"{name}-interrupted"] = e.run_id
                    save()
                raise
            out["seconds"] = round(time.perf_counter() - t0, 1)
            state[name] = out
            save()
            note(name, "done", f"{desc} ({out['seconds']} s)")

    eval_stages = [n for n, _ in todo if n.startswith("eval-")]
    run_ids = [state[n]["run_id"] for n in eval_stages]
    a, b = PAIRED["paired"]
    report = build_report(
        run_ids,
        baseline=state[f"eval-{q.baselines[-1]}"]["run_id"] if q.baselines else None,
        compare=(state[a]["run_id"], state[b]["run_id"]),
        flips_limit=20,
    )
    out: dict[str, Any] = {
        "rows": summary_rows(report, state, eval_stages),
        "paired": paired_summary(report["compare"], a, b),
        "report": report,
        "seconds": {n: state[n]["seconds"] for n, _ in todo},
        "seconds_this_call": round(time.perf_counter() - t_all, 1),
        "state": str(sp),
        "train_run": state["train"]["run_id"],
        "sft_run": state["sft"]["run_id"],
        "mlflow_uri": tracking_uri(cfg.tracking.mlflow_uri),
        "duckdb": str(paths.duckdb_path()),
    }
    if ablations:
        a, b = PAIRED["paired_no_mask"]
        cmp = build_report(
            [state[a]["run_id"], state[b]["run_id"]],
            compare=(state[a]["run_id"], state[b]["run_id"]),
            flips_limit=0,
        )["compare"]
        out["paired_no_mask"] = paired_summary(cmp, a, b)
        out["train_nomask_run"] = state["train-nomask"]["run_id"]
    return out


def paired_summary(compare: dict[str, Any], stage_a: str, stage_b: str) -> dict[str, Any]:
    """The quickstart's paired comparison of run B against run A on the questions both
    answered, from a report's ``compare`` (:func:`sr1.report.build.build_report`).

    ``delta``: mean(B) - mean(A) of the per-question metric (EM); ``ci``: its paired-bootstrap
    95% interval; ``p_value``: two-sided sign-flip permutation test; ``gained`` / ``lost``:
    questions B gets right and A wrong / the reverse; ``n``: questions both evaluated.
    """
    o = compare["overall"]
    return {
        "a": stage_a,
        "b": stage_b,
        "a_run": compare["a"],
        "b_run": compare["b"],
        "metric": compare["metric"],
        "n": o["n"],
        "a_mean": o["mean_a"],
        "b_mean": o["mean_b"],
        "delta": o["diff"],
        "ci": o["ci"],
        "p_value": o["p_value"],
        "gained": compare["gained"],
        "lost": compare["lost"],
        "test": "paired bootstrap CI; two-sided sign-flip permutation p-value",
    }


def summary_rows(
    report: dict[str, Any], state: dict[str, Any], eval_stages: list[str]
) -> list[dict[str, Any]]:
    """One row per evaluated model/method: ``model`` (untrained, sft, sft+rl), ``method``,
    ``ablation`` (None, or ``no_mask``), EM and cover-EM, EM and searches per question by hops
    (single / two-hop), searches per question overall, ``n``, the eval ``run_id``."""
    by_run = {r["run_id"]: r for r in report["rows"]}
    hops = {(h["run_id"], h["group"]): h for h in report["search_by_hops"]}
    search = {s["run_id"]: s for s in report["search_by_dataset"] if s["dataset"] == "synth"}
    out = []
    for st in eval_stages:
        rid = state[st]["run_id"]
        row = by_run[rid]
        stage_model, ablation = STAGE_ROWS.get(st, ("untrained", None))
        single = hops.get((rid, "single")) or {}
        multi = hops.get((rid, "multi")) or {}
        ds = search.get(rid) or {}
        out.append(
            {
                "stage": st,
                "method": state[st]["method"],
                "model": stage_model,
                "ablation": ablation,
                "em": row["values"].get("synth"),
                "cover_em": ds.get("cover_em"),
                "em_single_hop": single.get("em"),
                "em_two_hop": multi.get("em"),
                "searches_per_question": ds.get("searches_mean"),
                "searches_single_hop": single.get("searches_mean"),
                "searches_two_hop": multi.get("searches_mean"),
                "n": ds.get("n"),
                "run_id": rid,
            }
        )
    return out
