"""The HF engine's KV reuse across turns: same trajectories as a full re-prefill, less prefill.

Everything is real: tiny Qwen2 models (random, and the scripted one that searches) with the
real Qwen2.5 tokenizer, the bm25s test retriever and ``run_rollouts``. Each rollout runs on
two engines over the same module, one reusing the KV cache and one re-prefilling every turn,
and must give the same ids, masks and segments, and log-probs within 1e-5.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sr1.config import RolloutConfig
from sr1.models import load_model, load_tokenizer
from sr1.rollout.engines import HFEngine, make_engine, named_weights
from sr1.rollout.kv_cache import PrefixKVCache, RowKV
from sr1.rollout.loop import run_rollouts

from .conftest import SCRIPT_CFG, SCRIPT_ROWS
from .helpers import BM25Retriever

ROW = {
    "id": "q1",
    "question": "Who founded the capital of Zorvia?",
    "golden_answers": ["Anra Voss"],
    "data_source": "test",
    "prompt": "Answer the question. Question: Who founded the capital of Zorvia?\n",
}


@pytest.fixture(scope="module")
def tok(tiny_qwen2: str):
    return load_tokenizer(tiny_qwen2)


@pytest.fixture(scope="module")
def random_model(tiny_qwen2: str):
    return load_model(tiny_qwen2, device="cpu")


def _enc(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


class Recorder:
    """Wraps an engine: every generate call's contexts, outputs and prefill/reuse counts."""

    def __init__(self, engine: HFEngine) -> None:
        self.engine = engine
        self.calls: list[dict] = []

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def generate(self, prompts, *args, **kwargs):
        before = dict(self.engine.kv_stats)
        outs = self.engine.generate(prompts, *args, **kwargs)
        after = self.engine.kv_stats
        self.calls.append(
            {
                "prompts": [list(p) for p in prompts],
                "outs": outs,
                "prefill": after["prefill_tokens"] - before["prefill_tokens"],
                "reused": after["reused_tokens"] - before["reused_tokens"],
            }
        )
        return outs


def _expected_reuse(prev: dict, call: dict) -> int:
    """Tokens a call should read from the cache: for each context, what the previous call
    ran for the row it extends (its context + sampled tokens but the last)."""
    covered = [p + o.token_ids[:-1] for p, o in zip(prev["prompts"], prev["outs"], strict=True)]
    total = 0
    for ctx in call["prompts"]:
        hits = [len(c) for c in covered if len(c) < len(ctx) and ctx[: len(c)] == c]
        assert hits, "a later turn's context extends a row of the previous call"
        total += max(hits)
    return total


def _pair(model, tok, cfg):
    return HFEngine(model, tok, cfg, kv_reuse=True), HFEngine(model, tok, cfg, kv_reuse=False)


def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for f in ("prompt_ids", "response_ids", "loss_mask", "segments", "finish_reason", "text"):
            assert getattr(x, f) == getattr(y, f), f
        gap = (torch.tensor(x.logprobs) - torch.tensor(y.logprobs)).abs().max().item()
        assert gap <= 1e-5, f"log-probs differ by {gap}"


# -- the prefix store itself -------------------------------------------------------------------


def _row(ids: list[int]) -> RowKV:
    k = torch.zeros((1, len(ids), 2))
    return RowKV(ids, [k], [k.clone()])


def test_prefix_store_finds_the_longest_proper_prefix() -> None:
    c = PrefixKVCache()
    for ids in ([1, 2, 3], [1, 2, 3, 4, 5], [9, 2, 3, 4, 5, 6], list(range(20))):
        c.put(_row(ids))
    assert len(c) == 4 and c.tokens == 3 + 5 + 6 + 20
    assert c.lookup([1, 2, 3, 4, 5, 7]).ids == [1, 2, 3, 4, 5]  # longest
    assert c.lookup([1, 2, 3, 4]).ids == [1, 2, 3]
    assert c.lookup([1, 2, 3]) is None  # not a proper prefix: nothing left to feed
    assert c.lookup([1, 2, 4, 4, 5, 6]) is None  # diverges
    assert c.lookup(list(range(20)) + [0]).ids == list(range(20))
    assert c.lookup(list(range(19)) + [0, 0]) is None  # same tail length, different prefix
    c.put(_row([1, 2, 3]))  # an identical row (greedy copies) is kept once
    assert len(c) == 4
    c.clear()
    assert len(c) == 0 and c.lookup([1, 2, 3, 4]) is None


# -- engine level: a batch mixing new rows and rows that extend a cache ------------------------


