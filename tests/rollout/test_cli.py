"""`sr1 rollout` end to end: a real BM25 index built by sr1, the tiny model, JSON lines out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sr1.cli.main import app, main
from sr1.models import load_tokenizer

from .helpers import PASSAGES


@pytest.fixture()
def index_and_data(tmp_path: Path) -> tuple[str, Path]:
    from sr1.retrieval.index import build_index

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "contents": c}) + "\n" for i, c in PASSAGES))
    build_index("zorvia", corpus_file=corpus, progress=False)
    data = tmp_path / "qa.jsonl"
    qs = [("a", "Who founded Qelm?", ["Anra Voss"]), ("b", "What is Zorvia's river?", ["Dast"])]
    data.write_text(
        "".join(json.dumps({"id": i, "question": q, "golden_answers": g}) + "\n" for i, q, g in qs)
    )
    return "zorvia", data


def test_rollout_cli_writes_inspectable_jsonl(
    tiny_qwen2: str, index_and_data: tuple[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("sr1.data.prompts", reason="sr1.data.prompts (render_prompt) not built yet")
    index, data = index_and_data
    out = tmp_path / "trajs.jsonl"
    args = ["rollout", "--model", tiny_qwen2, "--index", index, "--data", str(data)]
    args += ["--max-turns", "1", "--topk", "2", "--out", str(out), "--json", "--show"]
    args += [
        "--set",
        "rollout.max_response_length=8",
        "--set",
        "rollout.max_total_response_length=96",
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["out"] == str(out) and doc["summary"]["n"] == 2
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    tok = load_tokenizer(tiny_qwen2)
    assert [x["id"] for x in lines] == ["a", "b"]
    for x in lines:
        for key in ("question", "golden_answers", "text", "prompt_ids", "response_ids"):
            assert key in x
        assert len(x["loss_mask"]) == len(x["response_ids"]) <= 96
        assert x["text"] == tok.decode(x["response_ids"], skip_special_tokens=False)
        assert x["prompt"].rstrip().endswith(x["question"]) or x["question"] in x["prompt"]
        assert x["finish_reason"] in {"answer", "eos", "forced", "max_turns", "length", "context"}


def test_rollout_cli_errors_are_one_line_and_actionable(
    tiny_qwen2: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["rollout", "--model", tiny_qwen2, "--index", "zorvia"]
    assert main([*base, "--data", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "error: data file not found" in err and "Traceback" not in err
    assert main([*base, "--data", "x.jsonl", "--dataset", "nq"]) == 2
    assert "exactly one of --dataset or --data" in capsys.readouterr().err
