"""Training rewards and eval metrics come from one scorer: the same trajectories scored by the
rollout loop (what the trainer's reward reads) and by the eval runner's ``run_batch`` (what
tables report) give identical metrics, and Search-R1's format reward over either is the same.

The engine is the scripted fake of tests/rollout/helpers.py (a random tiny model never writes
tags); the tokenizer, bm25s retriever, rollout loop, eval runner and scorer are real.
"""

from __future__ import annotations

import dataclasses

from sr1.algos.rewards import format_reward, make_reward_fn
from sr1.config import AlgorithmConfig, ExperimentConfig
from sr1.data.prompts import render_prompt
from sr1.eval.methods import get_method
from sr1.eval.runner import _Evaluator, eval_rollout_config
from sr1.models import load_tokenizer
from sr1.rollout.loop import run_rollouts
from tests.rollout.helpers import BM25Retriever, ScriptedEngine

SCRIPTS = [
    # searched, correct, well-formed
    ["<think> a </think>\n<search> capital of Zorvia </search>", "<think> b </think>\n<answer> Qelm </answer>"],
    # searched, wrong, well-formed; the gold answer was in the retrieved block
    ["<think> a </think>\n<search> Qelm founded </search>", "<think> b </think>\n<answer> Miredal </answer>"],
    # an invalid turn (notice inserted), then a bare answer: malformed
    ["rambling with no tags at all here", "<answer> Qelm </answer>"],
    # searches until the turns run out: the answer is forced
    ["<think> a </think>\n<search> Zorvia </search>"] * 3 + [" Qelm </answer>"],
    # correct after SQuAD normalisation, no search
    ["<think> a </think>\n<answer> the Qelm! </answer>"],
    # no answer at all
    ["I do not know.<|im_end|>"],
]  # fmt: skip
GOLD = ["Qelm"]


def test_rollout_rewards_and_eval_rows_agree(tiny_qwen2: str) -> None:
    tok = load_tokenizer(tiny_qwen2)
    cfg = ExperimentConfig()
    cfg = dataclasses.replace(
        cfg,
        rollout=dataclasses.replace(cfg.rollout, max_turns=2, topk=2),
        eval=dataclasses.replace(cfg.eval, max_new_tokens=48),
    )
    method = get_method("search")
    rows = [
        {"id": f"q{i}", "question": f"Question {i}: who or what is it?", "golden_answers": GOLD,
         "data_source": "nq"}
        for i in range(len(SCRIPTS))
    ]  # fmt: skip
    prompts = [
        render_prompt(r["question"], cfg.data.search_prompt, cfg.data.template) for r in rows
    ]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rcfg = eval_rollout_config(cfg, method)
    algo = AlgorithmConfig(reward="format", retrieval_score=0.3)

    # the training path: the loop scores, the trainer's reward reads the metrics
    train = run_rollouts(
        ScriptedEngine(tok, ids, SCRIPTS), BM25Retriever(),
        [dict(r, prompt=p) for r, p in zip(rows, prompts, strict=True)],
        rcfg, greedy=True, reward_fn=make_reward_fn(algo), progress=False,
    )  # fmt: skip

    # the eval path: the runner's own batch method, with the same fake engine
    ev = _Evaluator.__new__(_Evaluator)
    ev.cfg, ev.method, ev.retriever, ev.rcfg, ev.greedy = cfg, method, BM25Retriever(), rcfg, True
    ev.tokenizer = tok
    ev.opts = dataclasses.replace(
        cfg.scoring.options(cfg.eval.answer_fallback),
        special_tokens=tuple(tok.all_special_tokens),
    )
    ev.engine = ScriptedEngine(tok, ids, SCRIPTS)
    out = ev.run_batch("nq", "test", rows)

    assert [t.finish_reason for t in train] == [
        "answer",
        "answer",
        "answer",
        "forced",
        "answer",
        "eos",
    ]
    for t, r in zip(train, out, strict=True):
        assert r["response"] == t.text
        assert r["prediction"] == t.answer
        for k in ("em", "cover_em", "f1", "well_formed", "answer_in_docs"):
            assert r[k] == (t.metrics[k] if t.metrics[k] is not None else 0.0), (k, t.text)
        assert format_reward({**r, "answer": r["prediction"]}, algo) == t.reward
    # the cases differ where they should: Search-R1's format table
    assert [t.reward for t in train] == [1.0, 0.5, 0.8, 0.8, 1.0, 0.0]
    assert [t.metrics["well_formed"] for t in train] == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
