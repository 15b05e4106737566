"""Data-parallel training with 2 real gloo processes, launched the documented way:
``accelerate launch --config_file experiments/accelerate/cpu-{ddp,fsdp}-2.yaml``.

One process vs 2 ranks on the same global batch (tiny-qwen2, fp32): one GRPO and one PPO update
on hand-built trajectories, then a PPO ``train`` run with real HF rollouts in a small synthetic
world (``sr1.data.synth``: its questions, its real BM25 index), real DuckDB and MLflow files. Under FSDP the policy, critic and reference are sharded
and the rollout engine runs in its own process per rank (``rollout.placement=process``, fed
the gathered weights each step); the FSDP run stops after step 1 and is resumed by a second
launch. Tolerances seen when this was written: parameters after one update within 3e-6 of
one process (lr 1e-3: 0.3% of a step; summation order differs), metrics within 5e-7.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
DDP = ROOT / "experiments/accelerate/cpu-ddp-2.yaml"
FSDP = ROOT / "experiments/accelerate/cpu-fsdp-2.yaml"
PARAM_ATOL = 1e-5  # 1% of one Adam step at lr 1e-3
METRIC_ATOL = 1e-5


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(home: Path, launch: Path | None, model: str, *jobs: str, sets: str = "",
         timeout: int = 420) -> subprocess.CompletedProcess[str]:  # fmt: skip
    tmp = home / "tmp"  # torchelastic's and the engines' temp dirs: removed with the test's
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, SR1_HOME=str(home), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               SR1_TEST_SETS=sets, SR1_CPU_BF16="0", TMPDIR=str(tmp))  # fmt: skip
    head = [sys.executable]
    if launch is not None:
        head += ["-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
                 str(launch), "--main_process_port", str(_free_port())]  # fmt: skip
    cmd = [*head, str(WORKER), str(home), model, *jobs]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(p: subprocess.CompletedProcess[str]) -> None:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tiny_qwen2: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every launch once: plain (1 process), DDP (2), FSDP (2, then a resume)."""
    from sr1.data.synth import synthesize
    from sr1.retrieval.index import build_index

    out: dict[str, Any] = {"seconds": {}}
    homes = {k: tmp_path_factory.mktemp(f"dist-{k}") for k in ("one", "ddp", "fsdp")}
    for home in homes.values():
        prev = os.environ.get("SR1_HOME")
        os.environ["SR1_HOME"] = str(home)
        try:
            # the world (prepared as dataset synth) and its index, the worker's training data
            synthesize(seed=0, n_entities=40, n_train=40, n_dev=5, n_test=12)
            build_index("synth", progress=False)
        finally:
            if prev is None:
                os.environ.pop("SR1_HOME")
            else:
                os.environ["SR1_HOME"] = prev
    proc = "rollout.placement=process"  # FSDP refuses the in-process HF engine
    plan = [
        ("one", None, ("update", "train:full:2"), ""),
        ("ddp", DDP, ("update", "train:full:2"), ""),
        ("fsdp", FSDP, ("update", "train:part:1"), proc),
        ("fsdp-resume", FSDP, ("train:res:2:part",), proc),
    ]
    for name, launch, jobs, sets in plan:
        home = homes[name.split("-")[0]]
        t0 = time.perf_counter()
        _ok(_run(home, launch, tiny_qwen2, *jobs, sets=sets))
        out["seconds"][name] = round(time.perf_counter() - t0, 1)
    out["homes"] = homes
    for k, home in homes.items():
        out[k] = {"update": torch.load(home / f"update-{1 if k == 'one' else 2}.pt",
                                       weights_only=False)}  # fmt: skip
    for k, f in (("one", "full"), ("ddp", "full"), ("fsdp", "part"), ("fsdp", "res")):
        out[k][f] = json.loads((homes[k] / f"{f}.json").read_text())
    return out


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=atol, rtol=0, msg=k)
        worst = max(worst, float((a[k] - b[k]).abs().max()))
    return worst


