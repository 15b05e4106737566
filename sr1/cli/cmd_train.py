"""`sr1 train`: RL training (ppo, grpo, reinforce_pp, rloo) with search rollouts."""

from __future__ import annotations

import typer

from sr1.cli.common import CONFIG_HELP, JSON_HELP, SET_HELP, err_console, print_json, rich_progress
from sr1.config import check_flag, resolve_config

_SUMMARY_KEYS = ("reward/mean", "reward/em", "search/mean", "actor/kl", "time/step_s")


def train_cmd(
    algo: str = typer.Option(None, "--algo", help="ppo, grpo, reinforce_pp or rloo."),
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
    and .../final; Ctrl-C saves a checkpoint after the current step and exits. Every step is
    logged to MLflow and DuckDB (see `sr1 runs show RUN_ID`).
    """
    from sr1.errors import ConfigError
    from sr1.train.trainer import train

    if resume is None and (algo is None or model is None):
        raise ConfigError(
            "--algo and --model are required (unless --resume RUN_ID)",
            hint="e.g. sr1 train --algo grpo --model smollm2-135m --set rollout.n_samples=5",
        )
    check_flag("--max-steps", max_steps)
    cfg = resolve_config(config, set_)
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
    state = "interrupted" if res["interrupted"] else "done"
    err_console.print(f"{state}: run {res['run_id']} ({len(res['steps'])} steps) {summary}")
    err_console.print(f"checkpoint: {res['checkpoint']}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
