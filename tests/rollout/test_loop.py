"""The rollout loop's mask, ids, text and turn logic, with the real Qwen2.5 tokenizer and bm25s.

Most tests drive the loop with ScriptedEngine (a fake engine: see helpers.py) because a random
tiny model never writes tags; the last tests sample from the real tiny model and check the
same invariants on whatever it writes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sr1.config import RolloutConfig
from sr1.models import load_model, load_tokenizer
from sr1.retrieval.base import format_passages
from sr1.rollout.engines import find_stop, make_engine
from sr1.rollout.loop import (
    INVALID_NOTICE,
    observation_ids,
    parse_query,
    policy_text,
    run_rollouts,
)
from sr1.rollout.types import Trajectory

from .helpers import BM25Retriever, ScriptedEngine

ROW = {
    "id": "q1",
    "question": "Who founded the capital of Zorvia?",
    "golden_answers": ["Anra Voss"],
    "data_source": "test",
    "prompt": "Answer the question. Question: Who founded the capital of Zorvia?\n",
}
FORCE = RolloutConfig().force_answer_text


@pytest.fixture(scope="module")
def tok(tiny_qwen2: str):
    return load_tokenizer(tiny_qwen2)


def _enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _run(tok, scripts, cfg, rows=(ROW,), retriever="bm25", max_context=4096):
    retriever = BM25Retriever() if retriever == "bm25" else retriever
    prompts = [_enc(tok, r["prompt"]) for r in rows]
    eng = ScriptedEngine(tok, prompts, scripts, max_context=max_context)
    trajs = run_rollouts(eng, retriever, list(rows), cfg, progress=False)
    for t in trajs:
        check_invariants(t, tok, cfg)
    return trajs, retriever, eng


def kinds(t: Trajectory) -> list[str]:
    return [k for k, _, _ in t.segments]


def check_invariants(t: Trajectory, tok, cfg: RolloutConfig) -> None:
    """What must hold for every trajectory, whatever the model wrote."""
    n = len(t.response_ids)
    assert len(t.loss_mask) == len(t.logprobs) == n
    assert n <= cfg.max_total_response_length
    # segments tile the response in order; mask 1 exactly on sampled segments
    ends = [0] + [b for _, _, b in t.segments]
    assert [a for _, a, _ in t.segments] == ends[:-1] and ends[-1] == n
    for kind, a, b in t.segments:
        assert a < b and kind in {"gen", "obs", "notice", "force"}
        assert t.loss_mask[a:b] == [int(kind == "gen")] * (b - a)
        if kind != "gen":
            assert t.logprobs[a:b] == [0.0] * (b - a)
        seg, cut = t.response_ids[a:b], b == n and t.finish_reason in ("length", "context")
        want = {
            "notice": _enc(tok, INVALID_NOTICE),
            "force": _enc(tok, cfg.force_answer_text),
        }.get(kind)
        if want is not None:  # inserted notices are exactly the configured texts
            assert seg == want or (cut and seg == want[: len(seg)])
        if kind == "obs":
            txt = tok.decode(seg)
            assert txt.lstrip("\n").startswith("<information>") or cut
            assert txt.endswith("</information>\n\n") or cut
    # the record is the decode of the ids; nothing was re-tokenised
    assert t.text == tok.decode(t.response_ids, skip_special_tokens=False)
    assert tok.decode(t.prompt_ids + t.response_ids, skip_special_tokens=False) == t.prompt + t.text
    # each query is the text between the tags of the sampled turn right before its observation
    obs = [(a, b) for k, a, b in t.segments if k == "obs"]
    assert len(obs) == t.num_searches == len(t.queries) == len(t.retrieved_ids)
    for (a, _), q in zip(obs, t.queries, strict=True):
        prev = next(s for s in reversed(t.segments) if s[2] == a)
        assert prev[0] == "gen"
        turn = tok.decode(t.response_ids[prev[1] : prev[2]])
        assert turn[: turn.rindex("</search>")].rsplit("<search>", 1)[1].strip() == q


def test_stop_string_ending_mid_token_is_detected_on_that_token(tok) -> None:
    ids = _enc(tok, "<search> Zorvia capital </search>\n\nmore")
    # Qwen2.5: the closing tag's last token '>ĊĊ' also carries the newlines
    cut = next(i for i in range(1, len(ids) + 1) if find_stop(tok, ids[:i], ["</search>"]))
    assert tok.convert_ids_to_tokens(ids[cut - 1]) == ">ĊĊ"
    assert find_stop(tok, ids[: cut - 1], ["</search>"]) is None
    assert find_stop(tok, ids[:cut], ["</answer>"]) is None


@pytest.mark.parametrize("tail", ["\n\n", ""])
def test_search_then_answer_mask_is_exactly_the_inserted_span(tok, tail: str) -> None:
    # with tail "\n\n" the stop string ends inside the sampled token '>ĊĊ', which stays whole
    turn1 = f"<think> I need the capital. </think>\n<search> capital of Zorvia </search>{tail}"
    turn2 = "<think> Qelm was founded by Anra Voss. </think>\n<answer> Anra Voss </answer>"
    cfg = RolloutConfig(max_turns=2, topk=2, max_obs_length=500)
    (t,), ret, eng = _run(tok, [[turn1, turn2]], cfg)
    assert ret.calls == [["capital of Zorvia"]]  # the query is the text between the tags
    assert t.queries == ["capital of Zorvia"] and t.num_searches == 1
    passages = BM25Retriever().search(["capital of Zorvia"], k=2)[0]
    assert t.retrieved_ids == [[p.id for p in passages]]
    s1, s2 = _enc(tok, turn1), _enc(tok, turn2)
    assert tok.convert_ids_to_tokens(s1[-1]) == (">ĊĊ" if tail else ">")
    obs = observation_ids(tok, passages, 500, turn1)
    assert t.response_ids == s1 + obs + s2  # segments appended as made, never re-encoded
    assert t.loss_mask == [1] * len(s1) + [0] * len(obs) + [1] * len(s2)
    assert t.segments == [
        ("gen", 0, len(s1)),
        ("obs", len(s1), len(s1) + len(obs)),
        ("gen", len(s1) + len(obs), len(t.response_ids)),
    ]
    assert t.logprobs == [-0.5] * len(s1) + [0.0] * len(obs) + [-0.5] * len(s2)
    # the text reads "</search>\n\n<information>" however the newlines were tokenised
    assert (
        tok.decode(obs)
        == ("" if tail else "\n\n")
        + "<information>"
        + format_passages(passages)
        + "</information>\n\n"
    )
    assert "</search>\n\n<information>Doc 1(Title: " in t.text and "\n\n\n" not in t.text
    assert t.text == turn1 + tok.decode(obs) + turn2
    assert t.answer == "Anra Voss" and t.metrics["em"] == 1.0 and t.reward == 1.0
    assert t.finish_reason == "answer" and t.metrics["answer_in_docs"] == 1.0
    assert t.metrics["well_formed"] == 1.0 and t.metrics["forced_answer"] == 0.0
    # turn 2's context is exactly prompt + everything appended so far
    assert eng.calls[1][0] == [t.prompt_ids + s1 + obs]
    assert eng.calls[0][2] == ["</search>", "</answer>"]


def test_max_turns_caps_searches_then_forces_an_answer(tok) -> None:
    loop = "<search> Zorvia </search>"
    cfg = RolloutConfig(max_turns=2, topk=1)
    (t,), ret, eng = _run(tok, [[loop, loop, loop, " Qelm </answer>"]], cfg)
    assert t.num_searches == 2 and ret.calls == [["Zorvia"], ["Zorvia"]]
    # two executed searches, a third not executed, then the forced suffix (mask 0) + answer
    assert kinds(t) == ["gen", "obs", "gen", "obs", "gen", "force", "gen"]
    assert eng.calls[-1][2] == ["</answer>"]
    assert t.text.endswith(loop + FORCE + " Qelm </answer>")
    assert t.finish_reason == "forced" and t.answer == "Qelm"
    assert t.metrics["forced_answer"] == 1.0 and t.metrics["well_formed"] == 0.0
    assert policy_text(t, tok).endswith(FORCE + " Qelm </answer>")


def test_max_turns_without_forcing_ends_like_search_r1(tok) -> None:
    loop = "<search> Zorvia </search>"
    cfg = RolloutConfig(max_turns=2, topk=1, force_answer=False)
    (t,), ret, _ = _run(tok, [[loop]], cfg)
    assert t.num_searches == 2 and len(ret.calls) == 2
    assert kinds(t) == ["gen", "obs", "gen", "obs", "gen"]
    assert t.finish_reason == "max_turns" and t.answer is None and t.reward == 0.0


def test_invalid_action_gets_the_papers_notice_masked(tok) -> None:
    cfg = RolloutConfig(max_turns=1, max_response_length=10)
    (t,), ret, _ = _run(
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
    assert kinds(t) == ["gen", "notice", "gen"]
    assert t.answer == "Qelm" and t.finish_reason == "answer"


def test_parse_query_takes_the_last_opening_tag() -> None:
    assert parse_query("<think> x </think> <search> a <search>  b c </search>") == "b c"
    assert parse_query("<search> </search>") is None and parse_query("</search>") is None
    assert parse_query("no tags") is None and parse_query("<search> open only") is None


def test_empty_query_is_an_invalid_action(tok) -> None:
    cfg = RolloutConfig(max_turns=2)
    (t,), ret, _ = _run(tok, [["<search>   </search>", "<answer> x </answer>"]], cfg)
    assert ret.calls == [] and kinds(t) == ["gen", "notice", "gen"] and t.answer == "x"


def test_notice_text_never_counts_as_the_answer(tok) -> None:
    cfg = RolloutConfig(max_turns=1, max_response_length=6, force_answer=False)
    (t,), _, _ = _run(
        tok, [["rambling without any tags at all", "still rambling without tags"]], cfg
    )
    assert "<answer> and </answer>" in t.text  # the notice is in the context...
    assert t.answer is None and t.reward == 0.0  # ...but is not the model's answer
    assert t.finish_reason == "length"


def test_observation_truncated_to_max_obs_length_keeps_tags(tok) -> None:
    cfg = RolloutConfig(max_turns=1, topk=3, max_obs_length=7)
    (t,), _, _ = _run(tok, [["<search> Zorvia </search>", "<answer> x </answer>"]], cfg)
    (_, a, b) = next(s for s in t.segments if s[0] == "obs")
    assert tok.decode(t.response_ids[a:b]).startswith("\n\n<information>")
    lead, close = _enc(tok, "\n\n<information>"), _enc(tok, "</information>\n\n")
    assert b - a == len(lead) + 7 + len(close)
    assert (
        t.response_ids[a + len(lead) : b - len(close)]
        == _enc(tok, format_passages(BM25Retriever().search(["Zorvia"], k=3)[0]))[:7]
    )


def test_one_batched_retrieval_per_turn_and_mixed_paths(tok) -> None:
    rows = [dict(ROW, id=f"q{i}", prompt=f"Question {i}: where? ") for i in range(4)]
    scripts = [
        ["<answer> Qelm </answer>"],
        ["<search> Anra Voss </search>", "<answer> Miredal </answer>"],
        ["no tags at all, just rambling on and on", "<answer> x </answer>"],
        ["<search> Dast river </search>", "<search> Kelt sea </search>", "<answer> y </answer>"],
    ]
    cfg = RolloutConfig(max_turns=2, topk=1, max_response_length=16)
    trajs, ret, _ = _run(tok, scripts, cfg, rows=rows)
    assert [t.group for t in trajs] == [0, 1, 2, 3]
    assert ret.calls == [["Anra Voss", "Dast river"], ["Kelt sea"]]  # one call per turn
    assert [t.finish_reason for t in trajs] == ["answer"] * 4
    assert [t.answer for t in trajs] == ["Qelm", "Miredal", "x", "y"]
    assert [kinds(t) for t in trajs] == [
        ["gen"],
        ["gen", "obs", "gen"],
        ["gen", "notice", "gen"],
        ["gen", "obs", "gen", "obs", "gen"],
    ]


def test_total_response_budget_cuts_the_insertion_and_stops(tok) -> None:
    cfg = RolloutConfig(max_turns=3, topk=3, max_total_response_length=40)
    (t,), _, _ = _run(tok, [["<search> Zorvia </search>", "<answer> x </answer>"]], cfg)
    assert len(t.response_ids) == 40 and t.finish_reason == "length"
    assert kinds(t) == ["gen", "obs"] and t.loss_mask[-1] == 0


def test_context_limit_stops_the_trajectory(tok) -> None:
    cfg = RolloutConfig(max_turns=2, topk=3)
    p = len(_enc(tok, ROW["prompt"]))
    (t,), _, eng = _run(
        tok, [["<search> Zorvia </search>", "<answer> x </answer>"]], cfg, max_context=p + 50
    )
    assert len(t.prompt_ids) + len(t.response_ids) == p + 50
    assert t.finish_reason == "context"
    assert all(
        len(c) + b <= p + 50 for ctx, bs, _ in eng.calls for c, b in zip(ctx, bs, strict=True)
    )


def test_eos_ends_the_trajectory_and_is_kept_as_sampled(tok) -> None:
    cfg = RolloutConfig(max_turns=2)
    (a, b), _, _ = _run(
        tok,
        [["<answer> Qelm </answer>"[:-1] + "<|im_end|>"], ["I give up.<|im_end|>"]],
        cfg,
        rows=[ROW, dict(ROW, id="q2", prompt="Another question?")],
    )
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert a.response_ids[-1] == eos and a.loss_mask[-1] == 1
    assert a.finish_reason == "eos" and a.answer is None
    assert b.finish_reason == "eos" and b.answer is None and kinds(b) == ["gen"]


@pytest.mark.parametrize("retriever", [None, "bm25"])
def test_single_turn_without_search(tok, retriever) -> None:
    # no retriever (direct/cot/rag) or max_turns=0: one turn, only </answer> stops it
    cfg = RolloutConfig(max_turns=0 if retriever else 2)
    script = "<think> <search> not a tool here </search> </think> <answer> Qelm </answer>"
    (t,), ret, eng = _run(tok, [[script]], cfg, retriever=retriever)
    assert eng.calls[0][2] == ["</answer>"] and len(eng.calls) == 1
    assert t.num_searches == 0 and (ret is None or ret.calls == [])
    assert t.answer == "Qelm" and kinds(t) == ["gen"] and t.finish_reason == "answer"


def test_long_prompt_is_left_truncated_and_recorded_as_used(tok) -> None:
    cfg = RolloutConfig(max_turns=1, max_prompt_length=8)
    kept = _enc(tok, ROW["prompt"])[-8:]
    eng = ScriptedEngine(tok, [kept], [["<answer> Qelm </answer>"]])
    (t,) = run_rollouts(eng, BM25Retriever(), [ROW], cfg, progress=False)
    check_invariants(t, tok, cfg)
    assert t.prompt_ids == kept and t.prompt == tok.decode(kept) and t.answer == "Qelm"


def test_reward_fn_and_jsonl_round_trip(tok) -> None:
    cfg = RolloutConfig(max_turns=1, topk=1)
    rows = [ROW]
    eng = ScriptedEngine(tok, [_enc(tok, ROW["prompt"])], [["<answer> Qelm </answer>"]])
    (t,) = run_rollouts(
        eng,
        BM25Retriever(),
        rows,
        cfg,
        reward_fn=lambda tr: 0.25 + tr.metrics["f1"],
        progress=False,
    )
    assert t.reward == 0.25 and t.metrics["em"] == 0.0
    import json

    back = Trajectory.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back.response_ids == t.response_ids and back.loss_mask == t.loss_mask
    assert policy_text(back, tok) == policy_text(t, tok)


# -- real sampling from the random tiny model --------------------------------------------------


def test_real_sampling_invariants_with_hf_engine(tok, tiny_qwen2: str) -> None:
    torch.manual_seed(0)
    model = load_model(tiny_qwen2, device="cpu")
    cfg = RolloutConfig(
        max_turns=2, max_response_length=12, max_total_response_length=200, temperature=1.0
    )
    eng = make_engine("hf", model, tok, cfg)
    rows = [dict(ROW, id=f"r{i}", prompt=f"Q{i}: who founded Qelm?") for i in range(3)]
    trajs = run_rollouts(eng, BM25Retriever(), rows, cfg, n_samples=2, progress=False)
    assert len(trajs) == 6 and [t.group for t in trajs] == [0, 0, 1, 1, 2, 2]
    for t in trajs:
        check_invariants(t, tok, cfg)
        # a random model writes no tags: every turn is invalid until the budget runs out
        assert set(kinds(t)) <= {"gen", "notice", "force"}
        assert all(lp <= 0.0 for lp, m in zip(t.logprobs, t.loss_mask, strict=True) if m)
    assert trajs[0].response_ids != trajs[1].response_ids  # a group's samples differ
    # invalid, invalid, then the final turn and a forced answer (or the budget ran out first)
    assert any(kinds(t)[:6] == ["gen", "notice", "gen", "notice", "gen", "force"] for t in trajs)


def test_hf_engine_logprobs_match_teacher_forcing_with_left_padding(tok, tiny_qwen2: str) -> None:
    model = load_model(tiny_qwen2, device="cpu")
    eng = make_engine("hf", model, tok, RolloutConfig())
    prompts = [
        _enc(tok, "a short prompt"),
        _enc(tok, "a noticeably longer prompt with many more tokens in it"),
        _enc(tok, "mid length prompt here"),
    ]
    # per-prompt budgets: rows leave the batch (and its KV cache) at different steps
    outs = eng.generate(prompts, max_new_tokens=[6, 3, 5], stop=[], temperature=1.0, seed=3)
    for p, o, n in zip(prompts, outs, [6, 3, 5], strict=True):
        assert len(o.token_ids) == n and o.finish_reason == "length"
        ids = torch.tensor([p + o.token_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, len(p) - 1 : -1].float(), -1)
        ref = lp.gather(-1, torch.tensor(o.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(ref, torch.tensor(o.logprobs), atol=1e-4)
    greedy = eng.generate(prompts, 5, [], temperature=0.0)
    for i, p in enumerate(prompts):  # padding and batch-mates do not change greedy output
        assert eng.generate([p], 5, [], temperature=0.0)[0].token_ids == greedy[i].token_ids


def test_unknown_engine_is_a_loud_error(tok) -> None:
    from sr1.errors import NotFoundError

    with pytest.raises(NotFoundError, match="valid: hf, vllm"):
        make_engine("sglang", "tiny-qwen2", tok, RolloutConfig())


def test_config_defaults_are_the_papers_notice_and_stops() -> None:
    cfg = RolloutConfig()
    assert cfg.force_answer_text.endswith("<answer>")
    assert INVALID_NOTICE.startswith("\nMy previous action is invalid.")
    assert dataclasses.is_dataclass(cfg)
