"""`sr1 sft`: supervised format warm-start on gold search trajectories (masked like RL)."""

from __future__ import annotations

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
from sr1.config import check_flag, resolve_config


def sft_cmd(
    model: str = typer.Option(..., "--model", help="Model alias, hub id or local path."),
    index: str = typer.Option(
        ..., "--index", help="Index name (sr1 index list) or http(s) /retrieve URL."
    ),
    dataset: str = typer.Option(
        None, "--dataset", help="Training dataset (default: data.train_datasets)."
    ),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
    max_steps: int = typer.Option(
        None, "--max-steps", help="Stop after this many optimiser updates."
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Fine-tune on well-formed trajectories (think, search, real retrieved information, answer).

    Information blocks are in the context but carry no loss, exactly as in RL. Sizes come from
    trainer.sft_examples, trainer.sft_epochs, trainer.sft_lr (LoRA if trainer.lora_rank > 0).
    The checkpoint ($SR1_HOME/runs/RUN_ID/checkpoints/final) is a plain HF model: pass it to
    `sr1 train --model` or `sr1 eval --model`. Ctrl-C or SIGTERM finishes the current update,
    saves checkpoints/step-N, marks the run interrupted and exits with 130 / 143.
    """
    from sr1.train.sft import sft

    check_flag("--max-steps", max_steps)
    cfg = resolve_config(config, set_)
    with interruptible():
        res = sft(
            cfg,
            model,
            index,
            dataset=dataset,
            max_steps=max_steps,
            progress=None if json_out else rich_progress,
        )
    if json_out:
        print_json(res)
        return
    err_console.print(
        f"sft run {res['run_id']}: {res['n_examples']} examples, {len(res['steps'])} updates, "
        f"final loss {res['final_loss']}"
    )
    err_console.print(f"checkpoint: {res['checkpoint']}")


def register(app: typer.Typer) -> None:
    app.command("sft")(sft_cmd)
