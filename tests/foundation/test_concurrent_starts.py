"""sr1 commands started at the same moment on a fresh SR1_HOME all succeed.

Before the file locks (:mod:`sr1.locks`), one of two simultaneous ``sr1 eval`` died in MLflow's
sqlite table creation ("table experiments already exists"), 4 times out of 4. Now MLflow's store
set-up and every DuckDB connection (migrations included) run under ``fcntl.flock`` locks in the
home. The tests start real processes together and check both stores afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sr1.locks import LockTimeout, file_lock
from tests.train.helpers import QUESTIONS


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ, SR1_HOME=str(home), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _mlflow_runs(home: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sr1")
    assert exp is not None
    return client.search_runs([exp.experiment_id])


# -- the lock itself -----------------------------------------------------------------------------
def test_lock_is_reentrant_and_serialises_threads(tmp_path: Path) -> None:
    lock = tmp_path / "a.lock"
    inside: list[int] = []
    overlap: list[bool] = []

    def worker(i: int) -> None:
        with file_lock(lock), file_lock(lock):  # nested in one thread: no self-deadlock
            inside.append(i)
            overlap.append(len(inside) > 1)
            time.sleep(0.02)
            inside.remove(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlap == [False] * 4


def test_a_forked_child_does_not_inherit_the_lock(tmp_path: Path) -> None:
    lock = tmp_path / "f.lock"
    with file_lock(lock):
        pid = os.fork()
        if pid == 0:  # the child: the parent holds the lock, so this must time out
            try:
                with file_lock(lock, timeout=0.2):
                    os._exit(1)
            except LockTimeout:
                os._exit(0)
            os._exit(2)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with file_lock(lock, timeout=1):  # and the parent's release was real
        pass


def test_lock_held_by_another_process_times_out_naming_the_file(tmp_path: Path) -> None:
    lock = tmp_path / "held.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"f = open({str(lock)!r}, 'w'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('held', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(LockTimeout) as e, file_lock(lock, timeout=0.3, what="a test store"):
            pass
        assert 0.25 < time.monotonic() - t0 < 5
        assert str(lock) in str(e.value) and "a test store" in str(e.value)
        assert e.value.exit_code == 2
    finally:
        holder.kill()
        holder.wait()
    with file_lock(lock, timeout=5):  # the kernel released it with the holder
        pass


# -- start_run in several processes released at one instant, on three fresh homes ---------------
_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    # the slow imports happen before the start line (MLflow imports its sqlite store lazily)
    import mlflow.store.tracking.sqlalchemy_store, mlflow.tracking
    from sr1.tracking.run import start_run
    sync, name, homes = sys.argv[1], sys.argv[2], sys.argv[3:]
    open(os.path.join(sync, f"ready-{name}"), "w").close()
    for k, home in enumerate(homes):
        while not os.path.exists(os.path.join(sync, f"go-{k}")):
            time.sleep(0.001)
        os.environ["SR1_HOME"] = home
        with start_run("eval", name=name, config={"who": name}) as run:
            run.log_metrics(0, {"x": 1.0})
        print(json.dumps([k, run.run_id, run.mlflow_run_id]), flush=True)
        open(os.path.join(sync, f"done-{k}-{name}"), "w").close()
    """
)


def _wait_for(paths_: list[Path], procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths_):
        if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
            return  # a worker failed or hangs: the assertions below say which
        time.sleep(0.01)


def test_processes_starting_runs_at_one_instant_all_succeed(tmp_path: Path) -> None:
    """3 processes, each opening a run in both stores at the same instant on a fresh home; the
    race is repeated on 3 fresh homes by the same processes (imports are the slow part)."""
    n, rounds = 3, 3
    sync = tmp_path / "sync"
    sync.mkdir()
    homes = [tmp_path / f"home{k}" for k in range(rounds)]
    names = [f"p{i}" for i in range(n)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(sync), name, *map(str, homes)],
            env=_env(homes[0]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    _wait_for([sync / f"ready-{m}" for m in names], procs, 120)
    for k in range(rounds):
        (sync / f"go-{k}").touch()
        _wait_for([sync / f"done-{k}-{m}" for m in names], procs, 120)
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(line) for out, _ in outs for line in out.splitlines()]
    from sr1.tracking.store import Store

    for k, home in enumerate(homes):
        ids = {rid for kk, rid, _ in results if kk == k}
        assert len(ids) == n
        runs = {r["run_id"]: r for r in Store(home / "sr1.duckdb").list_runs()}
        assert set(runs) == ids and all(r["status"] == "finished" for r in runs.values())
        ml = _mlflow_runs(home)
        assert {r.data.tags["sr1.run_id"] for r in ml} == ids
        assert {r.info.run_id for r in ml} == {mid for kk, _, mid in results if kk == k}
        assert all(r.info.status == "FINISHED" for r in ml)


# -- the real CLI: two `sr1 eval` started together ------------------------------------------------
@pytest.mark.slow
def test_two_evals_started_together_on_a_fresh_home(
    tiny_qwen2: str, sr1_home: Path, tmp_path: Path
) -> None:
    """The reported failure, through the real CLI (~25 s on 2 idle cores: two processes importing
    torch, transformers and MLflow). The 3-fold repetition is the start_run test's above."""
    src = tmp_path / "src"
    (src / "nq").mkdir(parents=True)
    i, q, g = QUESTIONS[0]
    (src / "nq" / "dev.jsonl").write_text(
        json.dumps({"id": i, "question": q, "golden_answers": g}) + "\n"
    )
    assert not sr1_home.exists()  # a fresh home: no stores yet
    cmd = [
        sys.executable, "-m", "sr1.cli.main", "eval", "--dataset", "nq", "--split", "dev",
        "--source-dir", str(src), "--model", tiny_qwen2, "--method", "direct", "--limit", "1",
        # --fresh: two runs even though the requests are identical (no automatic resume)
        "--fresh", "--json", "--set", "model.device=cpu", "--set", "eval.max_new_tokens=4",
    ]  # fmt: skip
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            cmd, env=_env(sr1_home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    print(f"both evals done in {time.monotonic() - t0:.1f} s")
    ids = {json.loads(out)["run_id"] for out, _ in outs}
    assert len(ids) == 2

    from sr1.tracking.store import Store

    store = Store()
    runs = {r["run_id"]: r for r in store.list_runs(kind="eval")}
    assert set(runs) == ids and all(r["status"] == "finished" for r in runs.values())
    assert len(store.eval_results(sorted(ids))) == 2
    ml = _mlflow_runs(sr1_home)
    assert {r.data.tags["sr1.run_id"] for r in ml} == ids
    assert {r.info.run_id for r in ml} == {runs[i]["mlflow_run_id"] for i in ids}
    assert all(r.info.status == "FINISHED" for r in ml)
