"""Find the model a training run produced: ``--run RUN_ID`` -> its latest HF checkpoint directory.

Trainers save under ``$SR1_HOME/runs/<run_id>/checkpoints/``: ``final/`` at the end and
``step-N/`` every ``trainer.save_every`` steps. ``final`` wins; otherwise the highest step.
"""

from __future__ import annotations

import re
from pathlib import Path

from sr1 import paths
from sr1.errors import NotFoundError
from sr1.tracking.store import Store

_STEP_RE = re.compile(r"^step-(\d+)$")


def _is_checkpoint(d: Path) -> bool:
    return d.is_dir() and (d / "config.json").is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """``checkpoints/final`` if present, else the highest ``checkpoints/step-N``; None if neither."""
    ck = run_dir / "checkpoints"
    if _is_checkpoint(ck / "final"):
        return ck / "final"
    steps = []
    if ck.is_dir():
        for d in ck.iterdir():
            m = _STEP_RE.match(d.name)
            if m and _is_checkpoint(d):
                steps.append((int(m.group(1)), d))
    return max(steps)[1] if steps else None


def resolve_run_checkpoint(run_id: str, store: Store | None = None) -> tuple[Path, dict]:
    """The checkpoint directory of a run and the run's record; loud errors otherwise.

    Unknown ids list recent runs (via the store); a run without checkpoints says where
    checkpoints are expected and which runs do have some.
    """
    store = store or Store()
    run_dir = paths.run_dir(run_id)  # a run id, never a path out of SR1_HOME
    run = store.get_run(run_id)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        with_ckpt = [
            r["run_id"]
            for r in store.list_runs()
            if latest_checkpoint(paths.runs_dir() / r["run_id"]) is not None
        ]
        raise NotFoundError(
            f"run {run_id!r} ({run['kind']}) has no checkpoint under "
            f"{paths.runs_dir() / run_id / 'checkpoints'} (expected final/ or step-N/)",
            hint=("runs with checkpoints: " + ", ".join(with_ckpt[-10:]))
            if with_ckpt
            else "train a model first (sr1 train / sr1 sft), or pass --model",
        )
    return ckpt, run
