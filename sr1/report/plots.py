"""PNG plots for reports (matplotlib, Agg backend): training curves and EM by dataset.

Training curves come from the ``step_metrics`` of train/sft runs. Trainers name their keys
differently (``reward/mean``, verl's ``critic/rewards/mean``, ...), so each curve lists the
names it accepts, then falls back to a pattern. Each run's curves are attached to that run
(MLflow artifact under ``plots/`` and the DuckDB ``artifacts`` table).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from sr1.tracking.store import Store

# curve -> (title, exact keys in preference order, fallback pattern)
CURVES: dict[str, tuple[str, list[str], str]] = {
    "reward": (
        "reward (mean per step)",
        ["reward/mean", "reward", "train/reward", "critic/rewards/mean", "rollout/reward_mean"],
        r"reward",
    ),
    "response_length": (
        "response length (tokens)",
        [
            "length/response_mean",
            "response_length/mean",
            "response_length",
            "rollout/response_length",
            "response_tokens/mean",
            "response_length/generated",
        ],
        r"(response_(length|tokens)|length/response)",
    ),
    "searches": (
        "searches per question",
        [
            "search/mean",
            "searches/mean",
            "num_searches/mean",
            "rollout/num_searches",
            "search/num_searches",
            "env/number_of_valid_search",
        ],
        r"search",
    ),
}
_NOT_MEAN = re.compile(r"(std|min|max|clip|count)", re.IGNORECASE)


def pick_key(keys: set[str], curve: str) -> str | None:
    """The step-metric key that carries ``curve`` for a run, or None."""
    _, exact, pattern = CURVES[curve]
    for k in exact:
        if k in keys:
            return k
    pat = re.compile(pattern, re.IGNORECASE)
    cands = sorted(k for k in keys if pat.search(k) and not _NOT_MEAN.search(k))
    means = [k for k in cands if "mean" in k]
    return (means or cands or [None])[0]


def curves_for_run(store: Store, run_id: str) -> dict[str, dict[str, Any]]:
    """``{curve: {"key": k, "steps": [...], "values": [...]}}`` for the curves a run logged."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for m in store.step_metrics(run_id):
        if m["value"] is not None:
            series[m["key"]].append((int(m["step"]), float(m["value"])))
    out = {}
    for curve in CURVES:
        key = pick_key(set(series), curve)
        if key:
            pts = sorted(series[key])
            out[curve] = {"key": key, "steps": [s for s, _ in pts], "values": [v for _, v in pts]}
    return out


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _attach(store: Store, run: dict[str, Any], path: Path) -> str | None:
    """Record ``path`` as an artifact of ``run`` in DuckDB and MLflow; a warning on failure."""
    store.add_artifact(run["run_id"], str(path), "plot")
    if not run.get("mlflow_run_id"):
        return None
    try:
        from mlflow.tracking import MlflowClient

        from sr1.tracking.mlflow_log import tracking_uri

        MlflowClient(tracking_uri=tracking_uri(None)).log_artifact(
            run["mlflow_run_id"], str(path), "plots"
        )
    except Exception as e:  # the PNG exists either way; say why MLflow did not take it
        return f"could not attach {path.name} to MLflow run of {run['run_id']}: {type(e).__name__}: {e}"
    return None


def write_plots(
    report: dict[str, Any],
    train_runs: list[dict[str, Any]],
    out_dir: Path,
    store: Store,
    attach: bool = True,
) -> list[str]:
    """Write the report's PNGs to ``out_dir``; returns their paths (warnings go to the report)."""
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    all_curves = {r["run_id"]: curves_for_run(store, r["run_id"]) for r in train_runs}

    for run in train_runs:
        curves = all_curves[run["run_id"]]
        if not curves:
            continue
        fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), squeeze=False)
        for ax, (name, c) in zip(axes[0], curves.items(), strict=True):
            ax.plot(c["steps"], c["values"], marker="." if len(c["steps"]) < 50 else None)
            ax.set_title(CURVES[name][0])
            ax.set_xlabel("step")
            ax.set_ylabel(c["key"])
            ax.grid(alpha=0.3)
        fig.suptitle(run.get("name") or run["run_id"])
        fig.tight_layout()
        path = out_dir / f"{run['run_id']}_curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
        if attach:
            warn = _attach(store, run, path)
            if warn:
                report.setdefault("warnings", []).append(warn)

    # One overlay per curve when several training runs are compared (e.g. PPO vs GRPO).
    multi = [r for r in train_runs if all_curves[r["run_id"]]]
    if len(multi) > 1:
        for name, (title, _, _) in CURVES.items():
            have = [r for r in multi if name in all_curves[r["run_id"]]]
            if len(have) < 2:
                continue
            fig, ax = plt.subplots(figsize=(5.5, 3.6))
            for r in have:
                c = all_curves[r["run_id"]][name]
                ax.plot(c["steps"], c["values"], label=r.get("name") or r["run_id"])
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"compare_{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(str(path))

    rows, datasets = report["rows"], report["datasets"]
    if rows and datasets:
        import numpy as np

        cols = [*datasets, "avg"]
        x = np.arange(len(cols))
        width = 0.8 / len(rows)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cols)), 3.8))
        for i, row in enumerate(rows):
            vals = [row["values"].get(d) for d in datasets] + [row["avg"]]
            ax.bar(
                x + i * width - 0.4 + width / 2,
                [v if v is not None else 0.0 for v in vals],
                width,
                label=row["label"],
            )
        ax.set_xticks(x, cols, rotation=30, ha="right")
        ax.set_ylabel(report["metric"].upper())
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{report['metric']}_by_dataset.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written
