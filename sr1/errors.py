"""User-facing errors: one exception type the CLI turns into a one-line message and exit code."""

from __future__ import annotations


class Sr1Error(Exception):
    """An error the user can act on. The message says what was wrong and what to do.

    The CLI prints ``error: <message>`` on stderr and exits with ``exit_code``
    instead of showing a traceback.
    """

    exit_code: int = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class ConfigError(Sr1Error):
    """A configuration file or override is malformed or names an unknown key."""


class NotFoundError(Sr1Error):
    """A named thing (model, dataset, index, run, file) does not exist."""
