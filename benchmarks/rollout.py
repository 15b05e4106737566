"""Rollout benchmark: what interleaving search costs, HF vs vLLM on this machine.

Prints one JSON document on stdout (progress on stderr). For each engine (``hf``, ``vllm``)
on the same model and the same prompts (Search-R1 prompts for NQ dev questions from the
shared sample data):

- ``plain``: one ``engine.generate`` call, no stop strings, ``max_response_length`` new
  tokens per prompt: generated tokens/s.
- ``search``: ``run_rollouts`` with the real BM25 index over the 33k-passage sample corpus
  (built with ``sr1.retrieval``): sampled (mask 1) tokens/s over the whole rollout wall
  time, the ratio to ``plain``, the share of wall time in retrieval, searches and turns.

A random model never writes tags, so by default the model (tiny-qwen2) is first taught the
format with ``--teach-steps`` masked SFT steps on gold trajectories of NQ *train* questions
(``<search> question </search>``, the real observation, ``<answer> gold </answer>``); it
then samples (temperature 1) real searches on unseen dev questions. ``--teach-steps 0``
with ``--model smollm2-135m`` measures a real small model, which almost never searches
(its turns are invalid, so the rollout still runs every turn with notices).

Run: ``.venv/bin/python benchmarks/rollout.py [--model tiny-qwen2] [--n 16] [--engines hf,vllm]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._scratch import scratch_dir  # noqa: E402

PROMPT = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. After reasoning, if you find you lack some knowledge, "
    "you can call a search engine by <search> query </search> and it will return the top "
    "searched results between <information> and </information>. You can search as many times "
    "as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, "
    "<answer> Beijing </answer>. Question: {q}\n"
)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def render(question: str, tok: Any) -> str:
    """The paper's base prompt (sr1.data.prompts when present, else the method.md text)."""
    try:
        from sr1.data.prompts import render_prompt

        return render_prompt(question, method="search", template="base", tokenizer=tok)
    except ImportError:
        q = question.strip()
        return PROMPT.format(q=q if q.endswith("?") else q + "?")


def rows_from(path: Path, n: int, tok: Any) -> list[dict[str, Any]]:
    from sr1.io import read_jsonl

    rows = []
    for r in read_jsonl(path):
        rows.append(
            {
                "id": str(r["id"]),
                "question": r["question"],
                "golden_answers": list(r["golden_answers"]),
                "data_source": "nq",
                "prompt": render(r["question"], tok),
            }
        )
        if len(rows) == n:
            break
    return rows


