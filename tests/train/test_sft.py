"""SFT warm-start: gold trajectories with real retrieval, masked like RL; a short real run."""

from __future__ import annotations

import pytest
import torch

from sr1.errors import Sr1Error
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
        rows(tok)[2],
        metadata={
            "gold_queries": ["who founded Qelm", "Anra Voss birthplace"],
            "bridge": "Anra Voss",
        },
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
        tok, "<think> This takes 2 searches. </think>\n<search> who founded Qelm </search>"
    )
    # every later think says where the plan stands, then quotes the retrieved clause that
    # holds the next step's key (the bridge before searching again, the answer at the end)
    assert tok.decode(spans[2][1]).startswith("<think> Search 1 of 2 done. ")
    answer = tok.decode(spans[4][1])
    assert answer == (
        "<think> Search 2 of 2 done. Anra Voss was an explorer born in the port town of "
        "Miredal. </think>\n<answer> Miredal </answer>" + tok.eos_token
    )
    assert t.metrics["gold_supported"] is True


def _row(tok, i: int, question: str, gold: str, queries: list[str], bridge: str | None = None):
    return dict(rows(tok)[0], id=f"r{i}", question=question, golden_answers=[gold],
                metadata={"queries": queries, "bridge": bridge})  # fmt: skip


def test_warm_start_takes_supported_questions_and_caps_multi_search(tiny_qwen2, tmp_path):
    """A gold trajectory whose retrieval misses the key it quotes is passed over (it would
    teach the policy to name what the documents did not show), and at most
    trainer.sft_multi_search_share of the warm-start searches more than once."""
    from sr1.train.sft import NO_EVIDENCE, gold_trajectories

    tok = load_tokenizer(tiny_qwen2)
    retriever = open_retriever(build_tiny_index(tmp_path))
    data = [
        _row(tok, 0, "Where was Anra Voss born?", "Miredal", ["Anra Voss born"]),
        # the query finds the glass-works town, not who founded Qelm: unsupported
        _row(tok, 1, "Who founded Qelm?", "Anra Voss", ["harbour glass works"]),
        _row(
            tok,
            2,
            "Where was the founder of Qelm born?",
            "Miredal",
            ["Qelm founded by", "Anra Voss born"],
            bridge="Anra Voss",
        ),  # fmt: skip
        _row(tok, 3, "What is the capital of Zorvia?", "Qelm", ["Zorvia capital"]),
    ]
    cfg = tiny_cfg("grpo", "rollout.max_turns=2", "rollout.topk=1", "rollout.max_obs_length=200",
                   "trainer.sft_examples=4")  # fmt: skip
    miss = gold_trajectory(data[1], tok, retriever, cfg)
    assert miss.metrics["gold_supported"] is False and NO_EVIDENCE in miss.text

    def ids(*sets: str) -> tuple[list[str], int]:
        trajs, skipped = gold_trajectories(data, tok, retriever, replace_cfg(cfg, *sets))
        return sorted(t.id for t in trajs), skipped

    assert ids() == (["r0", "r2", "r3"], 1)  # every supported row, in the data order
    assert ids("trainer.sft_multi_search_share=0") == (["r0", "r3"], 1)
    assert ids("trainer.sft_supported_only=false") == (["r0", "r1", "r2", "r3"], 0)
    assert ids("trainer.sft_examples=1", "trainer.sft_multi_search_share=0")[0] in (
        ["r0"], ["r3"],
    )  # fmt: skip
    with pytest.raises(Sr1Error, match="none of the 1 training questions"):
        gold_trajectories([data[1]], tok, retriever, cfg)
    # no search allowed (rollout.max_turns=0): the answer alone, nothing claimed from documents
    direct = gold_trajectory(data[1], tok, retriever, replace_cfg(cfg, "rollout.max_turns=0"))
    assert direct.num_searches == 0 and direct.metrics["gold_supported"] is True
    assert tok.decode(direct.response_ids) == (
        "<think> This takes no search. </think>\n<answer> Anra Voss </answer>" + tok.eos_token
    )


def replace_cfg(cfg, *sets: str):
    from sr1.config import resolve_config

    return resolve_config(base=cfg, overrides=list(sets))


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
