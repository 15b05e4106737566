"""Freezing the engine process during the trainer's update (``EngineProcess.paused``,
``rollout.engine_pause``), with a real ``sr1 serve engine`` child (the HF engine on
tiny-qwen2): frozen means it answers nothing until continued, and a client's connection outlives the
freeze; a stop of a frozen engine still
lets it shut down by SIGTERM; and an engine left frozen by an sr1 that was SIGKILLed exits
by itself (the kernel continues an orphaned stopped group). The train loop's use of it is in
tests/train/test_async.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from sr1.config import resolve_config
from sr1.rollout.placement import EngineProcess

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc")

SETS = ["rollout.placement=process", "model.device=cpu", "rollout.engine=hf"]


def _state(pid: int) -> str:
    """R running, S sleeping, T stopped, Z exited and not yet reaped; "gone" without /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _get_health(sock: socket.socket) -> bytes:
    """GET /health on an open keep-alive connection; the whole response (b"" if closed)."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: engine\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(ln.split(b":", 1)[1])
        for ln in head.split(b"\r\n")
        if ln.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return data


def test_a_paused_engine_answers_nothing_until_continued(tiny_qwen2: str) -> None:
    proc = EngineProcess(tiny_qwen2, resolve_config(overrides=SETS))
    try:
        url = proc.start()
        assert proc.pid is not None and os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
        assert os.getsid(proc.pid) == os.getsid(0)  # sr1's session (see the orphan test)
        with proc.paused():
            assert _state(proc.pid) == "T" and proc.frozen
            with pytest.raises(requests.Timeout):
                requests.get(url + "/health", timeout=1.0)
        assert _state(proc.pid) in ("R", "S") and not proc.frozen
        assert requests.get(url + "/health", timeout=10).ok
        with pytest.raises(RuntimeError, match="boom"), proc.paused():  # continued on errors
            raise RuntimeError("boom")
        assert _state(proc.pid) in ("R", "S")
        proc.resume()  # idempotent
        # the client's pooled connection survives a freeze longer than uvicorn's default
        # keep-alive (5 s): continued, the server must not close it (the trainer's next
        # request would race that close: "connection reset")
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            assert _get_health(sock).startswith(b"HTTP/1.1 200")
            with proc.paused():
                time.sleep(6.0)
            time.sleep(0.5)  # a server that closes idle connections has done it by now
            assert _get_health(sock).startswith(b"HTTP/1.1 200")
        # a stop of a frozen engine continues it first: it shuts down on SIGTERM within the
        # grace (exit 143), not by the SIGKILL that would follow
        proc.pause()
        t0 = time.monotonic()
        proc.stop(grace_s=20.0)
        assert proc.proc is not None and proc.proc.returncode == 128 + signal.SIGTERM
        assert time.monotonic() - t0 < 20.0
        assert not proc._tmp.exists()
    finally:
        proc.stop()


PARENT = """
import json, sys, time
from sr1.config import resolve_config
from sr1.rollout.placement import EngineProcess
proc = EngineProcess(sys.argv[1], resolve_config(overrides=sys.argv[2:]))
proc.start()
proc.pause()
print(json.dumps({"pid": proc.pid, "tmp": str(proc._tmp)}), flush=True)
time.sleep(600)
"""


def test_an_engine_frozen_when_sr1_is_killed_exits(tiny_qwen2: str, tmp_path: Path) -> None:
    """sr1 SIGKILLed while its engine is frozen (no cleanup runs). PR_SET_PDEATHSIG's SIGTERM
    waits while a process is stopped; the engine's group is in sr1's session, so its
    parent's death orphans it and the kernel sends SIGHUP + SIGCONT: it exits. (In a session
    of its own, as before, it stayed stopped forever, holding its memory.)"""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, tiny_qwen2, *SETS],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, TMPDIR=str(tmp_path)),
    )
    info: dict = {}
    try:
        info = json.loads(parent.stdout.readline())  # type: ignore[union-attr]
        pid = info["pid"]
        assert _state(pid) == "T"
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _state(pid) not in ("Z", "gone") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _state(pid) in ("Z", "gone"), f"the orphaned engine is still {_state(pid)}"
    finally:
        if parent.poll() is None:
            parent.kill()
        if "pid" in info and _state(info["pid"]) not in ("Z", "gone"):
            os.killpg(info["pid"], signal.SIGKILL)  # do not leave a frozen process behind
        if "tmp" in info:
            shutil.rmtree(info["tmp"], ignore_errors=True)
