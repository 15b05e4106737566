"""RL learns: on a small synthetic task the mean reward rises by a clear margin (fixed seed).

The task is a bandit run through the real trainer. `sft` first teaches tiny-qwen2 the answer
format on one question whose gold answer cycles through four names, so the warm-started model
answers each name about a quarter of the time. GRPO then rewards only one of them (EM against
``Qelm``); only the policy gradient can move the rate from ~0.25 towards 1. Single-turn
(``max_turns=0``) to fit CI on 2 cores: with the search turn the random-init model needs far
more SFT to keep the format under T=1 sampling (tried: reward stayed 0 after 40 SFT updates).
The masking of retrieved tokens is covered by the trainer-step and rollout tests. Real
tokenizer, model, rollout loop (HF engine), GRPO, stores; seeds fixed by the config.
"""

from __future__ import annotations

import pytest
import torch

from sr1.train.sft import sft
from sr1.train.trainer import train

from .helpers import build_tiny_index, tiny_cfg

NAMES = ["Qelm", "Dast", "Miredal", "Voss"]


def _rows(answers: list[str]) -> list[dict]:
    return [
        {"id": f"r{i}", "question": "Where is it?", "golden_answers": [a], "data_source": "tiny",
         "prompt": "Q: Where is it?\n", "metadata": {"queries": ["capital of Zorvia"]}}
        for i, a in enumerate(answers)
    ]  # fmt: skip


@pytest.mark.slow
def test_grpo_raises_the_reward_after_sft(tiny_qwen2, tmp_path):
    torch.set_num_threads(2)
    index = build_tiny_index(tmp_path)
    cfg = tiny_cfg(
        "grpo",
        f"retrieval.index={index}",
        "rollout.max_turns=0",
        "rollout.max_response_length=24",
        "rollout.max_total_response_length=48",
        "rollout.n_samples=4",
        "rollout.temperature=1.0",
        "trainer.prompts_per_step=4",
        "trainer.mini_batch_size=16",
        "trainer.micro_batch_size=16",
        "trainer.sft_examples=32",
        "trainer.sft_epochs=40",
        "trainer.sft_lr=1e-2",
        "trainer.lr=1e-3",
        "trainer.save_every=100",
        "algorithm.kl_coef=0",
        "algorithm.entropy_coef=0",
    )
    warm = sft(cfg, tiny_qwen2, index, progress=False, rows=_rows(NAMES * 8))
    res = train(
        cfg, "grpo", str(warm["checkpoint"]), max_steps=20, progress=False,
        rows=_rows(["Qelm"] * 16),
    )  # fmt: skip
    r = [s["reward/mean"] for s in res["steps"]]
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    print("sft loss:", [round(s["sft/loss"], 2) for s in warm["steps"]])
    print("reward per step:", [round(x, 2) for x in r])
    assert 0.05 < first < 0.6, r  # the warm-started model answers Qelm sometimes, not always
    assert last > first + 0.25, r
