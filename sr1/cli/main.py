"""Entry point: assembles the command groups and turns user errors into one-line messages."""

from __future__ import annotations

import importlib
import sys

import typer

from sr1.errors import Sr1Error

app = typer.Typer(
    name="sr1",
    help=(
        "Search-R1 experiments end to end: build retrieval indices, prepare QA benchmarks, "
        "train LLMs with RL to search (retrieved tokens masked out of the loss), evaluate, "
        "and report paper-style tables. Everything is stored under $SR1_HOME (default ./.sr1)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)

# Each module exposes register(app); order here is the order in --help.
_COMMAND_MODULES = [
    "quickstart",
    "model",
    "data",
    "index",
    "search",
    "serve",
    "rollout",
    "sft",
    "train",
    "eval",
    "runs",
    "report",
]

for _name in _COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"sr1.cli.cmd_{_name}")
    except ModuleNotFoundError as _e:  # a command group not built yet must not break the others
        if _e.name != f"sr1.cli.cmd_{_name}":
            raise
        continue
    _mod.register(app)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; Sr1Error becomes ``error: ...`` on stderr and a non-zero exit code."""
    try:
        app(args=argv, prog_name="sr1")
    except SystemExit as e:  # click's normal exit path (help, usage errors, success)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Sr1Error as e:
        from sr1.cli.common import err_console

        # soft_wrap: the message stays one line (paths are long), the terminal wraps it
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
