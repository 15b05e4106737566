"""Probe the CLI with bad inputs, as a demanding user would, and count how each ends (JSON).

Each case runs ``sr1.cli.main.main(argv)`` in this process on a fresh temporary SR1_HOME and is
classified: ``clear`` (exit 2 with exactly one ``error:`` line and no traceback), ``traceback``
(an exception escaped), ``accepted`` (exit 0: the bad value was silently taken) or ``other``
(any other exit). Nothing heavy runs: every case must be refused before a model is loaded.

    .venv/bin/python benchmarks/probe_bad_inputs.py > probe.json
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

TRAIN = ["train", "--algo", "grpo", "--model", "tiny-qwen2"]
EVAL = ["eval", "-d", "nq", "--model", "tiny-qwen2"]
SETS = [
    "rollout.topk=0", "rollout.topk=-1", "rollout.topk=abc", "rollout.temperature=-1",
    "rollout.temperature=nan", "rollout.max_turns=1000000", "rollout.max_turns=-1",
    "rollout.max_response_length=0", "rollout.max_total_response_length=0",
    "rollout.max_prompt_length=0", "rollout.top_p=0", "rollout.top_p=1.5", "rollout.n_samples=0",
    "rollout.batch_size=0", "rollout.engine=sglang", "rollout.env=python", "rollout.seed=-1",
    "trainer.save_every=0", "trainer.lr=0", "trainer.lr=-1", "trainer.lr=nan", "trainer.lr=.inf",
    "trainer.prompts_per_step=0", "trainer.ppo_epochs=0", "trainer.mini_batch_size=0",
    "trainer.micro_batch_size=0", "trainer.grad_clip=0", "trainer.max_steps=0",
    "trainer.mixed_precision=fp8", "trainer.lora_rank=-1", "trainer.freeze_layers=-2",
    "trainer.keep_checkpoints=-1", "tracking.log_every=0", "model.device=gpu7", "model.dtype=int4",
    "algorithm.kl_estimator=k9", "algorithm.reward=bleu", "algorithm.gamma=2",
    "algorithm.clip_ratio=0", "algorithm.loss_agg=mean", "algorithm.policy_loss=dpo",
    "algorithm.adv_estimator=xyz", "algorithm.kl_coef=-1", "eval.batch_size=0",
    "retrieval.topk=0", "retrieval.bm25_b=2", "retrieval.retriever=colbert",
    "scoring.default_task=chess", "nosuchsection.x=1", "rollout.nosuchkey=1", "rollout",
    "rollout.topk", "trainer.lr=1e-5=3",
]  # fmt: skip
OTHER = [
    TRAIN + ["--max-steps", "0"], TRAIN + ["--max-steps", "-5"],
    ["train", "--algo", "dpo", "--model", "tiny-qwen2"], ["train", "--algo", "grpo"],
    ["train", "--resume", "../../x"], ["train", "--resume", "no-such-run"],
    EVAL + ["--limit", "0"], EVAL + ["--limit", "-1"], EVAL + ["--engine", "sglang"],
    EVAL + ["--method", "ircot"], EVAL + ["--split", "../../x"], ["eval", "--model", "tiny-qwen2"],
    ["eval", "-d", "nosuchset", "--model", "tiny-qwen2"], ["eval", "-d", "nq", "--run", "nope"],
    ["data", "prepare", "nq", "--split", "../../x"], ["data", "prepare", "nosuchset"],
    ["index", "build", "../evil", "--corpus-file", "/nonexistent.jsonl"],
    ["search", "q", "--index", "nosuchindex"], ["search", "q", "--index", "x", "-k", "0"],
    ["sft", "--model", "tiny-qwen2", "--index", "x", "--max-steps", "0"],
    ["rollout", "--model", "tiny-qwen2", "--index", "x", "--dataset", "nq", "--limit", "0"],
    ["runs", "show", "no-such-run"], ["report", "no-such-run"],
    ["train", "--config", "/nonexistent.yaml", "--algo", "grpo", "--model", "m"],
]  # fmt: skip


def cases(tmp: Path) -> list[list[str]]:
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("rollout: [unclosed\n")
    latin = tmp / "latin.yaml"
    latin.write_bytes("rollout:\n  topk: 3 # caf\xe9\n".encode("latin-1"))
    fake_gz = tmp / "corpus.jsonl.gz"
    fake_gz.write_text('{"id": "1", "contents": "x"}\n')
    out = [TRAIN + ["--set", s] for s in SETS] + OTHER
    out += [TRAIN + ["--config", str(bad_yaml)], TRAIN + ["--config", str(latin)]]
    out += [["index", "build", "c", "--corpus-file", str(fake_gz)]]
    return out


def run(argv: list[str]) -> dict:
    from sr1.cli.main import main

    err, outb = io.StringIO(), io.StringIO()
    with tempfile.TemporaryDirectory() as home:
        os.environ["SR1_HOME"] = home
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(outb):
            try:
                code = main(argv)
                tb = False
            except BaseException:  # noqa: BLE001 - a probe records whatever escaped
                traceback.print_exc(file=err)
                code, tb = 1, True
    text = err.getvalue()
    n_err = sum(ln.startswith("error:") for ln in text.splitlines())
    usage = "Usage:" in text and code == 2  # click's own usage error box (also exit 2)
    if tb or "Traceback" in text:
        kind = "traceback"
    elif code == 2 and (n_err == 1 or usage):
        kind = "clear"
    elif code == 0:
        kind = "accepted"
    else:
        kind = "other"
    return {"argv": argv, "exit": code, "kind": kind, "first_line": text.strip().splitlines()[:1]}


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        results = [run(a) for a in cases(Path(d))]
    counts: dict[str, int] = {}
    for r in results:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    json.dump({"tried": len(results), "counts": counts, "results": results}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
