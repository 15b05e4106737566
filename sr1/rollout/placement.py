"""Where the rollout engine runs: in-process, in its own process, or on a remote server.

``open_engine`` is what ``sr1 train``, ``sr1 eval`` and ``sr1 rollout`` call:

- ``rollout.engine_url=http://HOST:PORT``: a running ``sr1 serve engine`` (any host); a
  :class:`~sr1.rollout.remote.RemoteEngine` talks to it.
- ``rollout.placement=process``: sr1 starts ``sr1 serve engine`` itself as a child process on
  a free port of 127.0.0.1 (its own process group, its output in ``engine.log``), waits until
  ``/health`` answers, and stops it (SIGTERM to the group, then SIGKILL) when the command ends:
  normally, on an error, on Ctrl-C or SIGTERM (the context manager's exit, with ``atexit`` as
  a backstop and, on Linux, ``PR_SET_PDEATHSIG`` should the parent be killed outright).
  ``EngineProcess.paused()`` freezes it (SIGSTOP) while the trainer updates
  (``rollout.engine_pause``); the group stays in sr1's session, so should sr1 die while it is
  frozen, the kernel continues the orphaned group (SIGHUP, SIGCONT) and it exits.
- ``rollout.placement=inprocess`` (default): :func:`~sr1.rollout.engines.make_engine` here.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from sr1.config import ExperimentConfig, RolloutConfig, to_dict
from sr1.errors import Sr1Error
from sr1.rollout import openmp
from sr1.rollout.remote import EngineDied, EngineError, RemoteEngine

LOG_TAIL_LINES = 15
_LIVE: set[EngineProcess] = set()
_LIVE_LOCK = threading.Lock()
# engine processes kept for reuse inside ``shared_engines()`` (None: every command part starts
# and stops its own), by what the server was started with (:func:`_pool_key`)
_POOL: dict[str, EngineProcess] | None = None


def _stop_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for p in live:
        p.stop()


atexit.register(_stop_all)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM this child when the process (thread) that started it dies."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(ln.rstrip() for ln in lines[-n:] if ln.strip())


def _exit_words(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"was killed by signal {-code} (exit code {code})"
    return f"exited with code {code}"


def _reported(p: subprocess.Popen[bytes], flags: int, timeout: float, poll_s: float) -> bool:
    """Whether child ``p`` reports a state change of ``flags`` (``os.WEXITED``,
    ``os.WSTOPPED``, ...) within ``timeout`` seconds, without consuming it: an exited child is
    not reaped (its pid stays held until ``p.wait()``)."""
    deadline = time.monotonic() + timeout
    while True:
        if p.returncode is not None:
            return True
        try:
            if os.waitid(os.P_PID, p.pid, flags | os.WNOWAIT | os.WNOHANG) is not None:
                return True
        except ChildProcessError:  # reaped elsewhere
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def _exited(p: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether child ``p`` exits within ``timeout`` seconds, without reaping it."""
    return _reported(p, os.WEXITED, timeout, poll_s=0.02)


