"""Where sr1 keeps things: everything lives under ``$SR1_HOME`` (default ``./.sr1``)."""

from __future__ import annotations

import os
from pathlib import Path

from sr1.errors import ConfigError

MAX_NAME_LEN = 128


def home() -> Path:
    """The sr1 home directory, created on first use. ``SR1_HOME`` overrides ``./.sr1``."""
    p = Path(os.environ.get("SR1_HOME", ".sr1")).expanduser().resolve()
    p.mkdir(parents=True, exist_ok=True)
    return p


def _sub(name: str) -> Path:
    p = home() / name
    p.mkdir(parents=True, exist_ok=True)
    return p


def models_dir() -> Path:
    return _sub("models")


def indices_dir() -> Path:
    return _sub("indices")


def data_dir() -> Path:
    return _sub("data")


def corpora_dir() -> Path:
    return _sub("corpora")


def runs_dir() -> Path:
    return _sub("runs")


def safe_name(kind: str, value: object) -> str:
    """``value`` if it is safe as one path component under ``$SR1_HOME``, else ConfigError.

    Every user-given name that becomes a file or folder name (dataset splits, run ids, index
    and dataset names, ...) goes through here, so none can reach outside the home: refused are
    the empty name, ``/`` and ``\\``, ``..`` anywhere, a leading ``.`` (hidden and temp
    folders), NUL and other control characters, and names over 128 characters.
    """
    if not isinstance(value, str):
        raise ConfigError(f"invalid {kind} {value!r}: expected a name (text)")
    reason = None
    if not value:
        reason = "it is empty"
    elif len(value) > MAX_NAME_LEN:
        reason = f"it is longer than {MAX_NAME_LEN} characters"
    elif "/" in value or "\\" in value:
        reason = "it contains a path separator"
    elif ".." in value:
        reason = "it contains '..'"
    elif value.startswith("."):
        reason = "it starts with '.'"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        reason = "it contains a control character"
    if reason is not None:
        raise ConfigError(
            f"invalid {kind} {value!r}: {reason}",
            hint=f"a {kind} is a plain name (letters, digits, '.', '_', '-'), never a path",
        )
    return value


def within_home(path: str | os.PathLike[str], kind: str = "path") -> Path:
    """``path`` resolved (symlinks followed) if it lies inside ``$SR1_HOME``, else ConfigError."""
    root = home()
    p = Path(path).expanduser().resolve()
    if p != root and not p.is_relative_to(root):
        raise ConfigError(
            f"{kind} {p} is outside SR1_HOME ({root})",
            hint="sr1 only reads and writes run state inside its home directory",
        )
    return p


def run_dir(run_id: str) -> Path:
    """``$SR1_HOME/runs/<run_id>`` for a safe ``run_id`` (not created); ConfigError otherwise."""
    return within_home(runs_dir() / safe_name("run id", run_id), "run directory")


def duckdb_path() -> Path:
    return home() / "sr1.duckdb"


def mlflow_db_path() -> Path:
    return home() / "mlflow.db"


def shared_data_dir() -> Path | None:
    """The real sample data folder (``../shared/data`` next to the checkout), if present.

    ``SR1_SHARED_DATA`` overrides the location. Tests and benchmarks skip when this is None.
    """
    env = os.environ.get("SR1_SHARED_DATA")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parent.parent
    candidates += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for c in candidates:
        if (c / "qa").is_dir() or (c / "corpus").is_dir():
            return c.resolve()
    return None