def test_mixed_batch_matches_full_prefill_and_teacher_forcing(tok, random_model) -> None:
    reuse, plain = _pair(random_model, tok, RolloutConfig())
    ctxs = [
        _enc(tok, "a short prompt"),
        _enc(tok, "a noticeably longer prompt with many more tokens in it"),
        _enc(tok, "mid length prompt here"),
    ]
    for turn, temp in enumerate([1.0, 0.0, 1.0, 1.0]):
        budgets = [[6, 3, 5, 4, 7][(turn + j) % 5] for j in range(len(ctxs))]
        a = reuse.generate(ctxs, budgets, [], temperature=temp, seed=turn)
        b = plain.generate(ctxs, budgets, [], temperature=temp, seed=turn)
        for x, y, p in zip(a, b, ctxs, strict=True):
            assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason
            assert max(abs(u - v) for u, v in zip(x.logprobs, y.logprobs, strict=True)) <= 1e-5
            ids = torch.tensor([p + x.token_ids])  # the trainer's view of the same tokens
            with torch.no_grad():
                lp = torch.log_softmax(random_model(ids).logits[0, len(p) - 1 : -1].float(), -1)
            ref = lp.gather(-1, torch.tensor(x.token_ids)[:, None]).squeeze(-1)
            assert torch.allclose(ref, torch.tensor(x.logprobs), atol=1e-4)
        # next turn: each row gets an "observation" of a different length (one gets none),
        # one row drops out and a new prompt joins in the middle of the batch
        obs = [_enc(tok, " <information> x </information>"), [], _enc(tok, " notice")]
        ctxs = [p + o.token_ids + obs[j % 3] for j, (p, o) in enumerate(zip(ctxs, a, strict=True))]
        if turn == 1:
            ctxs.pop(0)
        if turn == 2:
            ctxs.insert(1, _enc(tok, f"a brand new prompt number {turn}"))
    assert reuse.kv_stats["reused_tokens"] > 0 and plain.kv_stats["reused_tokens"] == 0
    assert reuse.kv_stats["prefill_tokens"] < plain.kv_stats["prefill_tokens"]


# -- rollouts: reuse gives the same trajectories -----------------------------------------------


def test_random_model_rollouts_with_notices_truncation_and_sampling_match(
    tok, random_model
) -> None:
    """A random model writes no tags: every turn gets the invalid-action notice, then the
    forced answer; one prompt is left-truncated, and the tight response budget cuts some
    insertions short (rows finishing on different turns)."""
    cfg = RolloutConfig(
        max_turns=3,
        max_response_length=10,
        max_total_response_length=120,
        max_prompt_length=24,
        temperature=1.0,
        batch_size=4,
    )
    long_q = "Who founded the capital of Zorvia, " + "and which river runs by it, " * 8
    rows = [dict(ROW, id=f"r{i}", prompt=f"Q{i}: who founded Qelm?\n") for i in range(3)]
    rows.append(dict(ROW, id="long", prompt=long_q + "?\n"))
    reuse, plain = _pair(random_model, tok, cfg)
    rec = Recorder(reuse)
    a = run_rollouts(rec, BM25Retriever(), rows, cfg, n_samples=2, progress=False, seed=1)
    b = run_rollouts(plain, BM25Retriever(), rows, cfg, n_samples=2, progress=False, seed=1)
    _assert_same(a, b)
    assert any(k == "notice" for t in a for k, _, _ in t.segments)
    assert len(a[-1].prompt_ids) == cfg.max_prompt_length  # the long prompt was cut
    notice = max(b - a_ for t in a for k, a_, b in t.segments if k == "notice")
    last = a[0].segments[-1]
    assert last[0] == "notice" and last[2] - last[1] < notice  # an insertion cut at the budget
    assert len(rec.calls) == 2  # two turns (the second cut by the response budget)
    # turn 1 prefills the prompts whole; turn 2 only what is new since
    for prev, c in zip([None, *rec.calls[:-1]], rec.calls, strict=True):
        expect = 0 if prev is None else _expected_reuse(prev, c)
        assert c["reused"] == expect and c["prefill"] == sum(map(len, c["prompts"])) - expect
    # greedy, one search turn: room for the final turn and the forced answer
    cfg = dataclasses.replace(cfg, max_turns=1, max_total_response_length=400)
    greedy_a = run_rollouts(reuse, BM25Retriever(), rows, cfg, greedy=True, progress=False)
    greedy_b = run_rollouts(plain, BM25Retriever(), rows, cfg, greedy=True, progress=False)
    _assert_same(greedy_a, greedy_b)
    assert any(k == "force" for t in greedy_a for k, _, _ in t.segments)


