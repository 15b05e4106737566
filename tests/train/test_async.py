"""Training with the rollout engine outside the trainer: versions, one-step-off async, an engine
process that dies mid-run, and `sr1 serve engine` driving `sr1 train` and `sr1 eval`.

Real pieces throughout: tiny-qwen2, the real BM25 index (tests/train/helpers.py), `sr1 serve
engine` child processes (tests/engine_fixtures.py; vLLM when installed for the end-to-end test,
HF otherwise), real DuckDB/MLflow stores.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sr1.cli.main import app
from sr1.errors import ConfigError, Sr1Error
from sr1.models import load_tokenizer
from sr1.rollout import placement
from sr1.tracking.store import Store
from sr1.train import trainer as trainer_mod
from sr1.train.trainer import train

from .helpers import build_tiny_index, rows, tiny_cfg

torch.set_num_threads(1)


@pytest.fixture
def setup(tiny_qwen2, tmp_path):
    index = build_tiny_index(tmp_path)
    return f"retrieval.index={index}", rows(load_tokenizer(tiny_qwen2))


@pytest.fixture
def seen(monkeypatch):
    """Per step: the trainer's version, the batch's policy versions, and whether the old
    log-probs were recomputed (not the update's own forward)."""
    out: list[dict] = []
    real = trainer_mod.RLTrainer.prepare_batch

    def spy(self, trajs):
        batch = real(self, trajs)
        out.append(
            {
                "trainer": self.global_step,
                "versions": sorted({t.policy_version for t in trajs}),
                "recomputed": batch.old_logprobs is not None,
            }
        )
        return batch

    monkeypatch.setattr(trainer_mod.RLTrainer, "prepare_batch", spy)
    return out


def test_async_refuses_an_in_process_engine(tiny_qwen2, setup) -> None:
    index, data = setup
    cfg = tiny_cfg("grpo", index, "trainer.async_steps=1")
    with pytest.raises(ConfigError, match="async_steps=1 needs the rollout engine outside"):
        train(cfg, "grpo", tiny_qwen2, max_steps=1, progress=False, rows=data)


def test_versions_sync_and_one_step_off_on_an_engine_server(
    tiny_qwen2, setup, seen, hf_engine_server
) -> None:
    index, data = setup
    url = f"rollout.engine_url={hf_engine_server.url}"
    sync = train(tiny_cfg("grpo", index, url), "grpo", tiny_qwen2, max_steps=2, rows=data)
    # synchronous: step t samples with version t-1 = the trainer's; one update per batch, so
    # the old log-probs are the update's own forward
    assert seen == [{"trainer": v, "versions": [v], "recomputed": False} for v in (0, 1)]
    assert [s["rollout/policy_lag"] for s in sync["steps"]] == [0.0, 0.0]
    seen.clear()

    cfg = tiny_cfg("grpo", index, url, "trainer.async_steps=1")
    res = train(cfg, "grpo", tiny_qwen2, max_steps=3, progress=False, rows=data)
    # one-step-off: step 2's batch was sampled by version 0 while step 1 updated, step 3's by
    # version 1 while step 2 updated; those stale batches get their old log-probs recomputed
    assert seen == [
        {"trainer": 0, "versions": [0], "recomputed": False},
        {"trainer": 1, "versions": [0], "recomputed": True},
        {"trainer": 2, "versions": [1], "recomputed": True},
    ]
    lag = [s["rollout/policy_lag"] for s in res["steps"]]
    assert lag == [0.0, 1.0, 1.0] and max(s["rollout/policy_lag_max"] for s in res["steps"]) <= 1
    for s in res["steps"]:
        assert s["actor/engine_logprob_diff"] >= 0 and s["time/weight_sync_s"] >= 0
    # the same prompts in the same order as synchronous (the data order is not async's)
    assert [s["length/total_mean"] > 0 for s in res["steps"]] == [True] * 3
    assert Store().get_run(res["run_id"])["status"] == "finished"


def test_a_killed_engine_process_fails_clearly_and_resume_continues(
    tiny_qwen2, setup, monkeypatch
) -> None:
    index, data = setup
    cfg = tiny_cfg(
        "grpo", index, "rollout.placement=process", "rollout.engine=hf", "trainer.save_every=1"
    )
    real = trainer_mod.RLTrainer.step_on
    killed: list[int] = []
    before = set(placement._LIVE)  # session-scoped engine servers of other tests stay up

    def step_then_kill(self, trajs):
        out = real(self, trajs)
        if self.global_step == 2:  # the engine dies before step 2's weights reach it
            (proc,) = list(placement._LIVE - before)
            killed.append(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
        return out

    monkeypatch.setattr(trainer_mod.RLTrainer, "step_on", step_then_kill)
    with pytest.raises(Sr1Error) as ei:
        train(cfg, "grpo", tiny_qwen2, max_steps=2, progress=False, rows=data)
    msg = str(ei.value)
    (run,) = Store().list_runs("train")
    rid = run["run_id"]
    assert f"pid {killed[0]}) was killed by SIGKILL (exit code -9)" in msg, msg
    assert "weight update (version 2)" in msg and "engine.log" in msg
    assert f"sr1 train --resume {rid}" in msg
    assert Store().get_run(rid)["status"] == "failed"
    assert before == placement._LIVE  # nothing of this run left running
    ckpts = Path(os.environ["SR1_HOME"]) / "runs" / rid / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-1"]

    monkeypatch.setattr(trainer_mod.RLTrainer, "step_on", real)
    more = train(cfg, "", "", resume=rid, max_steps=2, progress=False, rows=data)
    assert more["run_id"] == rid and [s["step"] for s in more["steps"]] == [2]
    assert Store().get_run(rid)["status"] == "finished" and before == placement._LIVE


SETS = [
    "data.train_datasets=[synth]", "data.search_prompt=search_short", "retrieval.index=synth",
    "rollout.n_samples=2", "rollout.max_turns=1", "rollout.max_response_length=8",
    "rollout.max_total_response_length=64", "rollout.max_obs_length=32",
    "trainer.prompts_per_step=2", "trainer.mini_batch_size=4", "trainer.micro_batch_size=4",
    "trainer.save_every=1", "eval.max_new_tokens=6", "eval.batch_size=3",
]  # fmt: skip


def test_serve_engine_drives_train_and_eval_through_the_cli(tiny_qwen2, engine_server) -> None:
    def cli(args: list[str]) -> dict:
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    url = engine_server.url
    sets = [a for s in [*SETS, f"rollout.engine_url={url}"] for a in ("--set", s)]
    cli(["data", "synth", "--n-entities", "40", "--n-train", "20", "--n-test", "5", "--json"])
    cli(["index", "build", "synth", "--json"])
    trained = cli(["train", "--algo", "grpo", "--model", tiny_qwen2, "--max-steps", "2", "--json", *sets])  # fmt: skip
    assert [s["step"] for s in trained["steps"]] == [1, 2]
    assert all(s["rollout/policy_lag"] == 0.0 for s in trained["steps"])
    health = placement.RemoteEngine(url, load_tokenizer(tiny_qwen2)).health()
    assert health["version"] == 2 and health["weights_updated"]
    # eval of the run's checkpoint: the server is given the checkpoint's weights first
    ev = cli(["eval", "--run", trained["run_id"], "--dataset", "synth", "--limit", "3",
              "--method", "search", "--json", *sets])  # fmt: skip
    assert ev["datasets"]["synth"]["n"] == 3
    assert placement.RemoteEngine(url, load_tokenizer(tiny_qwen2)).health()["version"] == 0


def _state(pid: int) -> str:
    """The process state letter of ``pid`` (/proc: R running, S sleeping, T stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("pause", ["auto", "never"])
def test_a_synchronous_update_runs_with_the_engine_process_frozen(
    tiny_qwen2, setup, monkeypatch, pause
) -> None:
    """rollout.engine_pause: the engine process sr1 started (the real HF `sr1 serve engine`
    child) is stopped (SIGSTOP) during every update on CPU and running for the rollouts and
    weight pushes around it; never leaves it running. The run records which."""
    index, data = setup
    cfg = tiny_cfg(
        "grpo", index, "rollout.placement=process", "rollout.engine=hf",
        f"rollout.engine_pause={pause}",
    )  # fmt: skip
    real = trainer_mod.RLTrainer.step_on
    before = set(placement._LIVE)  # session-scoped engine servers of other tests stay up
    states: list[tuple[str, str]] = []

    def step_seeing_the_engine(self, trajs):
        (proc,) = list(placement._LIVE - before)
        states.append(("update", _state(proc.pid)))
        return real(self, trajs)

    real_get = trainer_mod.StepRollouts.get

    def get_seeing_the_engine(self, step):
        states.append(("rollout", _state(self.engine.process.pid)))
        return real_get(self, step)

    monkeypatch.setattr(trainer_mod.RLTrainer, "step_on", step_seeing_the_engine)
    monkeypatch.setattr(trainer_mod.StepRollouts, "get", get_seeing_the_engine)
    res = train(cfg, "grpo", tiny_qwen2, max_steps=2, progress=False, rows=data)
    frozen = pause == "auto"
    assert [w for w, _ in states] == ["rollout", "update"] * 2
    assert [s == "T" for w, s in states if w == "update"] == [frozen, frozen], states
    assert all(s != "T" for w, s in states if w == "rollout"), states
    params = Store().get_run(res["run_id"])["params"]
    assert params["engine_pause"] in (frozen, str(frozen))
    assert params["cpu_malloc_cache"] in (False, "False")  # opt-in (trainer.cpu_malloc_cache)
    assert before == placement._LIVE  # stopped at the end, frozen or not


def test_engine_pause_always_is_refused_where_it_cannot_apply(tiny_qwen2, setup) -> None:
    from sr1.config import resolve_config
    from sr1.train.rollouts import pauses_engine

    index, data = setup
    proc = ["rollout.placement=process", "model.device=cpu"]
    assert pauses_engine(resolve_config(overrides=proc)) is True  # auto: the engine is on CPU
    assert pauses_engine(resolve_config(overrides=[*proc, "rollout.engine_pause=never"])) is False
    # one-step-off samples during the update; an in-process or served engine is not sr1's
    assert pauses_engine(resolve_config(overrides=[*proc, "trainer.async_steps=1"])) is False
    assert pauses_engine(resolve_config(overrides=["rollout.engine_url=http://h:1"])) is False
    assert pauses_engine(resolve_config(overrides=[])) is False
    cfg = tiny_cfg("grpo", index, "rollout.engine_pause=always")
    with pytest.raises(ConfigError, match="engine_pause=always freezes the engine") as ei:
        train(cfg, "grpo", tiny_qwen2, max_steps=1, progress=False, rows=data)
    assert "rollout.placement=process" in ei.value.hint
    on_async = [*proc, "rollout.engine_pause=always", "trainer.async_steps=1"]
    with pytest.raises(ConfigError, match="trainer.async_steps=1"):
        pauses_engine(resolve_config(overrides=on_async))
