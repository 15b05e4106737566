"""`sr1 report`: paper-style tables, intervals, paired tests and plots over stored runs."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from sr1.cli.common import JSON_HELP, err_console, out_console


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report_cmd(
        run_ids: list[str] = typer.Argument(
            None, help="Runs to include (ids or unique prefixes); default: all eval runs."
        ),
        fmt: str = typer.Option("table", "--format", "-f", help="table | markdown | csv | json."),
        plots: Path = typer.Option(
            None, "--plots", help="Write PNG plots here (training curves, EM by dataset)."
        ),
        baseline: str = typer.Option(None, "--baseline", help="Show deltas against this run."),
        compare: tuple[str, str] | None = typer.Option(
            None, "--compare", help="Paired test of B vs A and flipped questions: A B."
        ),
        metric: str = typer.Option("em", "--metric", help="em | cover_em | f1."),
        n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples."),
        seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and permutation test."),
        flips: int = typer.Option(50, "--flips", help="Flipped questions listed (--compare)."),
        out: Path = typer.Option(None, "--out", help="Also write the rendered report to FILE."),
        json_out: bool = typer.Option(False, "--json", help=JSON_HELP + " Same as --format json."),
    ) -> None:
        """Paper-style table (runs x datasets + Avg) with bootstrap 95% intervals, deltas vs a
        baseline, search-behaviour tables, a paired test between two runs, and plots."""
        from sr1.io import write_text_atomic
        from sr1.report import build_report, render
        from sr1.report.render import FORMATS

        fmt_name = "json" if json_out else fmt
        FORMATS.get(fmt_name)  # unknown formats fail before any work
        pair = tuple(c for c in compare if c) if compare else ()
        report = build_report(
            run_ids=run_ids or None,
            baseline=baseline,
            compare=pair or None,
            metric=metric,
            plots_dir=plots,
            n_boot=n_boot,
            seed=seed,
            flips_limit=flips,
        )
        if not report["rows"] and fmt_name == "table":
            err_console.print(
                "no eval results yet: run `sr1 eval --dataset nq --model M` first", highlight=False
            )
        rendered = render(report, fmt_name)
        if fmt_name == "table":
            for t in rendered:
                out_console.print(t)
            if out is not None:
                from sr1.report.render import to_markdown

                write_text_atomic(out, to_markdown(report))
        else:
            sys.stdout.write(rendered)
            sys.stdout.flush()
            if out is not None:
                write_text_atomic(out, rendered)