def test_scripted_search_rollouts_match_and_prefill_only_the_suffix(scripted_model: str) -> None:
    """The scripted model searches (real BM25 observation) on one prompt and answers at once
    on the other, which then leaves the batch; sampled copies wander off the scripts."""
    tok = load_tokenizer(scripted_model)
    model = load_model(scripted_model, device="cpu")
    reuse, plain = _pair(model, tok, SCRIPT_CFG)
    rec = Recorder(reuse)
    fed: list[tuple[int, ...]] = []  # input_ids shape of every forward the model runs
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: fed.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        g_a = run_rollouts(
            rec, BM25Retriever(), SCRIPT_ROWS, SCRIPT_CFG, greedy=True, progress=False
        )
        greedy_calls, greedy_fed = list(rec.calls), list(fed)
        g_b = run_rollouts(
            plain, BM25Retriever(), SCRIPT_ROWS, SCRIPT_CFG, greedy=True, progress=False
        )
    finally:
        hook.remove()
    _assert_same(g_a, g_b)
    s, d = g_a
    assert s.num_searches == 1 and s.answer == "Anra Voss" and d.answer == "Dast"
    assert d.finish_reason == "answer" and len(d.segments) == 1  # finished on turn 1

    # turn 2 feeds the model only what is new: the last sampled token + the observation
    first, second = greedy_calls[0], greedy_calls[1]
    assert second["prompts"] == [s.prompt_ids + s.response_ids[: s.segments[1][2]]]
    t1 = first["outs"][0].token_ids
    suffix = len(second["prompts"][0]) - (len(first["prompts"][0]) + len(t1) - 1)
    assert suffix == 1 + (s.segments[1][2] - s.segments[1][1])  # last token + observation
    assert second["reused"] == len(first["prompts"][0]) + len(t1) - 1
    assert second["prefill"] == suffix
    prefill_shapes = [shape for shape in greedy_fed if shape[1] > 1]
    assert prefill_shapes == [(2, max(len(p) for p in first["prompts"])), (1, suffix)]

    # sampling (temperature 1, a seed): several copies per prompt, same trajectories
    cfg = dataclasses.replace(SCRIPT_CFG, temperature=1.0)
    rows = SCRIPT_ROWS
    a = run_rollouts(reuse, BM25Retriever(), rows, cfg, n_samples=3, seed=5, progress=False)
    b = run_rollouts(plain, BM25Retriever(), rows, cfg, n_samples=3, seed=5, progress=False)
    _assert_same(a, b)
    assert len({tuple(t.response_ids) for t in a}) > 2  # the copies did sample different turns


# -- staleness and memory -----------------------------------------------------------------------


def test_cache_is_bounded_and_dropped_on_new_weights(tok, tiny_qwen2: str) -> None:
    model = load_model(tiny_qwen2, device="cpu")
    eng = make_engine("hf", model, tok, RolloutConfig())
    assert eng.kv_reuse  # on by default (rollout.hf_kv_reuse)
    assert not make_engine("hf", model, tok, RolloutConfig(hf_kv_reuse=False)).kv_reuse
    prompts = [_enc(tok, f"prompt number {i} about the Dast") for i in range(4)]
    outs = eng.generate(prompts, 5, [], temperature=0.0)
    assert len(eng.kv_cache) == 4
    covered = [len(p) + len(o.token_ids) - 1 for p, o in zip(prompts, outs, strict=True)]
    assert eng.kv_cache.tokens == sum(covered)
    ext = [p + o.token_ids + [11] for p, o in zip(prompts, outs, strict=True)]

    # bounded: a call keeps only its own rows; whatever it did not extend is evicted
    eng.generate(ext[:2], 3, [], temperature=0.0)
    assert len(eng.kv_cache) == 2
    eng.generate([_enc(tok, "something unrelated")], 3, [], temperature=0.0)
    assert len(eng.kv_cache) == 1
    before = eng.kv_stats["reused_tokens"]
    eng.generate(ext[2:], 3, [], temperature=0.0)  # their entries were evicted: full prefill
    assert eng.kv_stats["reused_tokens"] == before

    # update_weights (even one that copies nothing: the same module) and clear_cache empty it
    out = eng.generate(prompts, 5, [], temperature=0.0)
    assert len(eng.kv_cache) == 4
    eng.update_weights(named_weights(model), 1)
    assert len(eng.kv_cache) == 0
    eng.generate(prompts, 5, [], temperature=0.0)
    eng.clear_cache()
    assert len(eng.kv_cache) == 0

    # an in-place optimiser step on the shared module, with no update_weights call, also
    # invalidates it: the next call must not reuse KV computed with the old weights
    out = eng.generate(prompts, 5, [], temperature=0.0)
    ext = [p + o.token_ids + [11] for p, o in zip(prompts, out, strict=True)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.tensor([ext[0]])
    (-torch.log_softmax(model(ids).logits.float(), -1).mean()).backward()
    opt.step()
    before = eng.kv_stats["reused_tokens"]
    a = eng.generate(ext, 6, [], temperature=1.0, seed=3)
    assert eng.kv_stats["reused_tokens"] == before
    b = HFEngine(model, tok, RolloutConfig(), kv_reuse=False).generate(
        ext, 6, [], temperature=1.0, seed=3
    )
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
