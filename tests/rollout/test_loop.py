"""The rollout loop's mask, ids, text and turn logic, with the real Qwen2.5 tokenizer and bm25s."""

from __future__ import annotations

import pytest
import torch

from sr1.config import RolloutConfig
from sr1.models import load_model, load_tokenizer
from sr1.retrieval.base import format_passages
from sr1.rollout.engines import find_stop, make_engine
from sr1.rollout.loop import INVALID_NOTICE, observation_ids, run_rollouts

from .helpers import BM25Retriever, ScriptedEngine

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


def _enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _spans(mask: list[int]) -> list[tuple[int, int, int]]:
    """(value, start, end) runs of the mask."""
    out, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((mask[start], start, i))
            start = i
    return out


def _run(tok, scripts, cfg, rows=(ROW,), retriever=None):
    retriever = retriever or BM25Retriever()
    prompts = [_enc(tok, r["prompt"]) for r in rows]
    eng = ScriptedEngine(tok, prompts, scripts)
    trajs = run_rollouts(eng, retriever, list(rows), cfg, progress=False)
    return trajs, retriever


def test_stop_string_ending_mid_token_is_detected_on_that_token(tok) -> None:
    ids = _enc(tok, "<search> Zorvia capital </search>\n\nmore")
    # Qwen2.5: the closing tag's last token '>ĊĊ' also carries the newlines
    cut = next(i for i in range(1, len(ids) + 1) if find_stop(tok, ids[:i], ["</search>"]))
    assert tok.convert_ids_to_tokens(ids[cut - 1]) == ">ĊĊ"
    assert find_stop(tok, ids[: cut - 1], ["</search>"]) is None


def test_search_then_answer_mask_is_exactly_the_inserted_span(tok) -> None:
    turn1 = "<think> I need the capital. </think>\n<search> capital of Zorvia </search>\n\n"
    turn2 = "<think> Qelm was founded by Anra Voss. </think>\n<answer> Anra Voss </answer>"
    cfg = RolloutConfig(max_turns=2, topk=2, max_obs_length=500)
    (t,), ret = _run(tok, [[turn1, turn2]], cfg)
    assert ret.calls == [["capital of Zorvia"]]  # the query is the text between the tags
    assert t.queries == ["capital of Zorvia"] and t.num_searches == 1
    s1 = _enc(tok, turn1)
    passages = BM25Retriever().search(["capital of Zorvia"], k=2)[0]
    assert t.retrieved_ids == [[p.id for p in passages]]
    obs = observation_ids(tok, passages, 500, turn1)
    s2 = _enc(tok, turn2)
    assert t.response_ids == s1 + obs + s2  # nothing re-tokenised: segments appended as made
    assert t.loss_mask == [1] * len(s1) + [0] * len(obs) + [1] * len(s2)
    assert [v for v, _, _ in _spans(t.loss_mask)] == [1, 0, 1]
    assert t.logprobs == [-0.5] * len(s1) + [0.0] * len(obs) + [-0.5] * len(s2)
    assert tok.decode(obs) == "<information>" + format_passages(passages) + "</information>\n\n"
    assert tok.decode(t.prompt_ids + t.response_ids) == ROW["prompt"] + t.text
    assert t.text == turn1 + tok.decode(obs) + turn2
    assert t.answer == "Anra Voss" and t.metrics["em"] == 1.0 and t.reward == 1.0
    assert t.finish_reason == "answer" and t.metrics["answer_in_docs"] == 1.0


def test_max_turns_caps_searches_and_final_search_is_not_executed(tok) -> None:
    loop = "<search> Zorvia </search>"
    cfg = RolloutConfig(max_turns=2, topk=1)
    (t,), ret = _run(tok, [[loop]], cfg)
    assert t.num_searches == 2 and len(ret.calls) == 2
    assert t.finish_reason == "max_turns"
    # three sampled turns, two inserted observations between them
    assert [v for v, _, _ in _spans(t.loss_mask)] == [1, 0, 1, 0, 1]
    assert t.answer is None and t.reward == 0.0


def test_invalid_action_gets_the_papers_notice_masked(tok) -> None:
    cfg = RolloutConfig(max_turns=1, max_response_length=10)
    (t,), ret = _run(
        tok,
        [["I am not sure what to do here at all, really not sure", "<answer> Qelm </answer>"]],
        cfg,
    )
    assert ret.calls == []
    notice = _enc(tok, INVALID_NOTICE)
    assert t.response_ids[10 : 10 + len(notice)] == notice
    assert t.loss_mask == [1] * 10 + [0] * len(notice) + [1] * (
        len(t.response_ids) - 10 - len(notice)
    )
    assert t.answer == "Qelm" and t.finish_reason == "answer"


