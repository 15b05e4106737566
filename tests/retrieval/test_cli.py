"""`sr1 index build|list`, `sr1 search` through the real CLI app (CliRunner)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from sr1.cli.main import app, main
from sr1.errors import NotFoundError
from tests.retrieval.conftest import write_slice

runner = CliRunner()


def test_index_build_list_search(sample_corpus: Path, tmp_path: Path, sr1_home: Path) -> None:
    part = write_slice(sample_corpus, tmp_path / "part.jsonl", 1500)
    res = runner.invoke(app, ["index", "build", "part", "--corpus-file", str(part), "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert m["passages"] == 1500 and m["retriever"] == "bm25"
    assert (sr1_home / "indices" / "part" / "manifest.json").is_file()

    res = runner.invoke(app, ["index", "list", "--json"])
    assert res.exit_code == 0 and [x["name"] for x in json.loads(res.stdout)] == ["part"]
    res = runner.invoke(app, ["index", "list"])
    assert res.exit_code == 0 and "part" in res.stdout and "1,500" in res.stdout

    res = runner.invoke(
        app,
        [
            "search",
            "World Championship Wrestling",
            "Atlanta",
            "--index",
            "part",
            "-k",
            "2",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [len(r["passages"]) for r in doc["results"]] == [2, 2]
    assert doc["results"][0]["passages"][0]["title"] == "World Championship Wrestling"
    assert doc["retriever"]["kind"] == "bm25"
    res = runner.invoke(app, ["search", "World Championship Wrestling", "--index", "part"])
    assert res.exit_code == 0 and "World Championship" in res.stdout


def test_errors_are_one_line_with_a_hint(sample_corpus: Path, tmp_path: Path, capsys) -> None:
    res = runner.invoke(app, ["search", "x", "--index", "missing"])
    assert isinstance(res.exception, NotFoundError) and "sr1 index build missing" in str(
        res.exception
    )
    assert main(["search", "x", "--index", "missing"]) == 2
    assert "error:" in capsys.readouterr().err

    bad = write_slice(sample_corpus, tmp_path / "bad.jsonl", 30)
    bad.write_text(bad.read_text(encoding="utf-8") + "{broken\n", encoding="utf-8")
    assert main(["index", "build", "bad", "--corpus-file", str(bad)]) == 2
    assert "bad.jsonl:31" in capsys.readouterr().err
    res = runner.invoke(
        app, ["index", "build", "bad", "--corpus-file", str(bad), "--skip-bad-lines", "--json"]
    )
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert m["passages"] == 30 and m["corpus"]["skipped_lines"] == 1


def test_wiki18_path_is_given_once(sample_corpus: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SR1_WIKI18", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = runner.invoke(app, ["index", "build", "wiki18"])
    assert isinstance(res.exception, NotFoundError) and "--corpus-file" in str(res.exception)
    part = write_slice(sample_corpus, tmp_path / "my-wiki.jsonl", 60)
    res = runner.invoke(app, ["index", "build", "wiki18", "--corpus-file", str(part), "--json"])
    assert res.exit_code == 0, res.output
    part2 = write_slice(
        sample_corpus, tmp_path / "other.jsonl", 10
    )  # not used: remembered path wins
    del part2
    res = runner.invoke(app, ["index", "build", "wiki18", "--json"])  # no --corpus-file this time
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert m["passages"] == 60 and Path(m["corpus"]["path"]) == part.resolve()
