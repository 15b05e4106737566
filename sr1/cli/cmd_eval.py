"""`sr1 eval`: evaluate a model or a training run's checkpoint on QA benchmarks (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from sr1.cli.common import (
    CONFIG_HELP,
    JSON_HELP,
    SET_HELP,
    interruptible,
    out_console,
    print_json,
    rich_progress,
)
from sr1.config import check_flag, resolve_config
from sr1.errors import Sr1Error
from sr1.eval.methods import METHODS


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def summary_table(summary: dict[str, Any]) -> Table:
    """The per-dataset result table printed at the end of an eval."""
    t = Table(
        title=f"eval {summary['run_id']}: {summary['method']} on {summary['model']}",
        title_justify="left",
    )
    # Short headers so the table fits 80 columns: in-docs = answer in retrieved passages,
    # srch = mean searches per question, dist = searches:count, tokens = mean response length.
    for c in ("dataset", "n", "EM", "cov-EM", "F1", "in-docs", "srch", "dist", "tokens", "s/q"):
        t.add_column(c, justify="left" if c in ("dataset", "dist") else "right")
    for d, m in summary["datasets"].items():
        t.add_row(
            d,
            str(m["n"]),
            _f(m["em"]),
            _f(m["cover_em"]),
            _f(m["f1"]),
            _f(m["answer_in_docs"]),
            _f(m["searches_mean"], 2),
            " ".join(f"{k}:{v}" for k, v in m["searches_dist"].items()),
            _f(m["response_tokens_mean"], 1),
            _f(m["seconds_per_question"], 2),
        )
    a = summary["avg"]
    t.add_row(
        "avg",
        "",
        _f(a["em"]),
        _f(a["cover_em"]),
        _f(a["f1"]),
        _f(a["answer_in_docs"]),
        _f(a["searches_mean"], 2),
        "",
        "",
        "",
        style="bold",
    )
    note = f"{summary['evaluated_now']} examples generated now"
    if summary["resumed"]:
        note += " (resumed run)"
    t.caption = note
    return t


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        dataset: list[str] = typer.Option(
            None, "--dataset", "-d", help="Dataset to evaluate; repeatable (or comma-separated)."
        ),
        all_datasets: bool = typer.Option(
            False,
            "--all-datasets",
            help="Evaluate every dataset in data.eval_datasets (the seven).",
        ),
        model: str = typer.Option(None, "--model", "-m", help="Model alias, hub id or local path."),
        run: str = typer.Option(
            None, "--run", help="A training run id: evaluate its latest checkpoint."
        ),
        method: str = typer.Option(
            None, "--method", help=f"{' | '.join(METHODS.names())} (default: eval.method, search)."
        ),
        index: str = typer.Option(
            None, "--index", help="Index for rag/search (default: retrieval.index)."
        ),
        source_dir: Path = typer.Option(
            None, "--source-dir", help="Folder of <dataset>/<split>.jsonl (FlashRAG format)."
        ),
        split: str = typer.Option(
            None, "--split", help="Split (default test; sets without test fall back to dev)."
        ),
        limit: int = typer.Option(None, "--limit", help="First N questions of each dataset."),
        engine: str = typer.Option(None, "--engine", help="hf or vllm."),
        name: str = typer.Option(
            None, "--name", help="A name for the eval run (report row label)."
        ),
        resume: str = typer.Option(
            None, "--resume", help="Continue this (interrupted) eval run id."
        ),
        fresh: bool = typer.Option(
            False,
            "--fresh",
            help="Start a new run even if an identical unfinished eval exists (default: resume it).",
        ),
        config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
        set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
        json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        """Evaluate direct / cot / rag / search on QA benchmarks; rows are stored as they complete.

        An interrupted eval resumes where it stopped: rerun the same command (or pass
        --resume RUN_ID). Results: `sr1 report`, `sr1 runs show RUN_ID`.
        """
        from sr1.eval.runner import evaluate

        names = [n.strip() for d in dataset or [] for n in d.split(",") if n.strip()]
        if resume is None:
            if all_datasets == bool(names):
                raise Sr1Error(
                    "pass exactly one of --all-datasets or --dataset D",
                    hint="e.g. sr1 eval --dataset nq --model smollm2-135m --method rag",
                )
            if (model is None) == (run is None):
                raise Sr1Error("pass exactly one of --model M or --run RUN_ID")
        check_flag("--limit", limit)
        cfg = resolve_config(
            config,
            set_,
            eval={"method": method, "split": split, "limit": limit},
            rollout={"engine": engine},
            retrieval={"index": index},
            data={"source_dir": str(source_dir.expanduser().resolve()) if source_dir else None},
        )
        with interruptible():  # SIGTERM as Ctrl-C: stored batches stay, the run is interrupted
            summary = evaluate(
                datasets=names or None,
                model=model,
                run=run,
                cfg=cfg,
                run_name=name,
                resume=resume,
                fresh=fresh,
                progress=rich_progress,
            )
        if json_out:
            print_json(summary)
        else:
            out_console.print(summary_table(summary))