class EngineProcess:
    """``sr1 serve engine`` as a child process: :meth:`start` (returns its URL once it answers
    ``/health``), :meth:`death` (an :class:`EngineDied` once it has exited), :meth:`stop`."""

    def __init__(
        self,
        model: str,
        cfg: ExperimentConfig,
        log_path: str | Path | None = None,
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.device = device or cfg.model.device
        self.dtype = dtype or cfg.model.dtype
        self._tmp = Path(tempfile.mkdtemp(prefix="sr1-engine-"))
        self.log_path = Path(log_path) if log_path else self._tmp / "engine.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None
        self.frozen = False  # SIGSTOPped by pause()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _config_file(self) -> Path:
        """The model and rollout sections for the child (placement reset: it serves)."""
        d = to_dict(self.cfg)
        rollout = dict(d["rollout"], placement="inprocess", engine_url=None)
        out = self._tmp / "engine.yaml"
        out.write_text(yaml.safe_dump({"model": d["model"], "rollout": rollout}))
        return out

    def command(self, ready: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "sr1.cli.main",
            "serve",
            "engine",
            "--model",
            self.model,
            "--engine",
            self.cfg.rollout.engine,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            self.device,
            "--dtype",
            self.dtype,
            "--config",
            str(self._config_file()),
            "--ready-file",
            str(ready),
        ]

    def _temp_env(self, env: dict[str, str]) -> dict[str, str]:
        """The child's temp dir is its own folder, removed by :meth:`stop`: what it leaves
        there when killed (vLLM's single-process ``FileStore`` rendezvous file,
        ``vllm_dist_<uuid>``, one per start) goes with it. torch's compile cache, which lives
        under the temp dir by default, stays where it was (a user's setting kept), so a new
        engine does not compile again."""
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        out = {"TMPDIR": str(self._tmp)}
        if "TORCHINDUCTOR_CACHE_DIR" not in env:
            out["TORCHINDUCTOR_CACHE_DIR"] = default_cache_dir()
        return out

    def start(self) -> str:
        """Start the child and wait (``rollout.engine_startup_timeout_s``) until it serves."""
        import requests

        ready = self._tmp / "ready.json"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
        rc = self.cfg.rollout
        env = openmp.child_env(rc.engine_openmp, rc.engine, self.device, env)
        env.update(self._temp_env(env))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(ready),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # its own process group (Ctrl-C goes to sr1, not it) in sr1's session: when
                # sr1 dies, a group left stopped (pause) is orphaned, and the kernel sends it
                # SIGHUP + SIGCONT, so the pending PR_SET_PDEATHSIG SIGTERM is not stuck
                process_group=0,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        with _LIVE_LOCK:
            _LIVE.add(self)
        deadline = time.monotonic() + self.cfg.rollout.engine_startup_timeout_s
        try:
            while True:
                died = self.death("start-up", wait_s=0.0)
                if died is not None:
                    raise died
                if ready.is_file():
                    url = json.loads(ready.read_text())["url"]
                    with contextlib.suppress(requests.RequestException):
                        if requests.get(url + "/health", timeout=5).ok:
                            self.url = url
                            return url
                if time.monotonic() > deadline:
                    raise EngineError(
                        f"the engine process (pid {self.pid}) did not answer /health within "
                        f"{self.cfg.rollout.engine_startup_timeout_s:.0f} s; last lines of "
                        f"{self.log_path}:\n{_tail(self.log_path)}",
                        hint="raise rollout.engine_startup_timeout_s",
                    )
                time.sleep(0.25)
        except BaseException:
            self.stop(keep_log=True)
            raise

    def death(self, during: str, wait_s: float = 5.0) -> EngineDied | None:
        """An :class:`EngineDied` saying what happened if the child has exited (waiting up to
        ``wait_s`` for a dying one), else None."""
        if self.proc is None:
            return None
        try:
            code = self.proc.wait(timeout=wait_s) if wait_s > 0 else self.proc.poll()
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            return None
        tail = _tail(self.log_path)
        msg = (
            f"the rollout engine process (`sr1 serve engine --engine {self.cfg.rollout.engine}`"
            f", pid {self.proc.pid}) {_exit_words(code)} during {during}"
        )
        if tail:
            msg += f"; last lines of its log {self.log_path}:\n{tail}"
        else:
            msg += f" (its log {self.log_path} is empty)"
        return EngineDied(msg, code, tail)

    def pause(self, wait_s: float = 5.0) -> None:
        """Freeze the child's process group (SIGSTOP): it keeps its memory and sockets but
        takes no CPU until :meth:`resume`. Returns once the child has stopped (a signal is
        delivered when its target next runs), within ``wait_s``. A child that has exited is
        left as it is."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGSTOP)
            self.frozen = True
        if self.frozen:  # stopped (or exited meanwhile)
            _reported(p, os.WSTOPPED | os.WEXITED, wait_s, poll_s=0.001)

    def resume(self) -> None:
        """Continue a group :meth:`pause` froze (SIGCONT); idempotent."""
        if self.proc is not None and self.frozen:
            self.frozen = False
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGCONT)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The child frozen for the block and continued however it ends (an exception,
        Ctrl-C). Nothing may talk to the server inside it: a request would wait for the
        block's end."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def stop(self, grace_s: float = 5.0, keep_log: bool = False) -> None:
        """SIGTERM the child's process group, SIGKILL it after ``grace_s``; idempotent. Its
        temporary folder (config, ready file, and the log unless ``log_path`` is elsewhere) is
        removed, except when the child died on its own or ``keep_log``: an error quotes it."""
        with _LIVE_LOCK:
            _LIVE.discard(self)
        p = self.proc
        self.resume()  # a frozen process would hold SIGTERM pending, and its grace with it
        # a child that exited on its own with an error keeps its folder: its log is quoted in
        # the error the caller shows; one we stop (or that finished cleanly) leaves nothing
        died_on_its_own = p is not None and p.poll() not in (None, 0)
        if p is not None and p.poll() is None:
            exited = False
            for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, sig)
                if _exited(p, wait):
                    exited = True
                    break
            if exited and p.returncode is None:
                # dead but not yet reaped, so its pid is still its own: a child killed by a
                # signal leaves libiomp5's /dev/shm registration behind
                openmp.forget_registration(p.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5.0)
        if p is not None:  # the group may outlive its leader (workers it started)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        ready = self._tmp / "ready.json"
        with contextlib.suppress(OSError):
            ready.unlink()
        log_inside = self._tmp in self.log_path.parents
        if not (log_inside and (died_on_its_own or keep_log)):
            shutil.rmtree(self._tmp, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While sr1 owns a child process, SIGTERM (default: die at once, skipping cleanup) raises
    KeyboardInterrupt instead, so the child is stopped on the way out. A handler someone else
    installed is left alone; outside the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        from sr1.tracking.run import SignalInterrupt

        raise SignalInterrupt(signum)

    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def shared_engines() -> Iterator[None]:
    """Within this block, an engine process that ``rollout.placement=process`` starts is kept
    when its user is done, and the next :func:`open_engine` that would start one with the same
    server settings (engine, device, dtype, architecture, context, KV cache, weight sync)
    reuses it, loading its own checkpoint or pushing its weights as usual. ``sr1 quickstart``
    runs its evaluations and RL stages in one such block: one engine start-up (~20 s on 2 CPU
    cores) instead of one per stage. The saved run configs are unchanged (placement=process),
    so a resumed run starts its own. Every kept process is stopped when the block ends,
    however it ends. Not re-entrant."""
    global _POOL
    if _POOL is not None:
        raise RuntimeError("shared_engines() is already active")
    _POOL = {}
    try:
        yield
    finally:
        pool, _POOL = _POOL, None
        for proc in pool.values():
            proc.stop()


def _pool_key(path: str, rc: RolloutConfig, cfg: ExperimentConfig, device: str, dtype: str) -> str:
    """What an engine server is fixed to at start-up; requests and weights vary freely. The
    architecture (the model's config.json without its name) rather than the path: a
    fine-tuned checkpoint of the same base reuses the base's server."""
    from transformers import AutoConfig

    from sr1 import models

    arch = AutoConfig.from_pretrained(
        path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    ).to_diff_dict()
    arch.pop("_name_or_path", None)
    arch.pop("transformers_version", None)
    dev = models.pick_device(device)
    server = {
        "engine": rc.engine,
        "device": dev,
        "dtype": str(models.pick_dtype(dtype, dev)),
        "context": rc.max_prompt_length + rc.max_total_response_length,
        "kv_cache_gib": rc.vllm_kv_cache_gib,
        "gpu_memory_utilization": rc.vllm_gpu_memory_utilization,
        "weight_sync": rc.weight_sync,
        "hf_kv_reuse": rc.hf_kv_reuse,
        "intel_openmp": openmp.wants_intel(rc.engine_openmp, rc.engine, dev),
        "revision": cfg.model.revision,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    return json.dumps({"arch": arch, "server": server}, sort_keys=True, default=str)


@contextlib.contextmanager
def open_engine(
    cfg: ExperimentConfig,
    model: str | torch.nn.Module,
    tokenizer: Any,
    *,
    rollout: RolloutConfig | None = None,
    device: str | None = None,
    dtype: str | None = None,
    weights: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None,
    version: int = 0,
    log_dir: str | Path | None = None,
    send: bool = True,
) -> Iterator[Any]:
    """The engine for ``cfg.rollout`` (``rollout`` overrides it), closed on exit.

    ``model`` is a path/alias (eval, rollout) or the trainer's module. ``weights()`` (the
    trainer's full weights) are pushed to an engine outside this process before use, as policy
    ``version``; without it a served model that is not ``model`` gets ``model``'s checkpoint
    files. ``log_dir`` holds the child's ``engine.log`` (placement=process). ``send=False``
    (data-parallel ranks other than the first sharing one server): ``weights()`` is iterated
    (FSDP gathers are collectives) but not sent.
    """
    from sr1 import models
    from sr1.rollout.engines import make_engine

    rc = rollout or cfg.rollout
    device = device or cfg.model.device
    dtype = dtype or cfg.model.dtype
    if not rc.engine_url and rc.placement == "inprocess":
        engine = make_engine(rc.engine, model, tokenizer, rc, device=device, dtype=dtype)
        engine.version = int(version)
        try:
            yield engine
        finally:
            with contextlib.suppress(Exception):
                getattr(engine, "close", lambda: None)()
        return
    if isinstance(model, torch.nn.Module):
        path = getattr(model, "name_or_path", None) or model.config._name_or_path
    else:
        path = models.resolve(model)
    proc: EngineProcess | None = None
    shared = False  # a server that may hold other weights than ``path``'s
    with contextlib.ExitStack() as stack:
        if not rc.engine_url:
            stack.enter_context(_sigterm_unwinds())
            edev = rc.engine_device or device
            pool = _POOL
            key = _pool_key(path, rc, cfg, edev, dtype) if pool is not None else ""
            proc = pool.get(key) if pool is not None else None
            if proc is not None and proc.death("reuse", wait_s=0.0) is None and proc.url:
                url, shared = proc.url, True
            else:
                if proc is not None:  # a kept one that died: replaced (its folder cleaned)
                    proc.stop()
                log = Path(log_dir) / "engine.log" if log_dir else None
                proc = EngineProcess(path, cfg, log, device=edev, dtype=dtype)
                if pool is not None:
                    pool[key] = proc  # stopped when shared_engines() ends
                else:
                    stack.callback(proc.stop)
                url = proc.start()
        else:
            url, shared = rc.engine_url, True
        engine = RemoteEngine(url, tokenizer, rc, process=proc)
        stack.callback(engine.close)
        if weights is not None and send:
            engine.update_weights(weights(), version)
        elif weights is not None:
            for _ in weights():
                pass
            engine.version = int(version)
        elif shared and not engine.serves(path):
            engine.load_checkpoint(path, version)
        yield engine


def engine_dtype_report(cfg: ExperimentConfig) -> dict[str, Any]:
    """The weights dtype an engine that loads its own model (eval, rollout, vLLM or any engine
    outside the trainer's process) runs: :func:`sr1.models.dtype_report` of ``model.dtype`` on
    the engine's device (``rollout.engine_device`` for placement=process), not the training
    dtype (``auto`` is bf16 on a CPU that runs it natively, where sr1 train and sr1 sft keep
    fp32 weights). A served engine (``rollout.engine_url``) decides its own: recorded as such.
    """
    from sr1.models import dtype_report

    rc = cfg.rollout
    if rc.engine_url:
        return {"requested": cfg.model.dtype, "resolved": None, "engine_url": rc.engine_url}
    return dtype_report(cfg.model.dtype, engine_device(cfg))


def engine_device(cfg: ExperimentConfig) -> str:
    """The device an engine sr1 runs itself is on: ``rollout.engine_device`` for
    placement=process, else the command's."""
    rc = cfg.rollout
    if rc.placement == "process" and rc.engine_device:
        return rc.engine_device
    return cfg.model.device


def engine_openmp_report(cfg: ExperimentConfig) -> str | None:
    """The OpenMP runtime the rollout engine runs (:mod:`sr1.rollout.openmp`): ``intel`` when
    the engine process sr1 starts preloads libiomp5 (``rollout.engine_openmp``), else the
    runtime of this process (an in-process engine's, and what a child inherits); None for a
    served engine (``rollout.engine_url``: its ``/health`` says)."""
    rc = cfg.rollout
    if rc.engine_url:
        return None
    if rc.placement == "process" and openmp.wants_intel(
        rc.engine_openmp, rc.engine, engine_device(cfg)
    ):
        return "intel"
    return openmp.loaded_runtime()


def engine_died_hint(e: EngineError, run_id: str) -> Sr1Error:
    """``e`` re-raised for a train run: the last checkpoint is kept, ``--resume`` continues."""
    return Sr1Error(
        str(e),
        hint=f"the run's last checkpoint is intact; continue with `sr1 train --resume {run_id}`",
    )


__all__ = [
    "EngineDied",
    "EngineError",
    "EngineProcess",
    "engine_device",
    "engine_dtype_report",
    "engine_openmp_report",
    "open_engine",
]
