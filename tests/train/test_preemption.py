"""Preemption: real `sr1 train` processes on tiny-qwen2 are sent SIGTERM or SIGKILL mid-run and
resumed; the run's status, its checkpoints and MLflow's metric history must come out right.

Each test starts `sr1 train` (the CLI's ``main``) as a subprocess on a real BM25 index and a
prepared dataset in the test's SR1_HOME. The SIGTERM test watches the real DuckDB store (under
its file lock) to know a step is done and then signals it; the SIGKILL tests have the process
kill itself at an exact point (after a step's metrics are stored; between a checkpoint and its
MLflow commit) so the case is the same every time. The resume then runs the same CLI entry point
in this process. MLflow is the real sqlite store in that SR1_HOME; "each step exactly once" is
read back with ``MlflowClient.get_metric_history``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sr1.tracking.store import Store

from .helpers import QUESTIONS, build_tiny_index

SETS = [
    "model.device=cpu", "rollout.n_samples=2", "rollout.max_turns=1",
    "rollout.max_response_length=4", "rollout.max_total_response_length=24",
    "rollout.max_obs_length=12", "rollout.max_prompt_length=24", "rollout.topk=1",
    "trainer.prompts_per_step=2", "trainer.mini_batch_size=4", "trainer.micro_batch_size=4",
    "trainer.lr=1e-3", "algorithm.kl_coef=0", "tracking.experiment=sr1-test",
    "data.train_datasets=[nq]",
]  # fmt: skip
KEY = "reward/mean"  # a metric every step logs

torch.set_num_threads(1)  # the in-process resume


@pytest.fixture
def world(tiny_qwen2: str, tmp_path: Path, sr1_home: Path) -> dict:
    """A BM25 index and an `nq` train split (FlashRAG jsonl) in this test's SR1_HOME."""
    index = build_tiny_index(tmp_path)
    src = tmp_path / "src" / "nq"
    src.mkdir(parents=True)
    with (src / "train.jsonl").open("w") as f:
        for i, q, gold in QUESTIONS:
            f.write(json.dumps({"id": i, "question": q, "golden_answers": gold}) + "\n")
    sets = [*SETS, f"retrieval.index={index}", f"data.source_dir={src.parent}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return {"model": tiny_qwen2, "sets": sets, "env": env, "home": sr1_home}


def _train(world: dict, max_steps: int, *sets: str, pre: str = "") -> subprocess.Popen:
    """`sr1 train ... --set ...` as a subprocess (``pre``: Python run first, to inject a fault)."""
    argv = ["train", "--algo", "grpo", "--model", world["model"], "--max-steps", str(max_steps)]
    argv += [a for s in [*world["sets"], *sets] for a in ("--set", s)]
    code = f"import sys\n{pre}\nfrom sr1.cli.main import main\nsys.exit(main({argv!r}))"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=world["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _resume(run_id: str, max_steps: int) -> int:
    """`sr1 train --resume RUN_ID` through the CLI's entry point, in this process (saves a
    second interpreter start-up; the CLI, trainer and stores are the same code)."""
    from sr1.cli.main import main

    return main(["train", "--resume", run_id, "--max-steps", str(max_steps)])


def _wait(cond, proc: subprocess.Popen, what: str, timeout: float = 150.0):
    """Poll ``cond()`` until it returns something truthy; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"sr1 exited {proc.returncode} before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)  # each poll takes the store's lock for a moment


def _run_id(home: Path) -> str | None:
    runs = sorted((home / "runs").glob("train-*")) if (home / "runs").is_dir() else []
    return runs[0].name if runs else None


def _logged_steps(run_id: str) -> set[int]:
    return {m["step"] for m in Store().step_metrics(run_id) if m["key"] == KEY}


def _mlflow(home: Path, run_id: str) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    return client, client.get_run(Store().get_run(run_id)["mlflow_run_id"])


def _mlflow_steps(home: Path, run_id: str) -> dict[str, list[int]]:
    """Every metric's logged steps in MLflow, as a sorted list (repeats kept)."""
    client, ml = _mlflow(home, run_id)
    return {
        k: sorted(m.step for m in client.get_metric_history(ml.info.run_id, k))
        for k in ml.data.metrics
    }


def _assert_each_step_once(home: Path, run_id: str, last: int) -> None:
    hist = _mlflow_steps(home, run_id)
    assert KEY in hist and len(hist) > 20  # all the step metrics, not just one
    for k, steps in hist.items():
        assert steps == list(range(1, last + 1)), (k, steps)


def test_sigterm_checkpoints_marks_interrupted_and_resumes(
    world: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    home = world["home"]
    # save_every is large: the checkpoint that SIGTERM leaves is the one the signal forced
    proc = _train(world, 40, "trainer.save_every=100")
    rid = _wait(lambda: _run_id(home), proc, "the run was created")
    _wait(lambda: _logged_steps(rid), proc, "step 1 was logged")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted:")]
    assert len(lines) == 1 and f"sr1 train --resume {rid}" in lines[0], err[-3000:]
    run = Store().get_run(rid)
    assert run["status"] == "interrupted"
    stopped = run["params"]["interrupted_at_step"]
    assert 1 <= stopped < 40 and f"after step {stopped}; checkpoint" in lines[0]
    ckpts = home / "runs" / rid / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step-{stopped}"]  # no tmp, no final
    assert _logged_steps(rid) == set(range(1, stopped + 1))
    _assert_each_step_once(home, rid, stopped)  # what the checkpoint covers, once

    assert _resume(rid, stopped + 2) == 0, capsys.readouterr().err[-3000:]
    assert Store().get_run(rid)["status"] == "finished"
    assert _logged_steps(rid) == set(range(1, stopped + 3))
    _assert_each_step_once(home, rid, stopped + 2)
    assert (ckpts / "final" / "trainer_state.pt").is_file()


# SIGKILL right after step 3's metrics reached DuckDB; step-2 is the newest checkpoint
KILL_AFTER_STEP_3 = """
import os, signal
from sr1.tracking.store import Store
_real = Store.log_step_metrics
def log_step_metrics(self, run_id, step, metrics):
    _real(self, run_id, step, metrics)
    if step == 3:
        os.kill(os.getpid(), signal.SIGKILL)
Store.log_step_metrics = log_step_metrics
"""


def test_sigkill_reads_dead_and_resume_logs_each_step_once(world: dict, capsys) -> None:
    home = world["home"]
    proc = _train(world, 40, "trainer.save_every=2", pre=KILL_AFTER_STEP_3)
    proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL
    rid = _run_id(home)
    run = Store().get_run(rid)
    assert run["status"] == "dead" and run["stored_status"] == "running"
    assert f"process {run['pid']}" in run["status_reason"]
    assert _logged_steps(rid) == {1, 2, 3}  # DuckDB has step 3, past the checkpoint...
    ckpts = home / "runs" / rid / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2"]
    _assert_each_step_once(home, rid, 2)  # ...MLflow only what the checkpoint covers

    assert _resume(rid, 4) == 0, capsys.readouterr().err[-3000:]
    assert Store().get_run(rid)["status"] == "finished"
    _assert_each_step_once(home, rid, 4)  # step 3 once: the resumed run's
    client, ml = _mlflow(home, rid)
    got = {m.step: m.value for m in client.get_metric_history(ml.info.run_id, "time/step_s")}
    db = {m["step"]: m["value"] for m in Store().step_metrics(rid) if m["key"] == "time/step_s"}
    assert got == db  # the values after the resume are the resumed run's, in both stores


# SIGKILL right after step-2 is saved, before its metrics were sent to MLflow
KILL_BEFORE_COMMIT_2 = """
import os, signal
from sr1.tracking import run as R
_real = R.RunContext.commit_metrics
def commit(self, upto=None):
    if upto == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(self, upto)
R.RunContext.commit_metrics = commit
"""


def test_kill_between_checkpoint_and_mlflow_commit_is_refilled_on_resume(
    world: dict, capsys
) -> None:
    home = world["home"]
    proc = _train(world, 40, "trainer.save_every=2", pre=KILL_BEFORE_COMMIT_2)
    proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL
    rid = _run_id(home)
    assert Store().get_run(rid)["status"] == "dead"
    assert (home / "runs" / rid / "checkpoints" / "step-2" / "trainer_state.pt").is_file()
    assert _mlflow_steps(home, rid).get(KEY, []) == []  # nothing reached MLflow
    assert _resume(rid, 3) == 0, capsys.readouterr().err[-3000:]
    _assert_each_step_once(home, rid, 3)  # steps 1-2 sent from DuckDB, step 3 by the resume


def test_sft_sigterm_saves_a_step_checkpoint_and_exits_143(tiny_qwen2: str, tmp_path, monkeypatch):
    """SFT: SIGTERM during the first update finishes it, saves checkpoints/step-1 (a partial
    model is never called final), marks the run interrupted; the handlers are restored."""
    from sr1.models import load_tokenizer
    from sr1.tracking.run import RunInterrupted
    from sr1.train import sft as sft_mod

    from .helpers import rows, tiny_cfg

    index = build_tiny_index(tmp_path)
    cfg = tiny_cfg("grpo", "trainer.sft_epochs=3", "trainer.sft_examples=4")
    real = sft_mod.response_forward
    calls = []

    def forward_then_sigterm(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the job is preempted mid-update
        return real(*a, **k)

    monkeypatch.setattr(sft_mod, "response_forward", forward_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted) as info:
        sft_mod.sft(cfg, tiny_qwen2, index, progress=False, rows=rows(load_tokenizer(tiny_qwen2)))
    e = info.value
    assert e.exit_code == 143 and e.kind == "sft" and e.step == 1
    assert e.checkpoint.endswith("step-1") and Path(e.checkpoint, "config.json").is_file()
    assert "does not resume" in str(e) and len(e.result["steps"]) == 1
    assert Store().get_run(e.run_id)["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is before


def test_eval_sigterm_exits_143_and_the_rerun_finishes_it(world: dict, capsys, monkeypatch):
    """`sr1 eval`: SIGTERM after the first stored batch interrupts the run (exit 143, one
    `interrupted:` line); running the same command again resumes it, each example once."""
    from sr1.cli.main import main
    from sr1.tracking import store as store_mod

    src = Path(next(s for s in world["sets"] if s.startswith("data.source_dir=")).split("=", 1)[1])
    (src / "nq" / "test.jsonl").write_text((src / "nq" / "train.jsonl").read_text())
    argv = ["eval", "--dataset", "nq", "--model", world["model"], "--method", "direct",
            "--source-dir", str(src), "--limit", "4", "--set", "eval.batch_size=2",
            "--set", "eval.max_new_tokens=4", "--set", "model.device=cpu"]  # fmt: skip
    real = store_mod.Store.add_eval_results

    def add_then_sigterm(self, run_id, rows):
        real(self, run_id, rows)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(store_mod.Store, "add_eval_results", add_then_sigterm)
    assert main(argv) == 143
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted:")]
    assert len(lines) == 1 and "sr1 eval --resume" in lines[0], err[-2000:]
    (run,) = Store().list_runs("eval")
    assert run["status"] == "interrupted"
    assert len(Store().eval_results([run["run_id"]])) == 2  # the stored batch survived
    monkeypatch.setattr(store_mod.Store, "add_eval_results", real)
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    assert Store().get_run(run["run_id"])["status"] == "finished"
    ids = [r["example_id"] for r in Store().eval_results([run["run_id"]])]
    assert sorted(ids) == ["q0", "q1", "q2", "q3"]