def teach(model: Any, tok: Any, rows: list[dict], retriever: Any, cfg: Any, steps: int) -> float:
    """Masked SFT on gold search trajectories so the tiny model writes the tags. Returns s."""
    import torch

    from sr1.rollout.loop import observation_ids

    enc = lambda s: list(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    seqs = []
    hits = retriever.search([r["question"] for r in rows], k=cfg.topk)
    for r, passages in zip(rows, hits, strict=True):
        p, t1 = enc(r["prompt"]), enc(f"<search> {r['question']} </search>")
        obs = observation_ids(tok, passages, cfg.max_obs_length, "</search>")
        t2 = enc(f"<answer> {r['golden_answers'][0]} </answer>")
        ids = p + t1 + obs + t2
        mask = [0] * len(p) + [1] * len(t1) + [0] * len(obs) + [1] * len(t2)
        seqs.append((ids, mask))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        ids_l, mask_l = seqs[step % len(seqs)]
        ids = torch.tensor([ids_l])  # (1, T)
        m = torch.tensor(mask_l[1:], dtype=torch.float32)  # (T-1,)
        logits = model(ids).logits[0, :-1].float()  # (T-1, V)
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        loss = (nll * m).sum() / m.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            log(f"teach step {step}: loss {loss.item():.3f}")
    model.eval()
    return time.perf_counter() - t0


def bench_engine(
    name: str, model_path: str, tok: Any, rows: list[dict], retriever: Any, cfg: Any
) -> dict[str, Any]:
    from sr1.rollout.engines import make_engine
    from sr1.rollout.loop import run_rollouts

    t0 = time.perf_counter()
    eng = make_engine(name, model_path, tok, cfg, device="cpu", dtype="float32")
    startup = time.perf_counter() - t0
    prompts = [list(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows]
    eng.generate(prompts[:2], 4, [], temperature=1.0, seed=0)  # warm-up
    t0 = time.perf_counter()
    outs = eng.generate(prompts, cfg.max_response_length, [], temperature=1.0, seed=1)
    plain_s = time.perf_counter() - t0
    plain_tokens = sum(len(o.token_ids) for o in outs)
    log(f"{name}: plain {plain_tokens} tokens in {plain_s:.1f}s")
    t0 = time.perf_counter()
    trajs = run_rollouts(eng, retriever, rows, cfg, progress=False, seed=2)
    wall = time.perf_counter() - t0
    sampled = sum(sum(t.loss_mask) for t in trajs)
    retrieval = sum(t.retrieval_time_s for t in trajs)
    gen = sum(t.gen_time_s for t in trajs)
    n = len(trajs)
    log(f"{name}: search rollout {sampled} sampled tokens in {wall:.1f}s")
    plain_tps = plain_tokens / plain_s
    search_tps = sampled / wall
    reasons: dict[str, int] = {}
    for t in trajs:
        reasons[t.finish_reason] = reasons.get(t.finish_reason, 0) + 1
    return {
        "startup_s": round(startup, 2),
        "plain": {
            "prompts": len(prompts),
            "generated_tokens": plain_tokens,
            "wall_s": round(plain_s, 3),
            "tokens_per_s": round(plain_tps, 1),
        },
        "search": {
            "trajectories": n,
            "sampled_tokens": sampled,
            "inserted_tokens": sum(len(t.loss_mask) - sum(t.loss_mask) for t in trajs),
            "wall_s": round(wall, 3),
            "gen_s": round(gen, 3),
            "retrieval_s": round(retrieval, 4),
            "retrieval_share": round(retrieval / wall, 4),
            "other_share": round(max(0.0, wall - gen - retrieval) / wall, 4),
            "sampled_tokens_per_s": round(search_tps, 1),
            "searches_per_traj": sum(t.num_searches for t in trajs) / n,
            "turns_per_traj": sum(sum(1 for k, _, _ in t.segments if k == "gen") for t in trajs)
            / n,
            "answered": sum(t.answer is not None for t in trajs) / n,
            "finish_reasons": dict(sorted(reasons.items())),
        },
        "search_over_plain_tokens_per_s": round(search_tps / plain_tps, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-qwen2")
    ap.add_argument("--n", type=int, default=16, help="Questions (NQ dev).")
    ap.add_argument("--teach-steps", type=int, default=60, help="Format SFT steps (0 = none).")
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--max-response-length", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    from sr1 import models
    from sr1.config import RetrievalConfig, RolloutConfig
    from sr1.paths import shared_data_dir
    from sr1.retrieval import open_retriever
    from sr1.retrieval.index import build_index

    data = shared_data_dir()
    if data is None:
        sys.exit("the shared sample data is absent (set SR1_SHARED_DATA)")
    work = scratch_dir("sr1-bench-rollout-")
    os.environ.setdefault("SR1_HOME", str(work / "home"))
    cfg = RolloutConfig(
        max_turns=2,
        topk=3,
        max_response_length=args.max_response_length,
        max_obs_length=200,
        max_total_response_length=1024,
        batch_size=args.n,
        temperature=1.0,
    )
    t0 = time.perf_counter()
    build_index("bench-wiki", corpus_file=data / "corpus" / "wiki-sample.jsonl", progress=False)
    retriever = open_retriever("bench-wiki", RetrievalConfig())
    index_s = time.perf_counter() - t0
    log(f"BM25 index over the sample corpus in {index_s:.1f}s")

    src = str(models.fetch(args.model))
    tok = models.load_tokenizer(src)
    model_path, teach_s = src, 0.0
    if args.teach_steps > 0:
        model = models.load_model(src, device="cpu", dtype="float32")
        train_rows = rows_from(data / "qa" / "nq" / "train.jsonl", 32, tok)
        teach_s = teach(model, tok, train_rows, retriever, cfg, args.teach_steps)
        model_path = str(work / "taught")
        model.save_pretrained(model_path)
        tok.save_pretrained(model_path)
    rows = rows_from(data / "qa" / "nq" / "dev.jsonl", args.n, tok)

    result: dict[str, Any] = {
        "model": args.model,
        "teach_steps": args.teach_steps,
        "teach_s": round(teach_s, 1),
        "questions": args.n,
        "threads": args.threads,
        "index_build_s": round(index_s, 1),
        "rollout_config": dataclasses.asdict(cfg),
        "engines": {},
    }
    for name in [e for e in args.engines.split(",") if e]:
        try:
            result["engines"][name] = bench_engine(name, model_path, tok, rows, retriever, cfg)
        except Exception as e:  # noqa: BLE001 - report an engine that cannot run, keep the rest
            result["engines"][name] = {"error": f"{type(e).__name__}: {e}"}
    eng = result["engines"]
    if all("plain" in eng.get(k, {}) for k in ("hf", "vllm")):
        result["vllm_over_hf"] = {
            "plain": round(
                eng["vllm"]["plain"]["tokens_per_s"] / eng["hf"]["plain"]["tokens_per_s"], 2
            ),
            "search": round(
                eng["vllm"]["search"]["sampled_tokens_per_s"]
                / eng["hf"]["search"]["sampled_tokens_per_s"],
                2,
            ),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
