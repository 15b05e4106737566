"""Each RL step's rollouts, synchronous or ``trainer.async_steps`` policy versions ahead.

Synchronous (``async_steps=0``): step t rolls out with the weights of step t-1, then updates,
then pushes the new weights (version t) to the engine.

Asynchronous (``async_steps=k >= 1``, the engine outside the trainer's process): a producer
thread rolls out step s as soon as the engine holds version >= s-1-k, while the main thread
updates on an earlier batch. With k=1 (one-step-off) step t+1's rollout runs with version
t-1 during step t's update; the push of version t waits for that rollout to end (the engine
is never updated mid-batch: every trajectory is sampled by one version), and step t+2's
rollout starts with it. So a batch the trainer updates on at version v was sampled by version
>= v-k (``rollout/policy_lag`` <= k). The producer holds the engine for a whole batch; a push
takes it between batches.

The data order is the same as synchronous (the producer reads a copy of the seeded order; the
main thread advances the checkpointed one a step at a time), so a checkpoint at step t
resumes at step t+1's prompts. Batches in flight when a run stops are not saved: a resumed
async run re-samples them with the checkpoint's weights.

On CPU with shared cores the two threads' processes compete for the same cores; with the
engine on its own devices the rollout's time hides behind the update's (README: "Rollout
placement").
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from sr1.errors import ConfigError
from sr1.rollout.types import Trajectory


def check_async(cfg: Any) -> None:
    """``trainer.async_steps`` needs the engine outside the trainer's process: refused (a
    ConfigError) for ``rollout.placement=inprocess`` without ``rollout.engine_url``.

    The in-process engine shares the trainer's CPU cores or GPU and, for HF, its very module:
    rolling out while the optimiser steps would sample from weights being written.
    """
    rc = cfg.rollout
    if cfg.trainer.async_steps > 0 and not rc.engine_url and rc.placement == "inprocess":
        raise ConfigError(
            f"trainer.async_steps={cfg.trainer.async_steps} needs the rollout engine outside "
            "the trainer's process (in-process it would share the trainer's cores/GPU and, for "
            "hf, the module being updated)",
            hint="add --set rollout.placement=process (sr1 starts the engine), or "
            "--set rollout.engine_url=http://HOST:PORT (a running `sr1 serve engine`), or "
            "--set trainer.async_steps=0",
        )


def pauses_engine(cfg: Any) -> bool:
    """Whether ``sr1 train`` freezes the engine process it started while the trainer updates
    (``rollout.engine_pause``): synchronous, placement=process, and on (or auto with the
    engine on CPU, where it shares the trainer's cores). ``always`` where it cannot apply is a
    ConfigError."""
    from sr1 import models
    from sr1.rollout.placement import engine_device

    rc = cfg.rollout
    applies = cfg.trainer.async_steps == 0 and rc.placement == "process" and not rc.engine_url
    if rc.engine_pause == "always" and not applies:
        raise ConfigError(
            "rollout.engine_pause=always freezes the engine process sr1 starts during a "
            f"synchronous update; here rollout.placement={rc.placement}, rollout.engine_url="
            f"{rc.engine_url}, trainer.async_steps={cfg.trainer.async_steps}",
            hint="use it with --set rollout.placement=process (no engine_url) and "
            "trainer.async_steps=0, or leave rollout.engine_pause=auto",
        )
    if not applies or rc.engine_pause == "never":
        return False
    return rc.engine_pause == "always" or models.pick_device(engine_device(cfg)) == "cpu"


class StepRollouts:
    """``get(step)``: the scored trajectories of that step; ``push(weights, version)``: the
    new weights after the step's update; ``idle()``: the block (the update) in which nothing
    samples, with the engine process frozen (:func:`pauses_engine`). ``close()`` stops the
    producer (async)."""

    def __init__(
        self,
        engine: Any,
        env: Any,
        rows: Sequence[dict[str, Any]],
        order: Any,
        cfg: Any,
        reward_fn: Callable[[Trajectory], float] | None,
        *,
        start: int,
        total: int,
        rank: int = 0,
        world: int = 1,
        pushes: bool = True,
        barrier: Callable[[], None] | None = None,
        on_engine_error: Callable[[Exception], Exception] | None = None,
    ) -> None:
        self.engine, self.env, self.rows, self.order, self.cfg = engine, env, rows, order, cfg
        self.reward_fn = reward_fn
        self.k = int(cfg.trainer.async_steps)
        self.start, self.total, self.rank, self.world = start, total, rank, world
        self.pushes, self.barrier = pushes, barrier
        self.on_engine_error = on_engine_error
        self.pushed = start  # the version the engine holds
        self._cond = threading.Condition()
        self._engine_lock = threading.Lock()
        self._ready: dict[int, list[Trajectory]] = {}
        self._error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        # the engine process to freeze during each update (rollout.engine_pause), decided once
        proc = getattr(engine, "process", None)
        self._freeze = proc if self.k == 0 and proc is not None and pauses_engine(cfg) else None

    # -- one step's rollout ---------------------------------------------------------------------
    def _picked(self, order: Any) -> list[dict[str, Any]]:
        return [self.rows[i] for i in order.take(self.cfg.trainer.prompts_per_step)]

    def _rollout(self, step: int, picked: list[dict[str, Any]]) -> list[Trajectory]:
        from sr1.rollout.loop import run_rollouts
        from sr1.train.dist import rank_block

        cfg = self.cfg
        n = cfg.rollout.n_samples
        # this rank's contiguous block of the step's prompts; trajectory j of the step (on any
        # number of ranks) samples with seed base + j, so ranks change nothing that is sampled
        block = rank_block(len(picked), self.rank, self.world)
        return run_rollouts(
            self.engine,
            self.env,
            picked[block],
            cfg.rollout,
            n_samples=n,
            reward_fn=self.reward_fn,
            progress=False,
            seed=cfg.rollout.seed + 7919 * step + block.start * n,
            scoring=cfg.scoring.options(),
            default_task=cfg.scoring.default_task,
        )

    def _raise(self, e: BaseException) -> None:
        from sr1.rollout.remote import EngineError

        if isinstance(e, EngineError) and self.on_engine_error is not None:
            raise self.on_engine_error(e) from None
        raise e

    # -- the main thread's side ------------------------------------------------------------------
    def get(self, step: int) -> list[Trajectory]:
        """The trajectories of ``step`` (rolled out now, or waited for when async)."""
        if self.k == 0:
            picked = self._picked(self.order)
            try:
                with self._engine_lock:
                    return self._rollout(step, picked)
            except Exception as e:  # noqa: BLE001 - engine errors get the resume hint
                self._raise(e)
                raise
        if self._thread is None:  # the producer reads a copy of the order from this step on
            self._start_producer(step)
        self._picked(self.order)  # keep the checkpointed order in step with the producer
        with self._cond:
            while step not in self._ready and self._error is None:
                self._cond.wait(timeout=1.0)
            if step not in self._ready:
                assert self._error is not None
                self._raise(self._error)
            trajs = self._ready.pop(step)
            self._cond.notify_all()
        return trajs

    @contextlib.contextmanager
    def idle(self) -> Iterator[None]:
        """The engine frozen for the block when :func:`pauses_engine` says so (synchronous:
        no rollout is in flight), continued however the block ends; else nothing."""
        if self._freeze is not None:
            with self._freeze.paused():
                yield
        else:
            yield

    def push(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Give the engine ``version``'s weights (after an in-flight batch, if any)."""
        try:
            with self._engine_lock:
                if self.pushes:
                    self.engine.update_weights(weights, version)
                else:  # another rank pushes to the shared server; join any gathers anyway
                    for _ in weights:
                        pass
                if self.barrier is not None:
                    self.barrier()
        except Exception as e:  # noqa: BLE001 - engine errors get the resume hint
            self._raise(e)
            raise
        with self._cond:
            self.pushed = int(version)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5.0)  # a batch in flight ends when the engine is stopped

    def __enter__(self) -> StepRollouts:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the producer (async) --------------------------------------------------------------------
    def _start_producer(self, first: int) -> None:
        from sr1.train.trainer import DataOrder

        order = DataOrder(self.order.n, self.order.seed)
        order.load(self.order.state())
        self._thread = threading.Thread(
            target=self._produce, args=(first, order), name="sr1-rollouts", daemon=True
        )
        self._thread.start()

    def _produce(self, first: int, order: Any) -> None:
        step = first
        try:
            while step <= self.total:
                picked = self._picked(order)
                with self._cond:
                    # lag bound: sample step s only with version >= s-1-k; at most k+1 ahead
                    while not self._stop and (
                        self.pushed < step - 1 - self.k or len(self._ready) > self.k
                    ):
                        self._cond.wait(timeout=1.0)
                    if self._stop:
                        return
                with self._engine_lock:
                    trajs = self._rollout(step, picked)
                with self._cond:
                    self._ready[step] = trajs
                    self._cond.notify_all()
                step += 1
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            with self._cond:
                self._error = e if not self._stop else None
                self._cond.notify_all()


def policy_lag(trajs: Sequence[Trajectory], version: int) -> dict[str, float]:
    """How many versions behind ``version`` (the trainer's) the batch was sampled."""
    lags = [max(0, int(version) - int(t.policy_version)) for t in trajs]
    if not lags:
        return {}
    return {"rollout/policy_lag": sum(lags) / len(lags), "rollout/policy_lag_max": float(max(lags))}


def stale(trajs: Sequence[Trajectory], version: int) -> bool:
    """Whether any trajectory was sampled by a policy older than ``version``."""
    return any(int(t.policy_version) < int(version) for t in trajs)


__all__ = ["StepRollouts", "check_async", "pauses_engine", "policy_lag", "stale"]
