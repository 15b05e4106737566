"""`sr1 runs list|show`: the runs recorded in the DuckDB store."""

from __future__ import annotations

import typer
from rich.table import Table

from sr1.cli.common import JSON_HELP, out_console, print_json
from sr1.tracking.store import Store

runs_app = typer.Typer(
    help="Runs recorded in $SR1_HOME/sr1.duckdb (also in MLflow).", no_args_is_help=True
)


@runs_app.command("list")
def list_cmd(
    kind: str = typer.Option(
        None, "--kind", help="Only runs of this kind (train, sft, eval, ...)."
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List runs, oldest first. A run marked running whose process is gone shows as dead."""
    runs = Store().list_runs(kind)
    if json_out:
        print_json([{k: v for k, v in r.items() if k != "config"} for r in runs])
        return
    t = Table(title="sr1 runs")
    for c in ("run_id", "kind", "name", "status", "model", "started_at"):
        t.add_column(c)
    for r in runs:
        t.add_row(
            r["run_id"],
            r["kind"],
            r["name"] or "",
            r["status"],
            r["model"] or "",
            str(r["started_at"])[:19],
        )
    out_console.print(t)


@runs_app.command("show")
def show_cmd(
    run_id: str = typer.Argument(..., help="Run id (sr1 runs list)."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Show one run: config, params, last metrics, eval summaries, artifacts."""
    store = Store()
    run = store.get_run(run_id)
    metrics = store.step_metrics(run_id)
    last: dict[str, float] = {}
    for m in metrics:
        last[m["key"]] = m["value"]
    doc = {
        **run,
        "last_metrics": last,
        "steps": max((m["step"] for m in metrics), default=None),
        "eval_summaries": store.eval_summaries([run_id]),
        "artifacts": store.artifacts(run_id),
    }
    if json_out:
        print_json(doc)
        return
    t = Table(title=f"run {run_id}", show_header=False)
    t.add_column("field")
    t.add_column("value")
    for k in (
        "kind",
        "name",
        "status",
        "status_reason",
        "model",
        "parent_run",
        "mlflow_run_id",
        "started_at",
        "ended_at",
        "host",
        "pid",
        "heartbeat_at",
        "steps",
    ):
        if k in doc:
            t.add_row(k, str(doc.get(k)))
    for k, v in sorted(last.items()):
        t.add_row(f"metric {k}", f"{v:.4g}")
    for s in doc["eval_summaries"]:
        t.add_row(
            f"eval {s['dataset']}",
            ", ".join(
                f"{k}={v:.3f}" for k, v in s["metrics"].items() if isinstance(v, int | float)
            ),
        )
    for a in doc["artifacts"]:
        t.add_row("artifact", a["path"])
    out_console.print(t)


def register(app: typer.Typer) -> None:
    app.add_typer(runs_app, name="runs")
