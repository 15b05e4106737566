"""What one process does in the data-parallel tests (test_distributed.py): run plainly (one
process) or under ``accelerate launch --config_file experiments/accelerate/cpu-{ddp,fsdp}-2.yaml``.

    dist_worker.py OUT MODEL JOB [JOB ...]

Jobs, in order:
- ``update``: one RL update (GRPO, then PPO) on the same 8 hand-built trajectories, split
  over the ranks in contiguous blocks; writes ``OUT/update-W.pt`` (gathered parameters, the
  critic's for PPO, the step's metrics, and whether the ranks held identical weights).
- ``train:NAME:STEPS[:RESUME_NAME]``: ``sr1.train.trainer.train`` (PPO, real HF rollouts on
  tiny-qwen2 in the synthetic world the test built in ``$SR1_HOME``: its prepared ``synth``
  questions and BM25 index) for STEPS steps, or resuming the run recorded as RESUME_NAME;
  rank 0 writes ``OUT/NAME.json``.
Extra ``key=value`` config overrides come from ``$SR1_TEST_SETS`` (space separated).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sr1.errors import ConfigError  # noqa: E402
from sr1.rollout.engines import named_weights  # noqa: E402
from sr1.train.batch import collate, micro_batches  # noqa: E402
from sr1.train.dist import gather_objects, is_fsdp, make_accelerator, rank_block  # noqa: E402
from sr1.train.trainer import RLTrainer, train  # noqa: E402
from tests.train.helpers import hand_trajectories, tiny_cfg  # noqa: E402

# adam_eps 1e-6: Adam's first step is lr * g / (|g| + eps), and the tiny model has gradients of
# ~1e-8 whose summation-order differences (ranks, micro-batches, head chunks) would move it by
# several % of lr; with eps 1e-6 equal updates agree to well under 1% of a step
SETS = ["trainer.adam_eps=1e-6", *os.environ.get("SR1_TEST_SETS", "").split()]
RUN_SETS = [
    "retrieval.index=synth",
    "data.train_datasets=[synth]",
    "trainer.save_every=1",
    "trainer.prompts_per_step=4",
    "trainer.mini_batch_size=8",
    "trainer.micro_batch_size=2",
    "algorithm.kl_coef=0.05",
    "rollout.max_turns=1",
]


def full_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().cpu().clone() for n, t in named_weights(module)}


def update(out: Path, model: str) -> None:
    acc = make_accelerator(tiny_cfg("grpo", *SETS))
    rank, world = acc.process_index, acc.num_processes
    result = {}
    for algo in ("grpo", "ppo"):
        cfg = tiny_cfg(
            algo,
            "trainer.mini_batch_size=8",  # the whole global batch: one optimiser update
            "trainer.micro_batch_size=2",
            "algorithm.kl_coef=0.05",  # a reference model (sharded under FSDP)
            *SETS,
        )
        tr = RLTrainer(cfg, model_path=model, accelerator=acc)
        trajs = hand_trajectories(tr.tokenizer, n_prompts=4, n_samples=2)
        block = rank_block(4, rank, world)
        mine = [t for t in trajs if block.start <= t.group < block.stop]
        metrics = tr.step_on(mine)
        params = full_params(tr.model)
        critic = full_params(tr.critic) if tr.critic is not None else {}
        # every rank must hold the same full weights after the update
        digest = float(sum(p.double().sum() for p in params.values()))
        digests = gather_objects(acc, digest)
        result[algo] = {
            "params": params,
            "critic": critic,
            "metrics": metrics,
            "rank_digests": digests,
            "ids": [t.id for t in mine],
        }
        del tr
    # token-budget micro-batches (trainer.micro_batch_tokens=120): on 2 ranks rank 0's rows
    # need 4 micro-batches and rank 1's only 3, so rank 1 must run 4 too (FSDP's all-gathers
    # run per forward); the update is the one of fixed micro-batches, up to summation order
    cfg = tiny_cfg("grpo", "trainer.mini_batch_size=8", "trainer.micro_batch_size=2",
                   "trainer.micro_batch_tokens=120", "algorithm.kl_coef=0.05", *SETS)  # fmt: skip
    tr = RLTrainer(cfg, model_path=model, accelerator=acc)
    trajs = hand_trajectories(tr.tokenizer, n_prompts=4, n_samples=2)
    block = rank_block(4, rank, world)
    mine = [t for t in trajs if block.start <= t.group < block.stop]
    batch = collate(mine, tr.pad_id)
    fewest = len(micro_batches(batch, torch.arange(len(mine)), 2, 120))
    ran = len(tr.micro_split(batch, torch.arange(len(mine))))
    metrics = tr.step_on(mine)
    params = full_params(tr.model)
    result["grpo-budget"] = {
        "params": params,
        "metrics": metrics,
        "rank_digests": gather_objects(acc, float(sum(p.double().sum() for p in params.values()))),
        "micro_batches": gather_objects(acc, (fewest, ran)),
    }
    del tr
    # GRPO without KL/entropy on a batch whose groups 0-2 all scored alike: only group 3's
    # trajectories are computed (trainer.skip_inert_rows); on 2 ranks rank 0 holds groups 0-1,
    # none live, and must top up with inert rows to run rank 1's micro-batches
    cfg = tiny_cfg("grpo", "trainer.mini_batch_size=8", "trainer.micro_batch_size=2",
                   "algorithm.kl_coef=0", "algorithm.entropy_coef=0", *SETS)  # fmt: skip
    tr = RLTrainer(cfg, model_path=model, accelerator=acc)
    trajs = hand_trajectories(tr.tokenizer, n_prompts=4, n_samples=2)
    for t in trajs:
        if t.group < 3:
            t.reward = 1.0
    block = rank_block(4, rank, world)
    metrics = tr.step_on([t for t in trajs if block.start <= t.group < block.stop])
    params = full_params(tr.model)
    digests = gather_objects(acc, float(sum(p.double().sum() for p in params.values())))
    result["grpo-inert"] = {"params": params, "metrics": metrics, "rank_digests": digests}
    del tr
    if is_fsdp(acc):  # what FSDP refuses, before any model is loaded (on every rank)
        refused = {}
        for what, extra in (("inprocess", ["rollout.placement=inprocess"]),
                            ("lora", ["trainer.lora_rank=8"])):  # fmt: skip
            try:
                RLTrainer(tiny_cfg("grpo", *SETS, *extra), model_path=model, accelerator=acc)
            except ConfigError as e:
                refused[what] = str(e)
        result["refused"] = refused
    if acc.is_main_process:
        torch.save(result, out / f"update-{world}.pt")
    acc.wait_for_everyone()


def run(out: Path, model: str, spec: str) -> None:
    name, steps, *rest = spec.split(":")[1:]
    resume = None
    if rest:
        resume = json.loads((out / f"{rest[0]}.json").read_text())["run_id"]
    cfg = tiny_cfg("ppo", *RUN_SETS, *SETS)
    res = train(cfg, "ppo", model, resume=resume, max_steps=int(steps), progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        keep = {k: res[k] for k in ("run_id", "checkpoint", "steps", "start_step")}
        (out / f"{name}.json").write_text(json.dumps(keep))


def main(out: str, model: str, *jobs: str) -> None:
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # a hung rank's stacks: kill -USR1 PID
    torch.set_num_threads(1)
    o = Path(out)
    for job in jobs:
        if job == "update":
            update(o, model)
        elif job.startswith("train:"):
            run(o, model, job)
        else:
            raise SystemExit(f"unknown job {job!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
