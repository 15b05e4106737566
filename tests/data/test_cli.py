"""`sr1 data prepare|synth|list` through the real CLI (CliRunner; errors through main())."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sr1.cli.main import app, main


def test_prepare_all_datasets_json(shared_data: Path, sr1_home: Path) -> None:
    r = CliRunner().invoke(
        app,
        ["data", "prepare", "--all-datasets", "--source-dir", str(shared_data / "qa"), "--json"],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert list(doc) == [
        "nq",
        "triviaqa",
        "popqa",
        "hotpotqa",
        "2wikimultihopqa",
        "musique",
        "bamboogle",
    ]
    assert doc["nq"]["train"]["rows"] == 476 and doc["bamboogle"]["dev"]["rows"] == 75
    assert doc["musique"]["dev"]["dropped_no_answers"] == 0
    assert (sr1_home / "data" / "hotpotqa" / "train.parquet").is_file()


def test_prepare_table_and_list(shared_data: Path) -> None:
    r = CliRunner().invoke(
        app, ["data", "prepare", "bamboogle", "musique", "--source-dir", str(shared_data / "qa")]
    )
    assert r.exit_code == 0, r.output
    assert "bamboogle" in r.stdout and "99" in r.stdout
    r = CliRunner().invoke(app, ["data", "list", "--json"])
    assert r.exit_code == 0, r.output
    listed = {d["name"]: d for d in json.loads(r.stdout)}
    assert listed["musique"]["prepared"] == {"dev": 99} and listed["musique"]["hops"] == "multi"
    assert listed["nq"]["eval_split"] == "test" and listed["hotpotqa"]["eval_split"] == "dev"
    assert "synth" in listed


def test_prepare_instruct_template_with_model(shared_data: Path, tiny_qwen2: str) -> None:
    r = CliRunner().invoke(
        app,
        ["data", "prepare", "bamboogle", "--source-dir", str(shared_data / "qa")]
        + ["--template", "instruct", "--model", tiny_qwen2, "--json"],
    )
    assert r.exit_code == 0, r.output
    import polars as pl

    prompts = pl.read_parquet(json.loads(r.stdout)["bamboogle"]["dev"]["path"])["prompt"]
    assert all(
        p.startswith("<|im_start|>") and p.endswith("<|im_start|>assistant\n") for p in prompts
    )


def test_synth_cli(tmp_path: Path, sr1_home: Path) -> None:
    out = tmp_path / "world"
    args = ["data", "synth", "--out", str(out), "--seed", "3", "--n-entities", "80"]
    r = CliRunner().invoke(app, [*args, "--n-dev", "10", "--n-test", "20", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["corpus"] == str(out / "corpus.jsonl") and (out / "corpus.jsonl").is_file()
    assert doc["questions"]["dev"] == 10 and doc["prepared"]["test"]["rows"] == 20
    assert (out / "qa" / "synth" / "train.jsonl").is_file()
    assert (sr1_home / "data" / "synth" / "test.parquet").is_file()


def test_cli_errors_are_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def err() -> str:  # rich wraps long lines: compare without whitespace
        return "".join(capsys.readouterr().err.split())

    assert main(["data", "prepare", "nq", "--source-dir", str(tmp_path)]) == 2
    assert f"error:nonqsplitfilesunder{tmp_path / 'nq'}" in err()
    assert main(["data", "prepare"]) == 2
    assert "--all-datasets" in err()
    assert main(["data", "prepare", "squad", "--source-dir", str(tmp_path)]) == 2
    assert "unknowndataset'squad'" in err()
    assert main(["data", "prepare", "nq", "--template", "instruct"]) == 2
    assert "chattemplate" in err()
