"""`sr1 quickstart`: the embedded default end to end (what `make demo` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from sr1.cli.common import (
    CONFIG_HELP,
    JSON_HELP,
    SET_HELP,
    err_console,
    interruptible,
    out_console,
    print_json,
    rich_progress,
)
from sr1.config import resolve_config
from sr1.errors import NotFoundError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "quickstart.yaml"


def default_config() -> Path:
    """experiments/quickstart.yaml of this checkout (sr1 installed from the repo, editable)."""
    if not DEFAULT_CONFIG.is_file():
        raise NotFoundError(
            f"the quickstart config {DEFAULT_CONFIG} is missing",
            hint="pass --config PATH (a copy of experiments/quickstart.yaml from the sr1 repo)",
        )
    return DEFAULT_CONFIG


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


ROW_COLUMNS = (
    "model", "method", "n", "EM", "cover-EM", "EM 1-hop", "EM 2-hop",
    "searches/q", "searches/q 1-hop", "searches/q 2-hop", "run",
)  # fmt: skip


def rows_table(rows: list[dict[str, Any]]) -> Table:
    """The quickstart's summary: EM (all, single-hop, two-hop), cover-EM and searches per
    question (all, single-hop, two-hop); an ablation row's model says which (e.g. no_mask)."""
    t = Table(title="quickstart: synthetic test split", title_justify="left")
    for c in ROW_COLUMNS:
        t.add_column(c, justify="left" if c in ("model", "method", "run") else "right")
    for r in rows:
        t.add_row(
            r["model"] + (f" ({r['ablation']})" if r.get("ablation") else ""),
            r["method"],
            str(r["n"]),
            _f(r["em"]),
            _f(r["cover_em"]),
            _f(r["em_single_hop"]),
            _f(r["em_two_hop"]),
            _f(r["searches_per_question"], 2),
            _f(r["searches_single_hop"], 2),
            _f(r["searches_two_hop"], 2),
            r["run_id"],
        )
    return t


def paired_line(p: dict[str, Any], label: str = "sft+rl vs sft (search)") -> str:
    """One line of a ``paired`` object: delta, 95% CI, p-value, gained/lost, n."""
    if not p.get("n"):
        return f"paired {label}: no shared questions"
    ci = p["ci"]
    return (
        f"paired {label}, {p['metric'].upper()} on {p['n']} questions: "
        f"delta {p['delta']:+.3f} (95% CI [{ci[0]:+.3f}, {ci[1]:+.3f}]), p = {p['p_value']:.4f}; "
        f"{p['gained']} gained, {p['lost']} lost"
    )


def quickstart_cmd(
    config: str = typer.Option(
        None,
        "--config",
        help=CONFIG_HELP + " Default: experiments/quickstart.yaml (SmolLM2-135M, sized for a "
        "2-core CPU).",
    ),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
    fresh: bool = typer.Option(
        False, "--fresh", help="Redo every stage (default: skip stages this config finished)."
    ),
    ablations: bool = typer.Option(
        False,
        "--ablations",
        help="Also train the identical RL recipe with retrieved tokens not masked "
        "(algorithm.use_mask=false) from the same SFT checkpoint, evaluate it with search and "
        "report the row beside the masked one (stages train-nomask, eval-rl-nomask; not part "
        "of the default run).",
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Fetch SmolLM2-135M, build the synthetic world and its BM25 index, evaluate the untrained
    model (quickstart.baselines: direct and rag), SFT warm-start, evaluate it (search, rag), RL
    (GRPO) from it, evaluate that with search, and print the comparison with a paired test of
    RL vs SFT. Rollouts and evals run on vLLM in its own process (rollout.placement=process;
    `--set model.dtype=auto` gives them bf16 weights where the CPU runs bf16 natively, while SFT
    and RL keep training fp32: faster, see README);
    `--set rollout.engine=hf --set rollout.placement=inprocess` uses the HF engine instead.

    Every stage is an ordinary run (see `sr1 runs list`, `sr1 report`); re-running skips the
    stages this config already finished. Sizes: experiments/quickstart.yaml, or --set, e.g.
    `--set trainer.max_steps=4 --set eval.limit=20`.
    """
    from sr1.quickstart import quickstart
    from sr1.report.render import render

    cfg = resolve_config(config or default_config(), set_)

    def notify(stage: str, event: str, detail: str) -> None:
        mark = {"start": "[cyan]>>[/]", "skip": "[dim]==[/]", "done": "[green]ok[/]"}[event]
        extra = " (finished earlier, skipped)" if event == "skip" else ""
        err_console.print(f"{mark} {stage}: {detail}{extra}", highlight=False)

    with interruptible():
        res = quickstart(
            cfg,
            fresh=fresh,
            progress=None if json_out else rich_progress,
            notify=notify,
            ablations=ablations,
        )
    keys = ["rows", "paired", "seconds", "train_run", "sft_run", "mlflow_uri", "duckdb"]
    keys += ["paired_no_mask", "train_nomask_run"] if ablations else []
    if json_out:
        print_json({k: res[k] for k in keys})
        return
    for t in render(res["report"], "table"):
        out_console.print(t)
    out_console.print(rows_table(res["rows"]))
    out_console.print(paired_line(res["paired"]), highlight=False)
    if ablations:
        out_console.print(
            paired_line(res["paired_no_mask"], "no_mask vs masked sft+rl (search)"),
            highlight=False,
        )
    total = sum(res["seconds"].values())
    out_console.print(
        f"stage seconds: {res['seconds']} (total {total:.0f} s, this call "
        f"{res['seconds_this_call']:.0f} s)\n"
        f"DuckDB: {res['duckdb']}  (sr1 runs list, sr1 report)\n"
        f"MLflow: {res['mlflow_uri']}  (mlflow ui --backend-store-uri {res['mlflow_uri']})\n"
        f"training curves: sr1 report {res['train_run']} --plots plots/",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart_cmd)