def test_notice_text_never_counts_as_the_answer(tok) -> None:
    cfg = RolloutConfig(max_turns=1, max_response_length=6)
    (t,), _ = _run(tok, [["rambling without any tags at all", "still rambling without tags"]], cfg)
    assert "<answer> and </answer>" in t.text  # the notice is in the context...
    assert t.answer is None and t.reward == 0.0  # ...but is not the model's answer


def test_observation_truncated_to_max_obs_length_keeps_tags(tok) -> None:
    cfg = RolloutConfig(max_turns=1, topk=3, max_obs_length=7)
    (t,), _ = _run(tok, [["<search> Zorvia </search>", "<answer> x </answer>"]], cfg)
    zero = [i for i, m in enumerate(t.loss_mask) if m == 0]
    obs_text = tok.decode([t.response_ids[i] for i in zero])
    assert obs_text.startswith("\n\n<information>") and obs_text.endswith("</information>\n\n")
    lead, close = _enc(tok, "\n\n<information>"), _enc(tok, "</information>\n\n")
    assert len(zero) == len(lead) + 7 + len(close)


def test_total_response_budget_and_batch_of_mixed_paths(tok) -> None:
    rows = [dict(ROW, id=f"q{i}", prompt=f"Question {i}: where? ") for i in range(3)]
    scripts = [
        ["<answer> Qelm </answer>"],
        ["<search> Anra Voss </search>", "<answer> Miredal </answer>"],
        ["no tags at all, just rambling on and on"],
    ]
    cfg = RolloutConfig(max_turns=2, topk=1, max_response_length=16, max_total_response_length=60)
    trajs, ret = _run(tok, scripts, cfg, rows=rows)
    assert [t.group for t in trajs] == [0, 1, 2]
    assert ret.calls == [["Anra Voss"]]  # one batched call per turn, only the searching row
    assert trajs[0].finish_reason == "answer" and trajs[1].answer == "Miredal"
    assert all(len(t.response_ids) <= 60 for t in trajs)
    for t in trajs:
        assert len(t.response_ids) == len(t.loss_mask) == len(t.logprobs)


def test_real_sampling_invariants_with_hf_engine(tok, tiny_qwen2: str) -> None:
    torch.manual_seed(0)
    model = load_model(tiny_qwen2, device="cpu")
    cfg = RolloutConfig(
        max_turns=2, max_response_length=12, max_total_response_length=64, temperature=1.0
    )
    eng = make_engine("hf", model, tok, cfg)
    rows = [dict(ROW, id=f"r{i}", prompt=f"Q{i}: who founded Qelm?") for i in range(3)]
    trajs = run_rollouts(eng, BM25Retriever(), rows, cfg, n_samples=2, progress=False)
    assert len(trajs) == 6 and [t.group for t in trajs] == [0, 0, 1, 1, 2, 2]
    notice = _enc(tok, INVALID_NOTICE)
    for t in trajs:
        assert len(t.response_ids) == len(t.loss_mask) == len(t.logprobs) <= 64
        assert tok.decode(t.prompt_ids + t.response_ids, skip_special_tokens=False).endswith(t.text)
        for v, a, b in _spans(t.loss_mask):
            seg = t.response_ids[a:b]
            if v == 0:  # every inserted span is a notice or an information block
                txt = tok.decode(seg)
                whole = seg == notice or (
                    "<information>" in txt and txt.endswith("</information>\n\n")
                )
                # only the last span may be cut, by the response budget
                cut = (
                    b == len(t.loss_mask)
                    and t.finish_reason == "length"
                    and (
                        seg == notice[: len(seg)]
                        or "<information>".startswith(txt.strip()[:13])
                        or txt.lstrip().startswith("<information>")
                    )
                )
                assert whole or cut, txt
                assert all(lp == 0.0 for lp in t.logprobs[a:b])
            else:
                assert all(lp <= 0.0 for lp in t.logprobs[a:b])


def test_hf_engine_logprobs_match_teacher_forcing_with_left_padding(tok, tiny_qwen2: str) -> None:
    model = load_model(tiny_qwen2, device="cpu")
    eng = make_engine("hf", model, tok, RolloutConfig())
    prompts = [
        _enc(tok, "a short prompt"),
        _enc(tok, "a noticeably longer prompt with many more tokens in it"),
    ]
    outs = eng.generate(prompts, max_new_tokens=6, stop=[], temperature=1.0, seed=3)
    for p, o in zip(prompts, outs, strict=True):
        assert len(o.token_ids) == 6 and o.finish_reason == "length"
        ids = torch.tensor([p + o.token_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, len(p) - 1 : -1].float(), -1)
        ref = lp.gather(-1, torch.tensor(o.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(ref, torch.tensor(o.logprobs), atol=1e-4)
    greedy1 = eng.generate(prompts, 5, [], temperature=0.0)
    greedy2 = eng.generate(prompts[::-1], 5, [], temperature=0.0)
    assert greedy1[0].token_ids == greedy2[1].token_ids  # padding does not change greedy output
