"""Shared CLI plumbing: stderr console, JSON output, and config flags."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

# Progress, logs and tables for humans go to stderr unless a command prints a table as its result;
# --json output goes to stdout alone so scripts can parse it.
err_console = Console(stderr=True)
out_console = Console()


def print_json(obj: Any) -> None:
    """Print one JSON document on stdout (the --json contract)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


CONFIG_HELP = "YAML file of config overrides (see experiments/)."
SET_HELP = "Dotted override, repeatable: --set trainer.lr=1e-5 --set rollout.max_turns=3."
JSON_HELP = "Print one JSON document on stdout instead of a table."