def _metrics_close(a: dict[str, float], b: dict[str, float]) -> None:
    keys = {k for k in a if not k.startswith(("time/", "perf/"))}
    assert keys == {k for k in b if not k.startswith(("time/", "perf/"))}
    for k in sorted(keys):
        assert b[k] == pytest.approx(a[k], abs=METRIC_ATOL), k


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_one_update_on_two_ranks_equals_one_process(runs, backend: str, algo: str) -> None:
    one, two = runs["one"]["update"][algo], runs[backend]["update"][algo]
    assert sorted(two["ids"]) != sorted(one["ids"])  # rank 0 trained on half the batch
    assert len(set(two["rank_digests"])) == 1  # both ranks hold the same full weights
    _close(one["params"], two["params"], PARAM_ATOL)
    if algo == "ppo":
        _close(one["critic"], two["critic"], PARAM_ATOL)
    _metrics_close(one["metrics"], two["metrics"])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_skipping_inert_rows_on_two_ranks_equals_one_process(runs, backend: str) -> None:
    """Rank 0 has no live trajectory and computes inert ones so rank 1's collectives match:
    no hang, and the weights equal one process's (actor metrics are over the computed rows,
    which differ between the two, so only the weights are compared)."""
    one, two = runs["one"]["update"]["grpo-inert"], runs[backend]["update"]["grpo-inert"]
    assert one["metrics"]["perf/update_rows_frac"] == pytest.approx(2 / 8)
    assert two["metrics"]["perf/update_rows_frac"] == pytest.approx(2 / 4)
    assert len(set(two["rank_digests"])) == 1
    _close(one["params"], two["params"], PARAM_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_token_budget_micro_batches_on_two_ranks_equal_one_process(runs, backend: str) -> None:
    """``trainer.micro_batch_tokens``: the ranks' rows need different numbers of micro-batches
    (4 and 3), every rank runs the larger count (no hang under FSDP's per-forward
    all-gathers), and the weights and metrics equal one process's fixed micro-batches."""
    one, two = runs["one"]["update"]["grpo"], runs[backend]["update"]["grpo-budget"]
    assert two["micro_batches"] == [(4, 4), (3, 4)]
    assert runs["one"]["update"]["grpo-budget"]["micro_batches"] == [(7, 7)]
    assert len(set(two["rank_digests"])) == 1
    _close(one["params"], two["params"], PARAM_ATOL)
    _metrics_close(one["metrics"], two["metrics"])


@pytest.mark.slow
def test_fsdp_refuses_in_process_engines_and_lora_with_advice(runs) -> None:
    refused = runs["fsdp"]["update"]["refused"]
    assert "rollout.placement=process" in refused["inprocess"]
    assert "rollout.engine_url" in refused["inprocess"]
    assert "LoRA" in refused["lora"] and "lora_rank=0" in refused["lora"]


@pytest.mark.slow
def test_two_rank_runs_log_one_run_with_the_single_process_metrics(
    runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from sr1.tracking.mlflow_log import tracking_uri
    from sr1.tracking.store import Store

    one = {s["step"]: s for s in runs["one"]["full"]["steps"]}
    for backend, runs_made in (("ddp", ["full"]), ("fsdp", ["part"])):  # fsdp: resumed, same id
        home = runs["homes"][backend]
        monkeypatch.setenv("SR1_HOME", str(home))
        store = Store()
        train_runs = [r for r in store.list_runs() if r["kind"] == "train"]
        assert len(train_runs) == len(runs_made), train_runs  # one per run, not per rank
        run = runs[backend][runs_made[0]]
        params = store.get_run(run["run_id"])["params"]
        assert int(params["world_size"]) == 2
        assert params["distributed"] == backend
        assert int(params["per_rank_prompts"]) == 2
        client = MlflowClient(tracking_uri(None))
        exp = client.get_experiment_by_name("sr1-test")
        ml = client.search_runs([exp.experiment_id])
        assert len(ml) == len(runs_made)
        assert ml[0].data.params["world_size"] == "2"
        logged = {(r["step"], r["key"]): r["value"] for r in store.step_metrics(run["run_id"])}
        for step, m in one.items():
            for k, v in m.items():
                if k == "step" or k.startswith(("time/", "perf/")):
                    continue
                assert logged[(step, k)] == pytest.approx(v, abs=METRIC_ATOL), (backend, step, k)
        hist = {step for step, key in logged if key == "reward/mean"}
        assert hist == set(one)
        for point in client.get_metric_history(ml[0].info.run_id, "critic/vf_loss"):
            assert point.value == pytest.approx(one[point.step]["critic/vf_loss"], abs=METRIC_ATOL)


@pytest.mark.slow
def test_fsdp_resume_on_two_ranks_continues_identically(runs) -> None:
    one = runs["one"]["full"]
    res, part = runs["fsdp"]["res"], runs["fsdp"]["part"]
    assert res["run_id"] == part["run_id"] and res["start_step"] == 1
    assert [s["step"] for s in res["steps"]] == [2]
    _metrics_close(one["steps"][1], res["steps"][0])
    # the checkpoints are plain HF folders (gathered from the shards) and agree with 1 process
    a = load_file(os.path.join(one["checkpoint"], "model.safetensors"))
    b = load_file(os.path.join(res["checkpoint"], "model.safetensors"))
    _close(a, b, PARAM_ATOL)
    assert (Path(part["checkpoint"]).parent / "step-1" / "optim").is_dir()  # sharded optimiser


@pytest.mark.slow
@pytest.mark.parametrize("sets,needle", [
    ("trainer.prompts_per_step=3", "prompts_per_step=3 does not split over 2 ranks"),
    ("trainer.mini_batch_size=5", "mini_batch_size=5"),
])  # fmt: skip
def test_uneven_split_fails_on_every_rank_without_hanging(
    tiny_qwen2: str, tmp_path: Path, sets: str, needle: str
) -> None:
    t0 = time.perf_counter()
    p = _run(tmp_path, DDP, tiny_qwen2, "update", sets=sets, timeout=180)
    assert p.returncode != 0
    text = p.stdout + p.stderr
    for rank in (0, 1):
        assert any(needle in line and f"[rank{rank}]" in line for line in text.splitlines()), text[
            -4000:
        ]
    assert "use a multiple of 2" in text
    assert time.perf_counter() - t0 < 180


def test_gpu_smoke_dry_run_checks_its_plan_on_cpu() -> None:
    """benchmarks/gpu_smoke.sh is the device check for a lent GPU; --dry-run runs anywhere."""
    p = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_smoke.sh"), "--dry-run"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert out["dry_run"] and out["ok"] and out["config"]["placement"] == "process"
    assert out["config"]["engine"] == "vllm" and out["config"]["device"] == "cuda"
