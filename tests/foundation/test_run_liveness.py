"""Dead runs: a run whose process is gone reads ``dead``, not ``running`` forever.

A real subprocess opens a run (``start_run``) and is SIGKILLed, so nothing in it gets to mark
the run; the store must then report it dead by its recorded pid. Runs recorded on another host
are judged by their heartbeat instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sr1.errors import Sr1Error
from sr1.tracking import store as store_mod
from sr1.tracking.run import start_run
from sr1.tracking.store import Store

HOLD_A_RUN = """
import sys, time
from sr1.tracking.run import start_run
with start_run("train", name="victim", use_mlflow=False) as run:
    print(run.run_id, flush=True)
    time.sleep(600)
"""


def test_sigkilled_run_reads_dead_and_can_be_resumed(sr1_home: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_RUN], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        rid = proc.stdout.readline().strip()
        assert rid.startswith("train-"), rid
        run = Store().get_run(rid)
        assert run["status"] == "running" and run["pid"] == proc.pid
        assert run["host"] and run["heartbeat_at"] is not None
        # a live run cannot be resumed by a second process
        with pytest.raises(Sr1Error, match="still running"), start_run("train", resume=rid):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    run = Store().get_run(rid)
    assert run["status"] == "dead" and run["stored_status"] == "running"
    assert f"process {proc.pid}" in run["status_reason"]
    assert [r["status"] for r in Store().list_runs("train")] == ["dead"]
    from sr1.cli.main import app

    listed = CliRunner().invoke(app, ["runs", "list", "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout)[0]["status"] == "dead"
    # once dead it may be resumed: this process owns it now, and it finishes normally
    with start_run("train", resume=rid, use_mlflow=False) as r:
        assert Store().get_run(rid)["status"] == "running" and r.run_id == rid
    after = Store().get_run(rid)
    assert after["status"] == "finished" and after["pid"] == os.getpid()


def test_run_on_another_host_is_judged_by_its_heartbeat(sr1_home: Path) -> None:
    store = Store()
    with start_run("eval", name="elsewhere", use_mlflow=False) as run:
        rid = run.run_id
        with store.connect() as con:  # as if another machine had written the row
            con.execute(
                "UPDATE runs SET host = 'node-7', host_id = 'other-boot/pid:[1]', pid = 1"
                " WHERE run_id = ?",
                [rid],
            )
        assert store.get_run(rid)["status"] == "running"  # fresh heartbeat
        old = store_mod._now() - timedelta(seconds=store_mod.STALE_AFTER_S + 60)
        with store.connect() as con:
            con.execute("UPDATE runs SET heartbeat_at = ? WHERE run_id = ?", [old, rid])
        got = store.get_run(rid)
        assert got["status"] == "dead" and "no heartbeat from node-7" in got["status_reason"]
        run.log_metrics(0, {"x": 1.0})  # a step's metrics are a heartbeat
        assert store.get_run(rid)["status"] == "running"


def test_reused_pid_is_not_taken_for_the_run(sr1_home: Path) -> None:
    """Same host, pid alive but started at another time (the pid was reused): dead."""
    store = Store()
    with start_run("train", name="reused", use_mlflow=False) as run:
        rid = run.run_id
        with store.connect() as con:
            con.execute("UPDATE runs SET pid_started = pid_started - 3600 WHERE run_id = ?", [rid])
        assert store.get_run(rid)["status"] == "dead"
