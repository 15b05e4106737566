"""`sr1 train`: RL training (ppo, grpo, reinforce_pp, rloo) with search rollouts."""

from __future__ import annotations

import dataclasses

import typer

from sr1.cli.common import (
    CONFIG_HELP,
    JSON_HELP,
    SET_HELP,
    err_console,
    interruptible,
    print_json,
    rich_progress,
)
from sr1.config import ExperimentConfig, check_flag, resolve_config

_SUMMARY_KEYS = ("reward/mean", "reward/em", "search/mean", "actor/kl", "time/step_s")

PAPER_GROUP_SIZE = 5  # Search-R1's GRPO group size (responses per prompt)


def _group_size_default(
    cfg: ExperimentConfig, algo: str, config: str | None, set_: list[str] | None
) -> ExperimentConfig:
    """``cfg`` with ``rollout.n_samples`` = the paper's group size when ``algo`` compares samples
    of one prompt (grpo, rloo) and neither the YAML nor ``--set`` gave ``rollout.n_samples``.

    Whether it was given is found by resolving once more from a base with a different
    ``n_samples``: a value from the user wins over either base, the default does not. A value
    given explicitly (even 1, which the trainer refuses for these algorithms) is kept.
    """
    from sr1.train.trainer import ALGOS

    if algo not in ALGOS or not ALGOS.get(algo).grouped:
        return cfg
    base = ExperimentConfig()
    probe = dataclasses.replace(base.rollout, n_samples=base.rollout.n_samples + 1)
    other = resolve_config(config, set_, base=dataclasses.replace(base, rollout=probe))
    if other.rollout.n_samples == cfg.rollout.n_samples:  # given by the user
        return cfg
    err_console.print(
        f"{algo}: rollout.n_samples not given, using the paper's group size {PAPER_GROUP_SIZE}",
        highlight=False,
    )
    return dataclasses.replace(
        cfg, rollout=dataclasses.replace(cfg.rollout, n_samples=PAPER_GROUP_SIZE)
    )


def train_cmd(
    algo: str = typer.Option(
        None,
        "--algo",
        help="ppo, grpo, reinforce_pp or rloo (grpo/rloo: 5 samples per prompt unless "
        "rollout.n_samples is set).",
    ),
    model: str = typer.Option(
        None, "--model", help="Model alias, hub id, local path or SFT checkpoint."
    ),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
    max_steps: int = typer.Option(
        None, "--max-steps", help="Stop after this many RL steps (total, counting resumed ones)."
    ),
    resume: str = typer.Option(
        None,
        "--resume",
        help="Continue run RUN_ID from its latest checkpoint (same data order, optimiser and RNG).",
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Train a policy to search with RL; retrieved tokens are masked out of every loss.

    Checkpoints go to $SR1_HOME/runs/RUN_ID/checkpoints/step-N (every trainer.save_every steps)
    and .../final (the newest trainer.keep_checkpoints step-N are kept). Ctrl-C or SIGTERM
    finishes the current step, saves a checkpoint, marks the run interrupted and exits with
    130 / 143 and one line saying `sr1 train --resume RUN_ID`; a second signal stops at once.
    Every step is logged to DuckDB at once and to MLflow once a checkpoint covers it, so a
    resumed run has each step in MLflow exactly once (see `sr1 runs show RUN_ID`).
    """
    from sr1.errors import ConfigError
    from sr1.train.trainer import train

    if resume is None and (algo is None or model is None):
        raise ConfigError(
            "--algo and --model are required (unless --resume RUN_ID)",
            hint="e.g. sr1 train --algo grpo --model smollm2-135m",
        )
    check_flag("--max-steps", max_steps)
    cfg = resolve_config(config, set_)
    if resume is None:
        cfg = _group_size_default(cfg, algo, config, set_)
    with interruptible():
        res = train(
            cfg,
            algo or "",
            model or "",
            resume=resume,
            max_steps=max_steps,
            progress=None if json_out else rich_progress,
        )
    if json_out:
        print_json(res)
        return
    last = res["steps"][-1] if res["steps"] else {}
    summary = ", ".join(f"{k}={last[k]:.3f}" for k in _SUMMARY_KEYS if k in last)
    err_console.print(f"done: run {res['run_id']} ({len(res['steps'])} steps) {summary}")
    err_console.print(f"checkpoint: {res['checkpoint']}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
