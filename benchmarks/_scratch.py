"""Scratch folders for benchmark runs: created on demand, removed when the benchmark exits.

A benchmark's SR1_HOME holds a model copy, indices and run checkpoints (several GB for
`rl_step.py`); left in /tmp they fill the disk that CI shares. ``--home`` (or an SR1_HOME set
by the caller) is kept: it is the caller's.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path


def scratch_dir(prefix: str) -> Path:
    """A new temporary folder, removed (with everything in it) at interpreter exit."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


def scratch_home(prefix: str = "sr1-bench-") -> Path:
    """``$SR1_HOME`` when the caller set it, else a :func:`scratch_dir` exported as SR1_HOME
    (child processes inherit it; only the process that made it removes it)."""
    if os.environ.get("SR1_HOME"):
        return Path(os.environ["SR1_HOME"])
    path = scratch_dir(prefix)
    os.environ["SR1_HOME"] = str(path)
    return path
