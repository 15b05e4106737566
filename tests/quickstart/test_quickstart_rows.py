"""The quickstart's stage list, its rows and its paired comparison, on hand-made stored runs.

Fast: no model runs. The rows and the paired object are computed from per-question rows
inserted into a real DuckDB store, and checked against numbers worked out by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sr1.config import resolve_config, to_dict
from sr1.eval.metrics import summarize
from sr1.quickstart import (
    ABLATION_TAIL,
    config_hash,
    no_mask_config,
    paired_summary,
    stages,
    summary_rows,
)
from sr1.report.build import build_report
from sr1.tracking.store import Store

CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "quickstart.yaml"

# per question: (hops, sft em, rl em, rl cover_em, sft searches, rl searches)
QUESTIONS = [
    (1, 1, 1, 1, 1, 1),
    (1, 1, 0, 0, 1, 1),  # lost
    (1, 0, 1, 1, 1, 1),  # gained
    (1, 0, 0, 1, 1, 2),  # cover-EM only
    (2, 0, 1, 1, 1, 2),  # gained
    (2, 0, 1, 1, 1, 2),  # gained
    (2, 0, 0, 0, 1, 1),
    (2, 1, 1, 1, 2, 3),
]


def test_default_stages_and_ablations_add_exactly_two() -> None:
    cfg = resolve_config(CONFIG)
    names = [n for n, _ in stages(cfg)]
    assert names == [
        "fetch", "synth", "index", "eval-direct", "eval-rag",
        "sft", "eval-sft", "eval-sft-rag", "train", "eval-rl",
    ]  # fmt: skip
    with_ablations = stages(cfg, ablations=True)
    assert with_ablations[: len(names)] == stages(cfg)  # the default run is unchanged
    assert [n for n, _ in with_ablations[len(names) :]] == ["train-nomask", "eval-rl-nomask"]
    assert with_ablations[len(names) :] == ABLATION_TAIL


def test_the_ablation_config_changes_only_use_mask() -> None:
    cfg = resolve_config(CONFIG)
    nm = no_mask_config(cfg)
    assert cfg.algorithm.use_mask is True and nm.algorithm.use_mask is False
    a, b = to_dict(cfg), to_dict(nm)
    assert a["algorithm"].pop("use_mask") is True and b["algorithm"].pop("use_mask") is False
    assert a == b
    assert config_hash(nm) != config_hash(cfg)  # its own train run, never the masked one's


def test_quickstart_config_evaluates_200_of_200_test_questions() -> None:
    cfg = resolve_config(CONFIG)
    assert cfg.eval.limit == 200 and cfg.quickstart.synth_test >= cfg.eval.limit


def _store_eval(store: Store, rid: str, method: str, which: str) -> None:
    rows = []
    for i, (hops, em_sft, em_rl, cover_rl, s_sft, s_rl) in enumerate(QUESTIONS):
        em = em_sft if which == "sft" else em_rl
        rows.append(
            {
                "dataset": "synth",
                "example_id": f"q{i}",
                "question": f"question {i}?",
                "golden_answers": [f"gold {i}"],
                "prediction": f"gold {i}" if em else "wrong",
                "em": float(em),
                "cover_em": float(em if which == "sft" else cover_rl),
                "f1": float(em),
                "answer_in_docs": 1.0,
                "well_formed": 1.0,
                "num_searches": s_sft if which == "sft" else s_rl,
                "response_tokens": 10,
                "response": "<answer> x </answer>",
                "finish_reason": "answer",
                "seconds": 0.1,
                "hops": hops,
            }
        )
    store.create_run(rid, "eval", name=rid)
    store.add_eval_results(rid, rows)
    store.add_eval_summary(rid, "synth", summarize(rows), {"limit": 8}, method=method, n=8)
    store.set_status(rid, "finished")


def test_rows_and_paired_from_stored_per_question_results(sr1_home: Path) -> None:
    store = Store()
    _store_eval(store, "e-sft", "search", "sft")
    _store_eval(store, "e-rl", "search", "rl")
    _store_eval(store, "e-nm", "search", "sft")  # the no-mask model: scores like SFT here
    state = {
        "eval-sft": {"run_id": "e-sft", "method": "search"},
        "eval-rl": {"run_id": "e-rl", "method": "search"},
        "eval-rl-nomask": {"run_id": "e-nm", "method": "search"},
    }
    report = build_report(["e-sft", "e-rl", "e-nm"], compare=("e-sft", "e-rl"), n_boot=500)
    rows = {r["stage"]: r for r in summary_rows(report, state, list(state))}
    rl, sft, nm = rows["eval-rl"], rows["eval-sft"], rows["eval-rl-nomask"]
    assert (sft["model"], sft["ablation"]) == ("sft", None)
    assert (rl["model"], rl["method"], rl["ablation"]) == ("sft+rl", "search", None)
    assert (nm["model"], nm["ablation"]) == ("sft+rl", "no_mask")
    # RL: EM 5/8; cover-EM 6/8; single-hop EM 2/4, searches (1+1+1+2)/4; two-hop EM 3/4,
    # searches (2+2+1+3)/4
    assert rl["em"] == pytest.approx(5 / 8) and rl["cover_em"] == pytest.approx(6 / 8)
    assert rl["em_single_hop"] == pytest.approx(0.5) and rl["em_two_hop"] == pytest.approx(0.75)
    assert rl["searches_single_hop"] == pytest.approx(1.25)
    assert rl["searches_two_hop"] == pytest.approx(2.0)
    assert rl["searches_per_question"] == pytest.approx(13 / 8) and rl["n"] == 8
    assert sft["em"] == pytest.approx(3 / 8) and sft["cover_em"] == pytest.approx(3 / 8)
    assert sft["em_two_hop"] == pytest.approx(0.25) and sft["searches_two_hop"] == 1.25

    p = paired_summary(report["compare"], "eval-sft", "eval-rl")
    # gained q2, q4, q5; lost q1: delta (3 - 1) / 8
    assert p["n"] == 8 and p["gained"] == 3 and p["lost"] == 1
    assert p["delta"] == pytest.approx(2 / 8) and p["a_mean"] == pytest.approx(3 / 8)
    assert (p["a_run"], p["b_run"], p["metric"]) == ("e-sft", "e-rl", "em")
    lo, hi = p["ci"]
    assert lo <= 2 / 8 <= hi
    # sign-flip test over the 4 non-zero differences: |sum| >= 2 for 10 of 16 sign patterns
    assert p["p_value"] == pytest.approx(10 / 16, abs=0.03)


def test_summary_rows_label_untrained_baselines(sr1_home: Path) -> None:
    store = Store()
    _store_eval(store, "e-rag", "rag", "sft")
    state = {"eval-rag": {"run_id": "e-rag", "method": "rag"}}
    (row,) = summary_rows(build_report(["e-rag"], n_boot=10), state, ["eval-rag"])
    assert (row["model"], row["method"], row["ablation"]) == ("untrained", "rag", None)
