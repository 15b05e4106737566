"""`sr1 eval --split test --source-dir DIR` evaluates DIR's own files: the split is resolved
against the source actually read, not the bundled samples (which have dev only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sr1.cli.main import app, main

FAST = ["eval.max_new_tokens=6", "eval.batch_size=3", "rollout.max_prompt_length=384"]
ROWS = [
    {"id": "t1", "question": "who wrote the test?", "golden_answers": ["a tester"]},
    {"id": "t2", "question": "where is the test?", "golden_answers": ["here", "there"]},
    {"id": "t3", "question": "when was the test?", "golden_answers": ["now"]},
]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _source(root: Path, split: str) -> Path:
    d = root / "src"
    (d / "nq").mkdir(parents=True)
    (d / "nq" / f"{split}.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8"
    )
    return d


def _eval_args(model: str, src: Path, *extra: str) -> list[str]:
    sets = [a for s in FAST for a in ("--set", s)]
    return ["eval", "--dataset", "nq", "--model", model, "--method", "direct", "--limit", "2"] + [
        "--source-dir",
        str(src),
        *extra,
        *sets,
    ]


def test_eval_split_test_reads_the_source_dir(tiny_qwen2: str, tmp_path: Path) -> None:
    src = _source(tmp_path, "test")  # DIR/nq holds test.jsonl only
    res = CliRunner().invoke(app, [*_eval_args(tiny_qwen2, src, "--split", "test"), "--json"])
    assert res.exit_code == 0, (res.output, res.exception)
    doc = json.loads(res.stdout)
    setup = doc["setup"]["nq"]
    assert setup["split"] == "test" and setup["source_dir"] == str(src.resolve())
    assert doc["datasets"]["nq"]["n"] == 2
    from sr1.tracking.store import Store

    rows = Store().eval_results([doc["run_id"]])
    assert sorted(r["example_id"] for r in rows) == ["t1", "t2"]


def test_eval_default_split_falls_back_to_the_source_dirs_dev(
    tiny_qwen2: str, tmp_path: Path, capsys
) -> None:
    src = _source(tmp_path, "dev")  # no test there: test falls back to DIR's dev
    res = CliRunner().invoke(app, [*_eval_args(tiny_qwen2, src), "--json"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert json.loads(res.stdout)["setup"]["nq"]["split"] == "dev"
    # a split DIR does not have is an error naming DIR's splits, not the samples'
    assert main(_eval_args(tiny_qwen2, src, "--split", "train")) == 2
    err = capsys.readouterr().err
    assert "split 'train' not found" in err and "dev" in err and "Traceback" not in err
