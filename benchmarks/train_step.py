"""Training-step benchmark: what mixed precision, a graph-free entropy metric, a policy-token
output head and a chunked one buy.

Prints one JSON document on stdout (progress on stderr). One micro-batch of Search-R1-shaped
rows (prompt, sampled turn, inserted information block with mask 0, answer; random token ids
of the quickstart's sizes) goes through the policy's forward and backward passes, as in
``RLTrainer._micro_loss`` with ``entropy_coef = 0``, in up to twelve variants run in alternation:

- ``mixed_precision``: ``no`` (fp32) or ``bf16`` (``torch.autocast``; weights stay fp32);
- ``entropy_grad``: ``true`` keeps the entropy's autograd graph although the loss does not use
  it (what the trainer did before), ``false`` computes it as a metric only (what it does now);
- ``logits_at``: ``all`` projects every column through the output head (prompt and inserted
  tokens too: what the trainer did before), ``policy`` only the tokens the loss sees (now);
- ``logits_chunk_mib`` (with ``policy``): ``-1`` the head's whole ``(N, V)`` logits (before),
  ``0`` auto, in chunks with the logits recomputed in backward (now; ``sr1.train.head``).

For each variant: median seconds per micro-batch, tokens/s and the process's minor page faults
(memory mapped afresh) over ``--repeats`` timed runs after one warm-up, and the speed ratio to the first fp32 variant (all variants in
one process, interleaved, so the ratios share the machine's noise).

Run: ``.venv/bin/python benchmarks/train_step.py [--model smollm2-135m] [--batch 8]
[--prompt 120] [--response 330] [--freeze 20] [--repeats 3] [--entropy-grad both|true|false]
[--mixed-precision both|no|bf16] [--logits-at both|policy|all] [--logits-chunk auto|whole|both]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._scratch import scratch_home  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8, help="rows per micro-batch")
    ap.add_argument("--prompt", type=int, default=120, help="prompt tokens per row")
    ap.add_argument("--response", type=int, default=330, help="response tokens per row")
    ap.add_argument("--freeze", type=int, default=20, help="lower layers frozen (quickstart: 20)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--entropy-grad",
        choices=("both", "true", "false"),
        default="both",
        help="which entropy variants to time (false alone halves the run: emulated bf16 on "
        "an AVX2-only CPU takes minutes per micro-batch)",
    )
    ap.add_argument(
        "--mixed-precision",
        choices=("both", "no", "bf16"),
        default="both",
        help="which autocast variants to time (no alone where bf16 is emulated)",
    )
    ap.add_argument(
        "--logits-at",
        choices=("both", "policy", "all"),
        default="both",
        help="output head at policy tokens only, at every column, or both",
    )
    ap.add_argument(
        "--logits-chunk",
        choices=("auto", "whole", "both"),
        default="auto",
        help="with logits_at=policy: the head in chunks (trainer.logits_chunk_mib=0), its whole "
        "logits at once (-1), or both",
    )
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scratch_home()
    import torch

    from sr1 import models
    from sr1.algos import core
    from sr1.config import AlgorithmConfig
    from sr1.rollout.types import Trajectory
    from sr1.train.batch import collate, response_forward

    torch.set_num_threads(args.threads)
    log(f"fetching {args.model} into {os.environ['SR1_HOME']}")
    path = str(models.fetch(args.model))
    model = models.load_model(path, device="cpu", dtype="float32")
    models.freeze_lower_layers(model, args.freeze)
    model.train()
    tok = models.load_tokenizer(path)
    vocab = len(tok)

    g = torch.Generator().manual_seed(0)
    trajs = []
    R = args.response
    info = R // 3  # one inserted information block in the middle of the response
    mask = [1] * ((R - info) // 2) + [0] * info + [1] * (R - info - (R - info) // 2)
    for b in range(args.batch):
        ids = torch.randint(100, vocab - 100, (args.prompt + R,), generator=g).tolist()
        trajs.append(
            Trajectory(
                id=f"q{b}", question="q", golden_answers=["a"], data_source="bench", prompt="q",
                prompt_ids=ids[: args.prompt], response_ids=ids[args.prompt :], loss_mask=mask,
                logprobs=[-1.0 * m for m in mask], reward=float(b % 2), group=b // 2,
            )
        )  # fmt: skip
    batch = collate(trajs, tok.pad_token_id or 0)
    adv = torch.randn(args.batch, 1).expand(-1, R).contiguous()
    n_tokens = args.batch * (args.prompt + R)

    faults: dict[tuple[str, bool, str, int], list[int]] = {}

    def step(mp: str, entropy_grad: bool, logits_at: str, chunk: int) -> float:
        model.zero_grad(set_to_none=True)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        with models.autocast(mp, "cpu"):
            lp, ent = response_forward(
                model,
                batch,
                with_entropy=True,
                entropy_grad=entropy_grad,
                logits_at=logits_at,
                logits_chunk_mib=chunk,
            )
        assert ent is not None
        loss, _ = core.policy_loss(
            "vanilla", lp, lp.detach(), adv, batch.response_mask, AlgorithmConfig()
        )
        core.masked_mean(ent.detach(), batch.response_mask)  # the logged metric
        loss.backward()
        dt = time.perf_counter() - t0
        flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        faults.setdefault((mp, entropy_grad, logits_at, chunk), []).append(flt)
        return dt

    grads = {"both": (True, False), "true": (True,), "false": (False,)}[args.entropy_grad]
    mps = ("no", "bf16") if args.mixed_precision == "both" else (args.mixed_precision,)
    heads = ("all", "policy") if args.logits_at == "both" else (args.logits_at,)
    chunks = {"auto": (0,), "whole": (-1,), "both": (-1, 0)}[args.logits_chunk]
    variants = [
        (mp, eg, at, ch)
        for mp in mps
        for eg in grads
        for at in heads
        for ch in (chunks if at == "policy" else (-1,))
    ]
    times: dict[tuple[str, bool, str, int], list[float]] = {v: [] for v in variants}
    for v in variants:
        step(*v)  # warm-up
    faults.clear()
    for r in range(args.repeats):
        for v in variants:
            times[v].append(step(*v))
        log(f"repeat {r + 1}/{args.repeats} done")
    base = statistics.median(times[variants[0]])
    rows = []
    for mp, eg, at, ch in variants:
        s = statistics.median(times[(mp, eg, at, ch)])
        rows.append(
            {
                "mixed_precision": mp,
                "entropy_grad": eg,
                "logits_at": at,
                "logits_chunk_mib": ch,
                "minor_faults": int(statistics.median(faults[(mp, eg, at, ch)])),
                "seconds_per_micro_batch": round(s, 3),
                "tokens_per_s": round(n_tokens / s, 1),
                "speedup_vs_first": round(base / s, 2),
            }
        )
    print(
        json.dumps(
            {
                "model": args.model,
                "batch": args.batch,
                "prompt_tokens": args.prompt,
                "response_tokens": R,
                "policy_tokens_per_row": sum(mask),
                "first_variant": dict(
                    zip(
                        ("mixed_precision", "entropy_grad", "logits_at", "logits_chunk_mib"),
                        variants[0],
                        strict=True,
                    )
                ),
                "frozen_layers": args.freeze,
                "threads": args.threads,
                "repeats": args.repeats,
                "dtype_report": models.dtype_report("auto", "cpu", training=True),
                "mixed_precision_auto": models.resolve_mixed_precision("auto", "cpu"),
                "variants": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
