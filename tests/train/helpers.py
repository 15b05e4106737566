"""Trainer test helpers: hand-built trajectories with Search-R1-shaped masks (real tokenizer
ids), a tiny config, and a real BM25 index over a few made-up passages."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from sr1.config import ExperimentConfig, resolve_config
from sr1.rollout.types import Trajectory

TURN = "<think> look it up </think>\n<search> capital of Zorvia </search>"
INFO = "\n\n<information>Doc 1(Title: Zorvia) Qelm is the capital.</information>\n\n"
ANSWER = "<think> found it </think>\n<answer> Qelm </answer>"

PASSAGES = [
    ("p1", '"Zorvia"\nZorvia is a country. Its capital city is Qelm, on the river Dast.'),
    ("p2", '"Qelm"\nQelm is the capital of Zorvia and was founded by Anra Voss in 1712.'),
    ("p3", '"Anra Voss"\nAnra Voss was an explorer born in the port town of Miredal.'),
    ("p4", '"Miredal"\nMiredal is a harbour town known for its glass works.'),
]
QUESTIONS = [
    ("q0", "What is the capital of Zorvia?", ["Qelm"]),
    ("q1", "Who founded Qelm?", ["Anra Voss"]),
    ("q2", "Where was Anra Voss born?", ["Miredal"]),
    ("q3", "What is Miredal known for?", ["glass works", "glass"]),
]


def enc(tok: Any, s: str) -> list[int]:
    return list(tok(s, add_special_tokens=False)["input_ids"])


def hand_trajectories(tok: Any, n_prompts: int = 4, n_samples: int = 2) -> list[Trajectory]:
    """``n_prompts * n_samples`` trajectories: policy turn (cut at a random length),
    information block (mask 0), answer. Rewards differ inside every group, so group-relative
    advantages are nonzero; prompts differ in length, so padding is exercised."""
    rng = random.Random(0)
    out = []
    for g in range(n_prompts):
        prompt = f"Question {g}: " + "what is the capital of Zorvia? " * (1 + g % 2)
        for s in range(n_samples):
            pol = enc(tok, TURN)
            pol = pol[: rng.randint(4, len(pol))]
            info, ans = enc(tok, INFO), enc(tok, ANSWER)
            mask = [1] * len(pol) + [0] * len(info) + [1] * len(ans)
            reward = float(s == g % n_samples)
            out.append(
                Trajectory(
                    id=f"q{g}", question=prompt, golden_answers=["Qelm"], data_source="test",
                    prompt=prompt, prompt_ids=enc(tok, prompt), response_ids=pol + info + ans,
                    loss_mask=mask, logprobs=[-1.0 * m for m in mask], reward=reward, group=g,
                    num_searches=1, metrics={"em": reward, "well_formed": 1.0},
                )
            )  # fmt: skip
    return out


def tiny_cfg(algo: str = "grpo", *sets: str) -> ExperimentConfig:
    """Small sizes for tiny-qwen2 on 2 CPU cores; ``sets`` are extra ``key=value`` overrides."""
    base = [
        f"algorithm.name={algo}",
        "model.device=cpu",
        "rollout.n_samples=2",
        "rollout.max_turns=1",
        "rollout.max_response_length=6",
        "rollout.max_total_response_length=96",
        "rollout.max_obs_length=40",
        "rollout.topk=1",
        "trainer.prompts_per_step=2",
        "trainer.mini_batch_size=4",
        "trainer.micro_batch_size=2",
        "trainer.lr=1e-3",
        "trainer.critic_lr=1e-3",
        "algorithm.entropy_coef=0.01",
        "tracking.experiment=sr1-test",
    ]
    return resolve_config(overrides=base + list(sets))


def build_tiny_index(tmp: Path, name: str = "tiny") -> str:
    """A real BM25 index (sr1.retrieval.index.build_index) over :data:`PASSAGES`."""
    from sr1.retrieval.index import build_index

    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "contents": c}) + "\n" for i, c in PASSAGES))
    build_index(name, corpus_file=corpus, retriever="bm25", progress=False)
    return name


def rows(tok: Any) -> list[dict[str, Any]]:
    """Training rows in the common schema, prompts in the tokenizer's chat template."""
    out = []
    for i, q, gold in QUESTIONS:
        msgs = [{"role": "user", "content": f"Answer with search. Question: {q}"}]
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append({"id": i, "question": q, "golden_answers": gold, "data_source": "tiny",
                    "prompt": prompt, "metadata": {}})  # fmt: skip
    return out


def assert_heads_agree(policy: Any, b: Any, kw_a: dict, kw_b: dict) -> None:
    """``response_forward`` with ``kw_a`` and with ``kw_b`` (head paths) give the same log-probs
    and entropies at the loss's tokens, zeros elsewhere, and the same parameter gradients of
    ``lp * adv + 0.1 * ent``."""
    import torch

    from sr1.algos import core
    from sr1.train.batch import response_forward

    sel = b.response_mask > 0
    adv = torch.randn(b.response_mask.shape, generator=torch.Generator().manual_seed(0))
    out = []
    for kw in (kw_a, kw_b):
        policy.zero_grad(set_to_none=True)
        lp, ent = response_forward(policy, b, with_entropy=True, entropy_grad=True, **kw)
        assert ent is not None
        core.masked_mean(lp * adv + 0.1 * ent, b.response_mask).backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        out.append((lp.detach(), ent.detach(), grads))
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = out
    torch.testing.assert_close(lp_a[sel], lp_b[sel], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_a[sel], ent_b[sel], atol=1e-5, rtol=1e-5)
    assert torch.all(lp_a[~sel] == 0) and torch.all(ent_a[~sel] == 0)
    assert g_a.keys() == g_b.keys() and g_a
    for n in g_a:
        torch.testing.assert_close(g_a[n], g_b[n], atol=1e-6, rtol=1e-4)
