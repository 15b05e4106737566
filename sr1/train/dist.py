"""Data parallelism for the trainer: N ranks that train exactly like one process holding the
whole batch.

What it owns: the ``Accelerator`` (DDP, or FSDP2 through Accelerate's FSDP plugin, on CPU over
gloo too), the checks an even split needs (made before any work, identically on every rank,
so every rank fails the same way instead of hanging), which contiguous block of a step's
prompts a rank rolls out, and the cross-rank sums, gathers and broadcasts.

Conventions (verl's): ``trainer.prompts_per_step`` and ``trainer.mini_batch_size`` are global
(all ranks together) and must divide evenly by the number of ranks; ``micro_batch_size`` is per
rank. Loss normalisers (tokens, sequences) are summed over ranks and each rank's loss is scaled
by the world size, so that DDP's / FSDP's gradient *mean* over ranks is the gradient of the
global mini-batch loss: one update on 2 ranks with B/2 trajectories each equals one update on
1 rank with B.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from sr1 import models
from sr1.algos.core import AggDenom, Reduce
from sr1.config import ExperimentConfig
from sr1.errors import ConfigError


def make_accelerator(cfg: ExperimentConfig) -> Any:
    """The Accelerate ``Accelerator`` for ``cfg``, from ``accelerate launch``'s environment.

    CPU when ``model.device`` resolves to it (mixed precision is ``trainer.mixed_precision``,
    :func:`sr1.models.autocast`). Under ``distributed_type: FSDP`` on CPU (the
    ``experiments/accelerate/cpu-fsdp-2.yaml`` route) Accelerate itself only enables its FSDP
    plugin on accelerators and would fall back to plain multi-CPU; torch's ``fully_shard``
    runs on CPU over gloo, so the plugin (configured from the same environment) is switched
    on here. On GPUs nothing is changed.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc = Accelerator(cpu=models.pick_device(cfg.model.device) == "cpu")
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and acc.distributed_type == DistributedType.MULTI_CPU:
        from accelerate.state import PartialState

        # both shared states: every AcceleratorState() (Accelerate makes one per optimizer
        # and scheduler it wraps) copies PartialState's distributed_type over its own
        PartialState().distributed_type = DistributedType.FSDP
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    return acc


def is_fsdp(acc: Any) -> bool:
    """Whether the models are sharded (FSDP) rather than replicated (DDP, one process)."""
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def _multiples(world: int, near: int) -> str:
    lo = max(world, (near // world) * world)
    return f"{lo} or {lo + world}" if lo != near else str(lo)


def check_split(cfg: ExperimentConfig, world: int) -> None:
    """Refuse a batch that does not split evenly over ``world`` ranks (uneven ranks would run
    different numbers of optimiser steps and hang in the gradient all-reduce)."""
    if world <= 1:
        return
    t = cfg.trainer
    if t.prompts_per_step % world:
        raise ConfigError(
            f"trainer.prompts_per_step={t.prompts_per_step} does not split over {world} ranks",
            hint=f"use a multiple of {world} (e.g. {_multiples(world, t.prompts_per_step)}); "
            "each rank rolls out prompts_per_step / ranks prompts",
        )
    if t.mini_batch_size % world:
        raise ConfigError(
            f"trainer.mini_batch_size={t.mini_batch_size} (trajectories per update, all ranks "
            f"together) does not split over {world} ranks",
            hint=f"use a multiple of {world} (e.g. {_multiples(world, t.mini_batch_size)})",
        )


def check_fsdp(cfg: ExperimentConfig, acc: Any) -> None:
    """What sr1 does not run under FSDP, refused before any model is loaded."""
    if not is_fsdp(acc):
        return
    rc = cfg.rollout
    if cfg.trainer.lora_rank > 0:
        raise ConfigError(
            "LoRA (trainer.lora_rank > 0) is not supported under FSDP",
            hint="LoRA's trainable weights are small: train it data parallel "
            "(experiments/accelerate/cpu-ddp-2.yaml, or distributed_type MULTI_GPU), or set "
            "trainer.lora_rank=0 for full fine-tuning under FSDP",
        )
    if not rc.engine_url and rc.placement == "inprocess":
        raise ConfigError(
            f"the in-process {rc.engine} rollout engine cannot generate with FSDP shards (each "
            "rank would run a different number of forward passes, and every FSDP forward is a "
            "collective)",
            hint="put the engine in its own process: --set rollout.placement=process (each "
            "rank then gets the gathered full weights every step), or serve one with "
            "`sr1 serve engine` and pass --set rollout.engine_url=URL",
        )


def rank_block(n: int, rank: int, world: int) -> slice:
    """The contiguous block of ``n`` items (a step's prompts) rank ``rank`` of ``world`` owns;
    ``n`` divides evenly (:func:`check_split`). Contiguous, so a trajectory's place in the
    step, and with it its sampling seed, is the same on any number of ranks."""
    k = n // world
    return slice(rank * k, (rank + 1) * k)


def sum_reducer(acc: Any) -> Reduce | None:
    """An all-reduce SUM over the ranks for batch statistics (None on one process)."""
    if acc.num_processes == 1:
        return None

    def reduce(x: torch.Tensor) -> torch.Tensor:
        t = x.detach().to(acc.device, torch.float64)
        return acc.reduce(t, reduction="sum").to(x.device, x.dtype)

    return reduce


def global_denominator(acc: Any, denom: AggDenom) -> AggDenom:
    """``denom``'s token and sequence counts summed over the ranks (the constant ``norm`` of
    seq-mean-token-sum-norm stays as it is)."""
    if acc.num_processes == 1:
        return denom
    t = torch.tensor([denom.tokens, denom.seqs], dtype=torch.float64, device=acc.device)
    tokens, seqs = acc.reduce(t, reduction="sum").tolist()
    return denom.with_counts(tokens, seqs)


def gather_objects(acc: Any, obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (on every rank)."""
    if acc.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return list(gather_object([obj]))


def broadcast_object(acc: Any, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if acc.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def reduce_timings(acc: Any, metrics: dict[str, float]) -> dict[str, float]:
    """Per-rank timing and throughput metrics made global: ``time/*`` the slowest rank's
    (a step ends when the last rank does), ``perf/*`` summed (throughputs add up)."""
    mine = {k: v for k, v in metrics.items() if k.startswith(("time/", "perf/"))}
    if acc.num_processes == 1 or not mine:
        return metrics
    every = gather_objects(acc, mine)
    out = dict(metrics)
    for k in mine:
        vals = [m[k] for m in every if k in m]
        out[k] = max(vals) if k.startswith("time/") else sum(vals)
    return out


def any_rank(acc: Any, flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (all ranks must agree to stop, or DDP hangs)."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)


__all__: Sequence[str] = [
    "any_rank",
    "broadcast_object",
    "check_fsdp",
    "check_split",
    "gather_objects",
    "global_denominator",
    "is_fsdp",
    "make_accelerator",
    "rank_block",
    "reduce_timings",
    "sum_reducer",
]
