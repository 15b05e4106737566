"""SFT warm-start: gold trajectories with real retrieval, masked like RL; a short real run."""

from __future__ import annotations

import pytest
import torch

from sr1.models import load_tokenizer
from sr1.retrieval import open_retriever
from sr1.rollout.loop import observation_ids
from sr1.train.sft import gold_trajectory, sft

from .helpers import build_tiny_index, enc, rows, tiny_cfg

torch.set_num_threads(1)


def _spans(ids: list[int], mask: list[int]) -> list[tuple[int, list[int]]]:
    out: list[tuple[int, list[int]]] = []
    for i, m in zip(ids, mask, strict=True):
        if out and out[-1][0] == m:
            out[-1][1].append(i)
        else:
            out.append((m, [i]))
    return out


def test_gold_trajectory_masks_information_tokens(tiny_qwen2, tmp_path):
    tok = load_tokenizer(tiny_qwen2)
    cfg = tiny_cfg("grpo", "rollout.max_turns=2", "rollout.topk=2", "rollout.max_obs_length=200")
    retriever = open_retriever(build_tiny_index(tmp_path))
    row = dict(
        rows(tok)[2], metadata={"gold_queries": ["who founded Qelm", "Anra Voss birthplace"]}
    )
    t = gold_trajectory(row, tok, retriever, cfg)
    assert len(t.response_ids) == len(t.loss_mask) == len(t.logprobs)
    spans = _spans(t.response_ids, t.loss_mask)
    assert [m for m, _ in spans] == [1, 0, 1, 0, 1]  # search, info, search, info, answer
    assert t.queries == ["who founded Qelm", "Anra Voss birthplace"] and t.num_searches == 2
    for (_, ids), q in zip([spans[1], spans[3]], t.queries, strict=True):
        text = tok.decode(ids)
        assert text.startswith("\n\n<information>") and text.endswith("</information>\n\n")
        # exactly the block the rollout loop would insert for the real retrieved passages
        turn = tok.decode(spans[0][1] if q == t.queries[0] else spans[2][1])
        assert ids == observation_ids(tok, retriever.search([q], k=2)[0], 200, turn)
    assert "Anra Voss" in tok.decode(spans[1][1])  # real retrieval, not a placeholder
    # policy segments are tokenised one by one, never re-tokenised as a whole
    assert spans[0][1] == enc(
        tok,
        "<think> This takes 2 searches. I need to find who founded Qelm. </think>\n"
        "<search> who founded Qelm </search>",
    )
    answer = tok.decode(spans[4][1])
    # the last think quotes the retrieved sentence that holds the answer, then answers
    assert answer == (
        "<think> Anra Voss was an explorer born in the port town of Miredal. </think>\n"
        "<answer> Miredal </answer>" + tok.eos_token
    )


def test_evidence_picks_the_clause_with_the_target():
    from sr1.retrieval.base import Passage
    from sr1.train.sft import NO_EVIDENCE, evidence

    ps = [Passage("1", '"A"\nAlpha is old. It lies on the Poste River.'), Passage("2", '"B"\nB.')]
    assert evidence(ps, ["Poste River", "Poste"]) == ("It lies on the Poste River.", "Poste River")
    assert evidence(ps, ["poste"]) == ("It lies on the Poste River.", "poste")
    assert evidence(ps, ["Nowhere"]) == (NO_EVIDENCE, None)
    # the comma-separated clause, with a following relative clause that names the relation
    bio = "Born in Horar in 1946, Tabras studied in Bavshoth before settling in Rothaith, where he lives today."
    ps = [Passage("3", f'"Tabras"\n{bio}')]
    assert evidence(ps, ["Horar"]) == ("Born in Horar in 1946.", "Horar")
    assert evidence(ps, ["Rothaith"]) == (
        "Tabras studied in Bavshoth before settling in Rothaith, where he lives today.",
        "Rothaith",
    )


def _native_bf16() -> bool:
    """The CPU's own answer (tests/conftest.py pins the SR1_CPU_BF16 override to 0)."""
    from sr1 import models

    flags = models.cpu_flags()
    return bool(flags["amx_bf16"] or flags["avx512_bf16"])


@pytest.mark.parametrize(
    "precision",
    [
        "auto",
        pytest.param(
            "bf16",
            marks=pytest.mark.skipif(
                not _native_bf16(),
                reason="emulated bf16 (no AMX-BF16/AVX512-BF16): this run took 125 s instead "
                "of 15 s; bf16 autocast training is still covered by test_trainer_step",
            ),
        ),
    ],
)
def test_sft_run_lowers_the_masked_loss(tiny_qwen2, tmp_path, precision):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny_qwen2)
    index = build_tiny_index(tmp_path)
    cfg = tiny_cfg("grpo", "trainer.sft_lr=1e-2", "trainer.sft_epochs=3", "trainer.sft_examples=4",
                   f"trainer.mixed_precision={precision}")  # fmt: skip
    res = sft(cfg, tiny_qwen2, index, progress=False, rows=rows(tok))
    losses = [s["sft/loss"] for s in res["steps"]]
    assert res["n_examples"] == 4 and len(losses) == 3  # 3 epochs of one 4-example mini-batch
    assert (
        all(b < a for a, b in zip(losses, losses[1:], strict=False))
        and losses[-1] < 0.92 * losses[0]
    ), losses
    assert AutoModelForCausalLM.from_pretrained(res["checkpoint"]) is not None


def test_sft_batch_size_sets_the_updates_apart_from_rl_mini_batch(tiny_qwen2, tmp_path):
    """trainer.sft_batch_size, when set, decides SFT's updates (a larger RL mini-batch halved
    the quickstart's SFT updates before it existed); unset, it follows trainer.mini_batch_size.
    """
    from sr1.tracking.store import Store

    tok = load_tokenizer(tiny_qwen2)
    index = build_tiny_index(tmp_path)
    base = ("trainer.sft_epochs=1", "trainer.sft_examples=4", "trainer.mini_batch_size=4")
    own = sft(tiny_cfg("grpo", *base, "trainer.sft_batch_size=2"), tiny_qwen2, index,
              progress=False, rows=rows(tok))  # fmt: skip
    assert len(own["steps"]) == 2  # 4 examples, 2 per update, 1 epoch
    params = Store().get_run(own["run_id"])["params"]
    assert (params["batch_size"], params["n_updates"]) == (2, 2)
    follows = sft(tiny_cfg("grpo", *base), tiny_qwen2, index, progress=False, rows=rows(tok))
    assert len(follows["steps"]) == 1  # None: the RL mini-batch of 4
