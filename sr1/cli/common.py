"""Shared CLI plumbing: stderr console, progress bars, JSON output, and config flags."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console

from sr1.progress import Advance

# Progress, logs and tables for humans go to stderr unless a command prints a table as its result;
# --json output goes to stdout alone so scripts can parse it.
err_console = Console(stderr=True)
out_console = Console()


@contextlib.contextmanager
def rich_progress(label: str, total: int | None, completed: int = 0) -> Iterator[Advance]:
    """The CLI's :class:`sr1.progress.ProgressFactory`: a rich bar on stderr (``err_console``).

    ``total=None`` shows a spinner and a count without a bar's end.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as bar:
        task = bar.add_task(label, total=total, completed=completed)

        def advance(n: int, *, description: str | None = None) -> None:
            bar.update(task, advance=n, description=description)

        yield advance


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Run a command's work so that SIGTERM acts as Ctrl-C (a preempted job stops as cleanly as
    an interactive one) and an interrupted run ends the command with one ``interrupted:`` line
    on stderr saying how to continue, and exit code 128 + the signal (130 SIGINT, 143 SIGTERM).
    """
    import signal

    from rich.markup import escape

    from sr1.tracking.run import RunInterrupted, interrupt_on_sigterm

    try:
        with interrupt_on_sigterm():
            yield
    except RunInterrupted as e:
        err_console.print(f"[bold yellow]interrupted:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt as e:  # before any run existed
        signum = int(getattr(e, "signum", signal.SIGINT))
        err_console.print(f"[bold yellow]interrupted:[/] {escape(str(e) or 'SIGINT')}")
        raise typer.Exit(128 + signum) from None


def print_json(obj: Any) -> None:
    """Print one JSON document on stdout (the --json contract)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


CONFIG_HELP = "YAML file of config overrides (see experiments/)."
SET_HELP = "Dotted override, repeatable: --set trainer.lr=1e-5 --set rollout.max_turns=3."
JSON_HELP = "Print one JSON document on stdout instead of a table."
