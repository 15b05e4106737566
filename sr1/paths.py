"""Where sr1 keeps things: everything lives under ``$SR1_HOME`` (default ``./.sr1``)."""

from __future__ import annotations

import os
from pathlib import Path


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
