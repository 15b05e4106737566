"""RL training orchestration: rollout -> reward -> old/ref log-probs -> advantages -> updates.

The math lives in :mod:`sr1.algos.core` (pure functions); this module only wires models,
optimisers, the rollout engine, checkpoints and logging together.

Per step: take the next ``prompts_per_step`` rows in the seeded data order, roll out
``n_samples`` trajectories each with the search loop (reward by ``algorithm.reward``), recompute
old log-probs with the trainer's model (not the engine's, which may differ numerically, e.g.
vLLM), reference log-probs (frozen base; with LoRA the adapter is switched off instead of
keeping a copy), values for PPO, then advantages, then ``ppo_epochs`` passes of shuffled
mini-batches, each one optimiser update accumulated over micro-batches. The rollout engine
then gets the new weights as policy version = step (the in-process HF engine shares the
module, so that is free; an engine in another process or on a server gets the trainable
tensors, :mod:`sr1.rollout.placement`). Every trajectory records the version that sampled it;
a batch from an older version (``trainer.async_steps``, :mod:`sr1.train.rollouts`) always
gets its old log-probs recomputed by the trainer's model.

Deliberate departures from Search-R1/verl:
- Group algorithms (grpo, rloo) refuse ``rollout.n_samples`` < 2 (their advantages would
  all be 0) instead of silently changing it.
- ``trainer.warmup_steps`` counts optimiser updates, not RL steps.

Data parallelism (``accelerate launch``, DDP or FSDP2; :mod:`sr1.train.dist`): each rank rolls
out a contiguous block of the step's prompts (groups never straddle ranks; every trajectory
keeps the sampling seed of its place in the step); loss normalisers and batch statistics
(advantage whitening) are global; the logged metrics are the whole batch's. Rank 0 alone
creates and finishes the run, writes DuckDB, MLflow and the checkpoint folder (FSDP: every
rank writes its optimiser shard into it). One update on N ranks equals the update one process
makes on the whole batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sr1 import models, paths
from sr1.algos import core
from sr1.algos.rewards import make_reward_fn
from sr1.config import ExperimentConfig, resolve_config, to_dict
from sr1.errors import ConfigError, NotFoundError
from sr1.progress import ProgressFactory, silent
from sr1.progress import resolve as resolve_progress
from sr1.registry import Registry
from sr1.rollout.engines import named_weights
from sr1.rollout.placement import engine_openmp_report
from sr1.rollout.types import Trajectory
from sr1.train import allocator
from sr1.train.batch import (
    TrainBatch,
    batched_logprobs,
    batched_values,
    collate,
    micro_batches,
    padded_tokens,
    response_forward,
    value_forward,
)
from sr1.train.checkpoint import (
    begin_checkpoint,
    clean_stale,
    latest_checkpoint,
    link_copy,
    load_state,
    merged_copy,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from sr1.train.critic import Critic
from sr1.train.dist import (
    any_rank,
    broadcast_object,
    check_fsdp,
    check_split,
    gather_objects,
    global_denominator,
    is_fsdp,
    make_accelerator,
    reduce_timings,
    sum_reducer,
)
from sr1.train.rollouts import StepRollouts, check_async, pauses_engine, policy_lag, stale


@dataclass(frozen=True)
class AlgoSpec:
    """What an algorithm name means: its default advantage estimator and whether it needs a
    critic or groups of samples per prompt."""

    adv_estimator: str
    critic: bool
    grouped: bool


ALGOS: Registry[AlgoSpec] = Registry("algorithm")
ALGOS.add("ppo", AlgoSpec("gae", critic=True, grouped=False))
ALGOS.add("grpo", AlgoSpec("grpo", critic=False, grouped=True))
ALGOS.add("rloo", AlgoSpec("rloo", critic=False, grouped=True))
ALGOS.add("reinforce_pp", AlgoSpec("reinforce_pp", critic=False, grouped=False))


# -- data order -------------------------------------------------------------------------------
class DataOrder:
    """Rows in a seeded shuffled order, epoch after epoch; ``state`` makes it resumable."""

    def __init__(self, n_rows: int, seed: int) -> None:
        if n_rows == 0:
            raise NotFoundError("no training rows", hint="check data.train_datasets")
        self.n, self.seed, self.epoch, self.cursor = n_rows, seed, 0, 0

    def _perm(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        perm = self._perm()
        while len(out) < k:
            if self.cursor >= self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                perm = self._perm()
            out.append(perm[self.cursor])
            self.cursor += 1
        return out

    def state(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "cursor": self.cursor}

    def load(self, s: dict[str, int]) -> None:
        self.seed, self.epoch, self.cursor = s["seed"], s["epoch"], s["cursor"]


# -- the update machinery ------------------------------------------------------------------------
def _chunks(idx: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(idx), size):
        yield idx[i : i + size]


class RLTrainer:
    """Models, optimisers and one RL update from a list of scored trajectories.

    ``step_on(trajs)`` is the whole learning part of a step (rollout and logging live in
    :func:`train`): it builds the batch, computes old/ref log-probs, values and advantages,
    runs the updates and returns the step's metrics. The policy starts from ``model_path``
    (default: ``cfg.model.name``) or, when resuming, from ``init_ckpt``; a frozen reference
    exists when the KL coefficient is nonzero (with LoRA the adapter is switched off instead);
    PPO gets a critic.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        model_path: str | None = None,
        accelerator: Any | None = None,
        init_ckpt: Path | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.acfg = cfg.algorithm
        self.tcfg = cfg.trainer
        self.spec = ALGOS.get(cfg.algorithm.name)
        if self.spec.grouped and cfg.rollout.n_samples < 2:
            raise ConfigError(
                f"{cfg.algorithm.name} compares samples of the same prompt: rollout.n_samples "
                f"is {cfg.rollout.n_samples}",
                hint="pass --set rollout.n_samples=5 (the paper's group size)",
            )
        check_async(cfg)  # async rollouts need the engine outside this process
        pauses_engine(cfg)  # rollout.engine_pause=on where it cannot apply: refused now
        self.adv_name = cfg.algorithm.adv_estimator or self.spec.adv_estimator
        core.ADV_ESTIMATORS.get(self.adv_name)
        core.POLICY_LOSSES.get(cfg.algorithm.policy_loss)
        core.KL_ESTIMATORS.get(cfg.algorithm.kl_estimator)
        core.LOSS_AGG_MODES.get(cfg.algorithm.loss_agg)
        models.mixed_precision_dtype(cfg.trainer.mixed_precision)
        if self.tcfg.mini_batch_size < 1 or self.tcfg.micro_batch_size < 1:
            raise ConfigError("trainer.mini_batch_size and trainer.micro_batch_size must be >= 1")
        if accelerator is None:
            accelerator = make_accelerator(cfg)
        self.acc = accelerator
        self.world = int(accelerator.num_processes)
        check_split(cfg, self.world)  # before any model is loaded, identically on every rank
        check_fsdp(cfg, accelerator)
        self.fsdp = is_fsdp(accelerator)
        self.base = model_path or models.resolve(cfg.model.name)
        dev = str(accelerator.device)
        # the weights the optimiser updates: fp32 on CPU under auto (bf16 compute comes from
        # trainer.mixed_precision's autocast); bf16 on GPUs that have it
        dtype = models.pick_dtype(cfg.model.dtype, dev, training=True)
        self.dtype = dtype
        # freed memory kept for the next step on CPU (trainer.cpu_malloc_cache)
        self.malloc_cache = allocator.apply(cfg.trainer.cpu_malloc_cache, accelerator.device.type)
        torch.manual_seed(cfg.trainer.seed)
        self.tokenizer = models.load_tokenizer(self.base, cfg.model.revision)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(self.tokenizer.eos_token_id if pad is None else pad)

        lora = cfg.trainer.lora_rank > 0
        src = self.base if (init_ckpt is None or lora) else str(init_ckpt)
        policy = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).to(dev)
        if lora:
            from peft import LoraConfig, PeftModel, get_peft_model

            if init_ckpt is not None:
                policy = PeftModel.from_pretrained(
                    policy, str(init_ckpt / "adapter"), is_trainable=True
                )
            else:
                lcfg = LoraConfig(
                    r=cfg.trainer.lora_rank,
                    lora_alpha=cfg.trainer.lora_alpha,
                    target_modules="all-linear",
                    lora_dropout=0.0,
                    task_type="CAUSAL_LM",
                )
                policy = get_peft_model(policy, lcfg)
        models.freeze_lower_layers(policy, cfg.trainer.freeze_layers)
        gc_kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        if cfg.trainer.gradient_checkpointing:
            policy.gradient_checkpointing_enable(**gc_kwargs)
        policy.train()
        self.ref: torch.nn.Module | None = None
        if cfg.algorithm.kl_coef > 0 and not lora:
            ref = AutoModelForCausalLM.from_pretrained(self.base, dtype=dtype).to(dev).eval()
            ref.requires_grad_(False)
            # FSDP: sharded like the policy, by the plugin's own fully_shard wrapping
            # (Accelerate's prepare() wants an optimizer with every FSDP2 model; this one has
            # none). DDP keeps a plain replica: nothing to sync.
            if self.fsdp:
                from accelerate.utils.fsdp_utils import fsdp2_prepare_model

                ref = fsdp2_prepare_model(accelerator, ref)
            self.ref = ref

        warm = max(0, self.tcfg.warmup_steps)

        def sched(u: int) -> float:
            return min(1.0, (u + 1) / warm) if warm else 1.0

        params = [p for p in policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params, lr=self.tcfg.lr, weight_decay=self.tcfg.weight_decay, eps=self.tcfg.adam_eps
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, sched)
        self.policy, self.optimizer = accelerator.prepare(policy, opt)
        self.critic: Any = None
        self.critic_optimizer: Any = None
        self.critic_sched: Any = None
        if self.spec.critic:
            csrc = str(init_ckpt / "critic") if init_ckpt is not None else self.base
            critic = Critic.from_pretrained(csrc, dtype, dev, seed=cfg.trainer.seed)
            if cfg.trainer.gradient_checkpointing:
                critic.backbone.gradient_checkpointing_enable(**gc_kwargs)
            critic.train()
            copt = torch.optim.AdamW(
                critic.parameters(),
                lr=self.tcfg.critic_lr,
                weight_decay=self.tcfg.weight_decay,
                eps=self.tcfg.adam_eps,
            )
            self.critic_sched = torch.optim.lr_scheduler.LambdaLR(copt, sched)
            self.critic, self.critic_optimizer = accelerator.prepare(critic, copt)
        self.updates = 0
        self.global_step = 0

    @property
    def model(self) -> torch.nn.Module:
        """The policy without distributed wrappers (what engines and checkpoints see)."""
        return self.acc.unwrap_model(self.policy)

    @property
    def lora(self) -> bool:
        return hasattr(self.model, "peft_config")

    # -- one step ------------------------------------------------------------------------------
    @torch.no_grad()
    def _ref_logprobs(self, batch: TrainBatch, mbs: list[torch.Tensor]) -> torch.Tensor | None:
        if self.acfg.kl_coef <= 0:
            return None
        chunk = self.tcfg.logits_chunk_mib
        if self.lora:
            with self.model.disable_adapter():
                return batched_logprobs(self.model, batch, mbs, logits_chunk_mib=chunk)[0]
        assert self.ref is not None
        return batched_logprobs(self.ref, batch, mbs, logits_chunk_mib=chunk)[0]

    def micro_split(self, batch: TrainBatch, idx: torch.Tensor) -> list[torch.Tensor]:
        """Rows ``idx`` of ``batch`` as micro-batches (``trainer.micro_batch_size`` and
        ``micro_batch_tokens``: :func:`sr1.train.batch.micro_batches`). Under a token budget
        on several ranks, every rank runs as many as the rank that needs the most (FSDP's
        all-gathers run per forward, so the ranks' forward counts must match)."""
        t = self.tcfg
        groups = micro_batches(batch, idx, t.micro_batch_size, t.micro_batch_tokens)
        if t.micro_batch_tokens and self.world > 1:
            k = max(gather_objects(self.acc, len(groups)))
            if k != len(groups):
                groups = micro_batches(
                    batch, idx, t.micro_batch_size, t.micro_batch_tokens, n_groups=k
                )
        return groups

    def autocast(self) -> Any:
        """The forward passes' autocast context (``trainer.mixed_precision``)."""
        return models.autocast(self.tcfg.mixed_precision, str(self.acc.device))

    @property
    def rank_mini_batch(self) -> int:
        """Trajectories per optimiser update on this rank (``mini_batch_size`` is global)."""
        return max(1, self.tcfg.mini_batch_size // self.world)

    def _single_update(self, n: int) -> bool:
        """Whether this rank's batch of ``n`` trajectories gets exactly one optimiser update."""
        return self.tcfg.ppo_epochs == 1 and self.rank_mini_batch >= n

    def prepare_batch(self, trajs: Sequence[Trajectory]) -> TrainBatch:
        """Padded batch with old/ref log-probs, values, returns and advantages filled, all
        ``(B, R)``; the preparation metrics are in ``self.prep_metrics``."""
        batch = collate(trajs, self.pad_id, use_mask=self.acfg.use_mask)
        mask = batch.response_mask
        mbs = self.micro_split(batch, torch.arange(len(batch)))
        with self.autocast():
            batch.ref_logprobs = self._ref_logprobs(batch, mbs)
            needs_old = (
                not self._single_update(len(batch))
                or (batch.ref_logprobs is not None and self.acfg.kl_in_reward)
                # sampled by an older policy version (async rollouts): the update's own
                # forward is not the sampling policy's, so never reuse it as "old"
                or stale(trajs, self.global_step)
            )
            # One on-policy update per batch: the policy that sampled is the one being updated,
            # so the old log-probs are the update's own (detached) log-probs and the extra
            # forward is skipped (trainer.reuse_old_logprobs; ~1/3 of the training compute).
            if needs_old or not self.tcfg.reuse_old_logprobs:
                batch.old_logprobs, _ = batched_logprobs(
                    self.model, batch, mbs, logits_chunk_mib=self.tcfg.logits_chunk_mib
                )
            if self.critic is not None:
                batch.values = batched_values(self.acc.unwrap_model(self.critic), batch, mbs)
        token_rewards = core.place_outcome_reward(batch.scores, mask)  # (B, R)
        m: dict[str, float] = {}
        if batch.ref_logprobs is not None and batch.old_logprobs is not None:
            kl = core.kl_penalty(
                batch.old_logprobs, batch.ref_logprobs, mask, self.acfg.kl_estimator
            )
            m["actor/kl"] = float(core.masked_mean(kl, mask))
            if self.acfg.kl_in_reward:
                token_rewards = token_rewards - self.acfg.kl_coef * kl
        batch.advantages, batch.returns = core.compute_advantages(
            self.adv_name,
            token_rewards,
            mask,
            self.acfg,
            index=batch.index,
            values=batch.values,
            reduce=sum_reducer(self.acc),  # whitening over every rank's batch
        )
        m["actor/adv_abs_mean"] = float(core.masked_mean(batch.advantages.abs(), mask))
        if batch.old_logprobs is not None:
            # how far the engine's sampling log-probs are from the trainer's recomputation
            m["actor/engine_logprob_diff"] = float(
                core.masked_mean((batch.old_logprobs - batch.rollout_logprobs).abs(), mask)
            )
        # token means over the whole batch (every rank's)
        parts = gather_objects(self.acc, (m, float(mask.sum())))
        self.prep_metrics = core.combine_metrics(parts)
        return batch

    def _micro_loss(self, mb: TrainBatch, denom: float) -> tuple[torch.Tensor, dict[str, float]]:
        a = self.acfg
        mask = mb.response_mask
        with self.autocast():
            # entropy is always logged; it needs a graph only when it is part of the loss
            lp, ent = response_forward(
                self.policy,
                mb,
                with_entropy=True,
                entropy_grad=bool(a.entropy_coef),
                logits_chunk_mib=self.tcfg.logits_chunk_mib,
            )
        assert ent is not None and mb.advantages is not None
        old = mb.old_logprobs
        if old is None:  # single on-policy update (see prepare_batch): ratio is exactly 1
            old = lp.detach()
        loss, m = core.policy_loss(a.policy_loss, lp, old, mb.advantages, mask, a, denom)
        if mb.old_logprobs is None:
            m["actor/engine_logprob_diff"] = float(
                core.masked_mean((old - mb.rollout_logprobs).abs(), mask)
            )
        if mb.ref_logprobs is not None and not a.kl_in_reward:
            kl, km = core.kl_loss(lp, mb.ref_logprobs, mask, a.kl_estimator, a.loss_agg, denom)
            loss = loss + a.kl_coef * kl
            m.update(km)
            if mb.old_logprobs is None:  # on-policy: the current policy is the sampling one
                m["actor/kl"] = km["actor/kl_loss"]
        e, em = core.entropy_bonus(ent, mask, a.loss_agg, denom)
        m.update(em)
        if a.entropy_coef:
            loss = loss - a.entropy_coef * e
        if self.critic is not None:
            assert mb.values is not None and mb.returns is not None
            with self.autocast():
                v = value_forward(self.critic, mb)
            vl, vm = core.value_loss(
                v, mb.values, mb.returns, mask, a.value_clip, a.loss_agg, denom
            )
            loss = loss + vl
            m.update(vm)
        return loss, m

    def update(self, batch: TrainBatch, step: int) -> dict[str, float]:
        """``ppo_epochs`` passes of shuffled mini-batches; one optimiser update each, gradients
        accumulated over micro-batches. Losses use the mini-batch normaliser summed over the
        ranks, and each rank's loss is scaled by the world size (DDP and FSDP average the
        gradients over ranks), so the micro-batch losses of all ranks sum to the loss of the
        global mini-batch. Metrics are those of the global mini-batch
        (:func:`sr1.algos.core.combine_metrics`)."""
        t = self.tcfg
        dev = self.acc.device
        g = torch.Generator().manual_seed(t.seed * 1_000_003 + step)
        out: list[dict[str, float]] = []
        for _ in range(t.ppo_epochs):
            perm = torch.randperm(len(batch), generator=g)
            for idx in _chunks(perm, self.rank_mini_batch):
                # the normaliser counts every trajectory of the mini-batch, computed or not
                local = core.agg_denominator(batch.response_mask[idx], self.acfg.loss_agg)
                denom = global_denominator(self.acc, local)
                n_all = len(idx)
                if self.skip_inert:
                    idx = self._live_rows(batch, idx)
                # micro-batches of similar lengths (less padding); the sum is the same
                micro = self.micro_split(batch, idx)
                ms: list[tuple[dict[str, float], float]] = []
                for i, rows in enumerate(micro):
                    last = i == len(micro) - 1 or self.world == 1
                    ctx = contextlib.nullcontext() if last else self.acc.no_sync(self.policy)
                    mb = batch.select(rows).to(dev)
                    with ctx:
                        loss, m = self._micro_loss(mb, denom)
                        self.acc.backward(loss * self.world if self.world > 1 else loss)
                    # token positions the forward computed, and how many were real (summed
                    # over micro-batches and ranks: core.SUMMED_METRICS)
                    m["perf/update_padded_tokens"] = float(padded_tokens(mb))
                    m["perf/update_real_tokens"] = float(mb.attention_mask.sum())
                    ms.append((m, float(mb.response_mask.sum())))
                m = core.combine_metrics([x for part in gather_objects(self.acc, ms) for x in part])
                m["perf/update_rows_frac"] = len(idx) / n_all
                params = [p for p in self.policy.parameters() if p.requires_grad]
                m["actor/grad_norm"] = self._clip_grad_norm(params)
                m["actor/lr"] = self.sched.get_last_lr()[0]
                self.optimizer.step()
                self.sched.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.critic is not None:
                    m["critic/grad_norm"] = self._clip_grad_norm(list(self.critic.parameters()))
                    self.critic_optimizer.step()
                    self.critic_sched.step()
                    self.critic_optimizer.zero_grad(set_to_none=True)
                self.updates += 1
                out.append(m)
        # the whole step's: rows x trimmed columns the forwards ran, and the share of them that
        # was padding (update tokens/s of different batches compare only with it)
        padded = sum(d.pop("perf/update_padded_tokens", 0.0) for d in out)
        real = sum(d.pop("perf/update_real_tokens", 0.0) for d in out)
        res = core.metric_means(out)
        res["perf/update_padded_tokens"] = padded
        res["perf/update_pad_frac"] = 1.0 - real / padded if padded else 0.0
        return res

    @property
    def skip_inert(self) -> bool:
        """Whether zero-advantage trajectories may be left out of the update (exactly: see
        ``trainer.skip_inert_rows``)."""
        a = self.acfg
        return (
            self.tcfg.skip_inert_rows
            and a.kl_coef == 0
            and a.entropy_coef == 0
            and self.critic is None
            and a.policy_loss in core.ZERO_AT_ZERO_ADVANTAGE
        )

    def _live_rows(self, batch: TrainBatch, idx: torch.Tensor) -> torch.Tensor:
        """``idx`` without its inert rows (:func:`sr1.algos.core.inert_rows`), keeping at least
        one, so the backward and the optimiser step still run. On several ranks every rank
        keeps the same number (the most any rank needs, topped up with inert rows), so the
        ranks run the same micro-batches and their collectives (DDP's gradient all-reduce,
        FSDP's all-gathers) stay matched."""
        assert batch.advantages is not None
        inert = core.inert_rows(batch.advantages[idx], batch.response_mask[idx])
        order = torch.cat([idx[~inert], idx[inert]])
        k = int((~inert).sum())
        if self.world > 1:
            counts = gather_objects(self.acc, (k, len(idx)))
            if len({n for _, n in counts}) > 1:  # uneven mini-batches: compute them all
                return idx
            k = max(c for c, _ in counts)
        return order[: max(k, 1)]

    def _clip_grad_norm(self, params: list[torch.nn.Parameter]) -> float:
        """Clip to ``trainer.grad_clip``; returns the global norm before clipping. FSDP: torch's
        own clip over the DTensor gradients (a global norm); Accelerate's FSDP2 path compares
        parameter lists with ``==``, which raises on DTensors."""
        if self.fsdp:
            n = torch.nn.utils.clip_grad_norm_(params, self.tcfg.grad_clip)
            return float(n.full_tensor() if hasattr(n, "full_tensor") else n)
        return float(self.acc.clip_grad_norm_(params, self.tcfg.grad_clip))

    def step_on(self, trajs: Sequence[Trajectory]) -> dict[str, float]:
        """One RL step's learning on scored trajectories; returns rollout + update metrics."""
        step = self.global_step + 1
        batch = self.prepare_batch(trajs)
        # the whole step's trajectories (every rank's), as small summaries
        every = [x for part in gather_objects(self.acc, summarize(trajs)) for x in part]
        metrics = rollout_metrics(every, self.cfg.rollout.max_turns)
        metrics.update(policy_lag(every, self.global_step))
        metrics.update(self.prep_metrics)
        metrics.update(self.update(batch, step))
        self.global_step = step
        return metrics

    def _inprocess_hf(self) -> bool:
        rc = self.cfg.rollout
        return rc.engine == "hf" and not rc.engine_url and rc.placement == "inprocess"

    def engine_dtype(self) -> str | None:
        """The weights dtype the rollout engine runs: the policy's own for the in-process HF
        engine (it runs the policy module), else ``model.dtype`` resolved for inference on the
        engine's device (``auto``: bf16 on a CPU that runs it natively, while the policy
        trains in fp32); None for a served engine (``rollout.engine_url``), which decides."""
        from sr1.rollout.placement import engine_dtype_report

        if self._inprocess_hf():
            return str(self.dtype).removeprefix("torch.")
        return engine_dtype_report(self.cfg)["resolved"]

    def engine_model(self) -> torch.nn.Module:
        """The module an in-process engine runs: the policy itself, or a merged copy under LoRA
        for engines that cannot run adapters (the in-process HF engine runs the PEFT module)."""
        if self.lora and not self._inprocess_hf():
            return merged_copy(self.model)
        return self.model

    def engine_weights(self, full: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` pairs for ``Engine.update_weights`` after an update: the
        trainable parameters (all that an optimiser step changes; frozen layers were sent in
        the first, ``full`` sync), or every merged weight under LoRA. FSDP shards are
        gathered (:func:`sr1.rollout.engines.named_weights`). The in-process HF engine
        recognises its own parameters and copies nothing."""
        if self.lora and not self._inprocess_hf():
            return named_weights(merged_copy(self.model))
        return named_weights(self.model, trainable_only=not full)

    def open_engine(
        self, log_dir: Path, version: int, send: bool = True
    ) -> contextlib.AbstractContextManager[Any]:
        """The rollout engine for this policy (``rollout.placement`` / ``rollout.engine_url``):
        in-process on the policy module itself, or outside this process with the weights of
        ``version`` pushed first (``send``: this rank pushes); closed on exit (an engine
        process sr1 started is stopped)."""
        from sr1.rollout.placement import open_engine

        dev, rc = self.acc.device, self.cfg.rollout
        inprocess = not rc.engine_url and rc.placement == "inprocess"
        return open_engine(
            self.cfg,
            self.engine_model() if inprocess else self.model,
            self.tokenizer,
            device="cpu" if dev.type == "cpu" else str(dev),
            dtype=self.cfg.model.dtype,
            weights=None if inprocess else (lambda: self.engine_weights(full=True)),
            version=version,
            log_dir=log_dir,
            send=send,
        )

    @contextlib.contextmanager
    def rollouts(
        self,
        run: Any,
        env: Any,
        rows: Sequence[dict[str, Any]],
        order: DataOrder,
        reward_fn: Any,
        start: int,
        total: int,
    ) -> Iterator[StepRollouts]:
        """The engine (``rollout.placement`` / ``rollout.engine_url``; the weights of version
        ``start`` pushed to one outside this process) and the steps' rollouts over it, both
        closed on exit (an engine process sr1 started is stopped)."""
        from sr1.rollout.placement import engine_died_hint

        acc, rc = self.acc, self.cfg.rollout
        shared = bool(rc.engine_url) and acc.num_processes > 1  # one server for every rank
        log_dir = run.dir if acc.num_processes == 1 else run.dir / f"rank-{acc.process_index}"
        with (
            self.open_engine(log_dir, start, send=acc.is_main_process or not shared) as engine,
            StepRollouts(
                engine,
                env,
                rows,
                order,
                self.cfg,
                reward_fn,
                start=start,
                total=total,
                rank=acc.process_index,
                world=acc.num_processes,
                pushes=acc.is_main_process or not shared,
                barrier=acc.wait_for_everyone if shared else None,
                on_engine_error=lambda e: engine_died_hint(e, run.run_id),
            ) as ro,
        ):
            if shared:
                acc.wait_for_everyone()  # rank 0's first sync reached the server
            yield ro

    # -- state ---------------------------------------------------------------------------------
    def _optimizers(self) -> list[tuple[str, Any, Any]]:
        """(folder, module, optimizer) of each optimiser: the policy's, and the critic's."""
        out = [("optim", self.policy, self.optimizer)]
        if self.critic is not None:
            out.append(("critic_optim", self.critic, self.critic_optimizer))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights that a resume needs. Under FSDP the optimiser states are
        sharded: they go to the checkpoint's ``optim/`` (and ``critic_optim/``) folders, one
        file per rank (:meth:`save`), not into this dict."""
        s: dict[str, Any] = {
            "scheduler": self.sched.state_dict(),
            "updates": self.updates,
            "step": self.global_step,
            "rng": rng_state(),
            "world_size": self.world,
            "sharded_optimizer": self.fsdp,
        }
        if not self.fsdp:
            s["optimizer"] = self.optimizer.state_dict()
        if self.critic is not None:
            if not self.fsdp:
                s["critic_optimizer"] = self.critic_optimizer.state_dict()
            s["critic_scheduler"] = self.critic_sched.state_dict()
        return s

    def load_state_dict(self, s: dict[str, Any], ckpt: Path | None = None) -> None:
        """Restore :meth:`state_dict` (``ckpt``: the checkpoint folder, for FSDP's optimiser
        shards); each rank gets back its own RNG state."""
        saved_world = int(s.get("world_size", 1))
        if bool(s.get("sharded_optimizer")) != self.fsdp or (
            self.fsdp and saved_world != self.world
        ):
            how = f"FSDP on {saved_world} ranks" if s.get("sharded_optimizer") else "without FSDP"
            raise ConfigError(
                f"this checkpoint's optimiser state was saved {how}; this run has "
                f"{self.world} rank(s){' under FSDP' if self.fsdp else ''}",
                hint="resume with the same accelerate launch config (same distributed type "
                "and number of processes); the weights alone load anywhere (its HF folder)",
            )
        if self.fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (
                get_optimizer_state_dict,
                set_optimizer_state_dict,
            )

            assert ckpt is not None
            for folder, module, opt in self._optimizers():
                box = {"optimizer": get_optimizer_state_dict(module, opt.optimizer)}
                dcp.load(box, checkpoint_id=str(Path(ckpt) / folder))
                set_optimizer_state_dict(module, opt.optimizer, box["optimizer"])
        else:
            self.optimizer.load_state_dict(s["optimizer"])
            if self.critic is not None:
                self.critic_optimizer.load_state_dict(s["critic_optimizer"])
        self.sched.load_state_dict(s["scheduler"])
        self.updates = s["updates"]
        self.global_step = s["step"]
        if self.critic is not None:
            self.critic_sched.load_state_dict(s["critic_scheduler"])
        ranks = s.get("rng_ranks")
        rank = self.acc.process_index
        set_rng_state(ranks[rank] if ranks and len(ranks) == self.world else s["rng"])

    def save(self, out: Path, extra: dict[str, Any]) -> Path:
        """Write checkpoint ``out``; every rank calls it. Rank 0 writes the HF weights (gathered
        from the shards under FSDP), the tokenizer, the critic and ``trainer_state.pt`` (with
        every rank's RNG state); under FSDP each rank also writes its optimiser shard
        (``torch.distributed.checkpoint``) into the same folder before it is renamed into
        place. Multi-node runs need ``SR1_HOME`` on a shared filesystem for this."""
        acc = self.acc
        state = {**self.state_dict(), **extra}
        if self.world > 1:
            state["rng_ranks"] = gather_objects(acc, rng_state())
        full = _gathered_state_dict(self.policy) if self.fsdp else None  # collectives
        critic = self.acc.unwrap_model(self.critic) if self.critic is not None else None
        cfull = _gathered_state_dict(self.critic) if (self.fsdp and critic is not None) else None
        tmp: Path | None = None
        if self.fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            tmp = Path(
                broadcast_object(acc, str(begin_checkpoint(out)) if acc.is_main_process else None)
            )
            for folder, module, opt in self._optimizers():
                box = {"optimizer": get_optimizer_state_dict(module, opt.optimizer)}
                dcp.save(box, checkpoint_id=str(tmp / folder))
            acc.wait_for_everyone()
        if acc.is_main_process:
            save_checkpoint(
                out,
                self.model,
                self.tokenizer,
                state,
                critic,
                tmp=tmp,
                state_dict=full,
                critic_state_dict=cfull,
            )
        return out


def _gathered_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights of an FSDP-sharded ``module``, on CPU, on rank 0 (empty elsewhere); a
    collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=opts)


# -- metrics from trajectories -------------------------------------------------------------------
@dataclass(frozen=True)
class TrajSummary:
    """What the step metrics need of one trajectory (small: gathered from every rank)."""

    reward: float
    em: float
    f1: float
    well_formed: float
    answered: bool
    num_searches: int
    gen_tokens: int
    response_len: int
    prompt_len: int
    gen_time_s: float
    retrieval_time_s: float
    policy_version: int
    hops: int  # 0: unknown


def summarize(trajs: Sequence[Trajectory]) -> list[TrajSummary]:
    """:class:`TrajSummary` of each trajectory."""
    return [
        TrajSummary(
            reward=float(t.reward),
            em=float(t.metrics.get("em", 0.0)),
            f1=float(t.metrics.get("f1", 0.0)),
            well_formed=float(t.metrics.get("well_formed", 0.0)),
            answered=t.answer is not None,
            num_searches=int(t.num_searches),
            gen_tokens=int(sum(t.loss_mask)),
            response_len=len(t.response_ids),
            prompt_len=len(t.prompt_ids),
            gen_time_s=float(t.gen_time_s),
            retrieval_time_s=float(t.retrieval_time_s),
            policy_version=int(t.policy_version),
            hops=int(t.hops),
        )
        for t in trajs
    ]


def rollout_metrics(
    trajs: Sequence[Trajectory] | Sequence[TrajSummary], max_turns: int
) -> dict[str, float]:
    """Reward, EM, format, search and length statistics of one step's trajectories (or their
    summaries). ``search/mean_{1,2}hop``: searches per question by the question's hop count,
    where the data records it (the synthetic world does)."""
    xs = [x if isinstance(x, TrajSummary) else summarize([x])[0] for x in trajs]
    n = max(1, len(xs))
    mean = lambda vs: sum(vs) / n  # noqa: E731
    resp = [x.response_len for x in xs]
    gen = [x.gen_tokens for x in xs]
    m = {
        "reward/mean": mean([x.reward for x in xs]),
        "reward/em": mean([x.em for x in xs]),
        "reward/f1": mean([x.f1 for x in xs]),
        "reward/format_valid": mean([x.well_formed for x in xs]),
        "reward/answered": mean([float(x.answered) for x in xs]),
        "search/mean": mean([x.num_searches for x in xs]),
        "length/gen_tokens_mean": mean(gen),
        "length/response_mean": mean(resp),
        "length/total_mean": mean([x.prompt_len + x.response_len for x in xs]),
        "length/masked_share": (sum(resp) - sum(gen)) / max(1, sum(resp)),
        "time/gen_s": sum(x.gen_time_s for x in xs),
        "time/retrieval_s": sum(x.retrieval_time_s for x in xs),
    }
    for k in range(max_turns + 1):  # histogram buckets: share of trajectories with k searches
        m[f"search/frac_{k}"] = mean([float(x.num_searches == k) for x in xs])
    for h in (1, 2):
        at = [x for x in xs if x.hops == h]
        if at:
            m[f"search/mean_{h}hop"] = sum(x.num_searches for x in at) / len(at)
            m[f"reward/em_{h}hop"] = sum(x.em for x in at) / len(at)
    m["perf/gen_tokens_per_s"] = sum(gen) / max(m["time/gen_s"], 1e-9)
    return m


# -- orchestration -----------------------------------------------------------------------------
def _load_train_rows(cfg: ExperimentConfig, tokenizer: Any) -> list[dict[str, Any]]:
    """Training rows (id, question, golden_answers, data_source, prompt) for this tokenizer."""
    from sr1.data.prepare import load_split, train_mix
    from sr1.data.prompts import render_prompt

    d = cfg.data
    if len(d.train_datasets) == 1:
        rows = load_split(
            d.train_datasets[0], "train", source_dir=d.source_dir, limit=d.max_train_examples
        )
    else:
        rows = train_mix(
            d.train_datasets, source_dir=d.source_dir, limit=d.max_train_examples, seed=d.seed
        )
    return [
        dict(
            r,
            prompt=render_prompt(
                r["question"], method=d.search_prompt, template=d.template, tokenizer=tokenizer
            ),
        )
        for r in rows
    ]


def train(
    cfg: ExperimentConfig,
    algo: str,
    model: str,
    resume: str | None = None,
    max_steps: int | None = None,
    progress: ProgressFactory | None = None,
    rows: list[dict[str, Any]] | None = None,
    retriever: Any | None = None,
) -> dict[str, Any]:
    """Run RL training; returns ``{run_id, checkpoint, steps: [per-step metrics], ...}``.

    SIGINT or SIGTERM during training: the current step finishes, a ``step-N`` checkpoint is
    written, the run is marked ``interrupted`` and :class:`sr1.tracking.run.RunInterrupted`
    is raised (its ``result`` is this dict so far, its ``exit_code`` 130 or 143); a second
    signal stops at once. Only the newest ``trainer.keep_checkpoints`` ``step-N`` folders
    are kept (plus ``final``).

    ``resume=RUN_ID`` reloads that run's config and latest ``step-N`` checkpoint and continues
    with the same data order, optimiser and RNG state (``cfg``/``algo``/``model`` are then
    ignored). ``rows`` (with rendered ``prompt``) and ``retriever`` replace the configured
    training data and index, for library use and tests. ``progress`` reports steps, labelled
    with the latest mean reward, on the main process (:mod:`sr1.progress`; None: silent).
    """
    from sr1.envs import make_env
    from sr1.retrieval import open_retriever
    from sr1.tracking.run import RunInterrupted, StopSignals, start_run_on_rank0

    init_ckpt = None
    if resume is not None:
        run_dir = paths.run_dir(resume)  # a run id, never a path out of SR1_HOME
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.is_file():
            raise NotFoundError(
                f"run {resume!r} has no saved config at {cfg_path}",
                hint="list runs with `sr1 runs list`",
            )
        cfg = resolve_config(cfg_path)
        clean_stale(run_dir / "checkpoints")  # a killed save's or prune's leftovers
        init_ckpt = latest_checkpoint(run_dir / "checkpoints")
        if init_ckpt is None:
            raise NotFoundError(
                f"run {resume!r} has no checkpoint to resume from",
                hint="it stopped before its first save; start a new run",
            )
    else:
        ALGOS.get(algo)
        cfg = dataclasses.replace(
            cfg,
            algorithm=dataclasses.replace(cfg.algorithm, name=algo),
            model=dataclasses.replace(cfg.model, name=model),
        )
    total = max_steps if max_steps is not None else cfg.trainer.max_steps
    n = cfg.rollout.n_samples
    accelerator = make_accelerator(cfg)
    trainer = RLTrainer(cfg, accelerator=accelerator, init_ckpt=init_ckpt)
    base = trainer.base
    if rows is None:
        rows = _load_train_rows(cfg, trainer.tokenizer)
    order = DataOrder(len(rows), cfg.data.seed)
    start = 0
    if init_ckpt is not None:
        st = load_state(init_ckpt)
        trainer.load_state_dict(st, init_ckpt)
        order.load(st["data"])
        start = int(st["step"])
    if retriever is None and cfg.rollout.env == "search":
        retriever = open_retriever(cfg.retrieval.index, cfg.retrieval)
    env = make_env(cfg.rollout.env, retriever=retriever, topk=cfg.rollout.topk)
    reward_fn = make_reward_fn(cfg.algorithm)
    world = accelerator.num_processes
    steps: list[dict[str, float]] = []
    ckpt_dir: Path | None = None
    last_ckpt: Path | None = init_ckpt
    last_saved = start
    interrupted = False
    # MLflow gets a step's metrics once a checkpoint covers it (commit_metrics after each
    # save), so a step redone after a kill and resume is in MLflow once (see sr1.tracking.run).
    # rank 0 alone opens, logs and closes the run (the others hold its id and folder)
    with start_run_on_rank0(
        accelerator,
        kind="train",
        name=f"{cfg.algorithm.name}-{cfg.model.name}",
        config=to_dict(cfg),
        model=cfg.model.name,
        resume=resume,
        experiment=cfg.tracking.experiment,
        mlflow_uri=cfg.tracking.mlflow_uri,
        defer_mlflow_metrics=True,
    ) as run:
        ckpt_dir = run.dir / "checkpoints"
        # the engine (started / reached / built here, weights of version `start` pushed) and
        # each step's rollouts; closed (an engine process stopped) when the block ends
        engine_and_rollouts = trainer.rollouts(run, env, rows, order, reward_fn, start, total)
        if resume is not None:
            run.rewind(start)  # steps after the checkpoint are redone: drop what was logged
        if resume is None:
            run.log_params(
                {
                    "algo": cfg.algorithm.name,
                    "adv_estimator": trainer.adv_name,
                    "group_size": n,
                    "base_model": base,
                    "world_size": world,
                    "distributed": "fsdp" if trainer.fsdp else ("ddp" if world > 1 else "none"),
                    "per_rank_prompts": cfg.trainer.prompts_per_step // world,
                    "per_rank_batch": cfg.trainer.prompts_per_step // world * n,
                    "per_rank_mini_batch": trainer.rank_mini_batch,
                    "n_train_rows": len(rows),
                    "dtype": str(trainer.dtype).removeprefix("torch."),
                    "engine_dtype": trainer.engine_dtype(),
                    "engine_openmp": engine_openmp_report(cfg),
                    "engine_pause": pauses_engine(cfg),
                    "cpu_malloc_cache": trainer.malloc_cache,
                    "mixed_precision": cfg.trainer.mixed_precision,
                    "mixed_precision_resolved": models.resolve_mixed_precision(
                        cfg.trainer.mixed_precision, str(trainer.acc.device)
                    ),
                    "cpu_bf16_native": models.cpu_bf16_native(),
                }
            )
        keep = cfg.trainer.keep_checkpoints

        def save(step: int) -> Path:
            out = _save(trainer, accelerator, ckpt_dir / f"step-{step}", step, order)
            if accelerator.is_main_process:
                prune_checkpoints(ckpt_dir, keep)
            run.commit_metrics(step)
            return out

        # SIGINT/SIGTERM: finish the step, checkpoint, stop (a second signal stops at once)
        with StopSignals() as stop, engine_and_rollouts as rollouts:
            bars = resolve_progress(progress) if accelerator.is_main_process else silent
            with bars("train", total, start) as advance:
                for step in range(start + 1, total + 1):
                    if any_rank(accelerator, stop.set):
                        break
                    t0 = time.perf_counter()
                    # this step's batch: rolled out now, or (trainer.async_steps) ahead of time
                    trajs = rollouts.get(step)
                    t1 = time.perf_counter()
                    with rollouts.idle():  # the engine process frozen (rollout.engine_pause)
                        m = trainer.step_on(trajs)
                    tu = time.perf_counter()
                    rollouts.push(trainer.engine_weights(), step)  # the engine now samples v=step
                    t2 = time.perf_counter()
                    trained = sum(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
                    epochs = cfg.trainer.ppo_epochs
                    timing = {
                        "time/rollout_s": t1 - t0,
                        "time/update_s": tu - t1,
                        "time/weight_sync_s": t2 - tu,
                        "time/train_s": t2 - t1,
                        "time/step_s": t2 - t0,
                        "perf/train_tokens_per_s": trained * epochs / max(t2 - t1, 1e-9),
                        "perf/update_tokens_per_s": trained * epochs / max(tu - t1, 1e-9),
                    }
                    m.update(reduce_timings(accelerator, timing))  # slowest rank; sums
                    # what the forwards computed, padding included (every rank's tokens over
                    # the slowest rank's update time)
                    m["perf/update_padded_tokens_per_s"] = m["perf/update_padded_tokens"] / max(
                        m["time/update_s"], 1e-9
                    )
                    steps.append({"step": step, **m})
                    stopping = any_rank(accelerator, stop.set)
                    if step % cfg.tracking.log_every == 0 or step == total:
                        run.log_metrics(step, m)  # also the run's heartbeat
                    else:
                        run.heartbeat()
                    if step % cfg.trainer.save_every == 0 or step == total or stopping:
                        last_ckpt, last_saved = save(step), step
                    advance(1, description=f"step {step} reward {m['reward/mean']:.3f}")
                    if stopping:
                        break
            done = steps[-1]["step"] if steps else start
            interrupted = any_rank(accelerator, stop.set) and done < total
            if interrupted and done > last_saved:  # stopped between a step and its save
                last_ckpt, last_saved = save(done), done
        final = None
        if not interrupted and last_ckpt is not None and accelerator.is_main_process:
            final = ckpt_dir / "final"
            with StopSignals():  # every step is done: a signal now waits for the copy
                link_copy(last_ckpt, final)
            run.log_artifact(final, kind="checkpoint")
        result = {
            "run_id": run.run_id,
            "checkpoint": str(final or last_ckpt) if (final or last_ckpt) else None,
            "steps": steps,
            "interrupted": interrupted,
            "algo": cfg.algorithm.name,
            "group_size": n,
            "start_step": start,
        }
        if interrupted:
            run.log_params({"interrupted_at_step": done})
            accelerator.wait_for_everyone()
            raise RunInterrupted(
                run_id=run.run_id,
                kind="train",
                signum=stop.signum or signal.SIGTERM,  # None here: another rank got it
                step=done,
                checkpoint=str(last_ckpt) if last_ckpt else None,
                result=result,
            )
        accelerator.wait_for_everyone()
        return result


def _save(trainer: RLTrainer, acc: Any, out: Path, step: int, order: DataOrder) -> Path:
    """Every rank takes part (FSDP gathers and per-rank optimiser shards); rank 0 writes."""
    acc.wait_for_everyone()
    trainer.save(out, {"step": step, "data": order.state()})
    acc.wait_for_everyone()
    return out


def steps_per_second(steps: Sequence[dict[str, float]]) -> float:
    """Mean seconds per step over a run's step metrics (for notes and benchmarks)."""
    xs = [s["time/step_s"] for s in steps if "time/step_s" in s]
    return sum(xs) / len(xs) if xs else math.nan
