"""Dataset preparation: the seven benchmarks from the real samples, the schema, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from sr1.data import datasets as ds_mod
from sr1.data.prepare import (
    load_split,
    parquet_path,
    prepare,
    read_manifest,
    resolve_eval_split,
    train_mix,
)
from sr1.data.prompts import render_prompt
from sr1.errors import NotFoundError, Sr1Error

# The row counts of ../shared/data/README.md.
EXPECTED = {
    "nq": {"train": 476, "dev": 255},
    "triviaqa": {"train": 483, "dev": 265},
    "popqa": {"train": 480, "dev": 266},
    "hotpotqa": {"train": 600, "dev": 261},
    "2wikimultihopqa": {"dev": 75},
    "musique": {"dev": 99},
    "bamboogle": {"dev": 75},
}


def _write(path: Path, rows: list[dict] | list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


@pytest.fixture()
def no_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide ../shared/data so 'nothing available' paths can be tested on this machine."""
    monkeypatch.setattr(ds_mod.paths, "shared_data_dir", lambda: None)


def test_all_seven_from_shared_samples(shared_data: Path, sr1_home: Path) -> None:
    counts = prepare(None, all_datasets=True, source_dir=shared_data / "qa", progress=False)
    got = {d: {s: c["rows"] for s, c in per.items()} for d, per in counts.items()}
    assert got == EXPECTED
    for name, per in counts.items():
        for split, c in per.items():
            assert c["read"] == c["rows"] and c["dropped_empty_question"] == 0
            assert c["dropped_no_answers"] == 0
            path = Path(c["path"])
            assert path == sr1_home / "data" / name / f"{split}.parquet"
            df = pl.read_parquet(path)
            assert df.columns == [
                "id",
                "data_source",
                "question",
                "golden_answers",
                "split",
                "prompt",
                "metadata",
            ]
            assert df.schema["golden_answers"] == pl.List(pl.Utf8)
            assert df["id"].n_unique() == len(df) == EXPECTED[name][split]
            assert set(df["data_source"]) == {name} and set(df["split"]) == {split}
        assert read_manifest(name)[split]["template"] == "base"
    rows = load_split("hotpotqa", "dev", limit=5)
    assert len(rows) == 5
    src = [json.loads(x) for x in (shared_data / "qa" / "hotpotqa" / "dev.jsonl").open()][:5]
    for r, s in zip(rows, src, strict=True):
        assert r["id"] == s["id"] and r["question"] == s["question"].strip()
        assert r["golden_answers"] == s["golden_answers"]
        assert r["prompt"] == render_prompt(s["question"])
        assert isinstance(r["metadata"], dict)


def test_load_split_prepares_on_the_fly_from_shared(shared_data: Path, sr1_home: Path) -> None:
    assert not parquet_path("musique", "dev").exists()
    rows = load_split("musique", "dev")
    assert len(rows) == 99 and parquet_path("musique", "dev").is_file()
    assert {r["data_source"] for r in rows} == {"musique"}


def test_eval_split_selection(shared_data: Path, tmp_path: Path, no_shared: None) -> None:
    # nothing local: the paper's choice (test where the set has one, else dev)
    assert [resolve_eval_split(d) for d in ds_mod.BENCHMARKS] == [
        "test",
        "test",
        "test",
        "dev",
        "dev",
        "dev",
        "test",
    ]
    # the shared samples have no test split: fall back to dev
    assert resolve_eval_split("nq", source_dir=shared_data / "qa") == "dev"
    _write(tmp_path / "nq" / "test.jsonl", [{"id": "1", "question": "q", "golden_answers": ["a"]}])
    assert resolve_eval_split("nq", source_dir=tmp_path) == "test"
    assert resolve_eval_split("nq", "train") == "train"


def test_train_mix(shared_data: Path) -> None:
    rows = train_mix(source_dir=shared_data / "qa")
    assert len(rows) == 476 + 600
    assert {r["data_source"] for r in rows} == {"nq", "hotpotqa"}
    assert len({r["id"] for r in rows}) == len(rows)
    assert [r["id"] for r in train_mix(limit=50, seed=1)] == [
        r["id"] for r in train_mix(limit=50, seed=1)
    ]
    few = train_mix(limit=100)
    assert len(few) == 100 and {r["data_source"] for r in few} == {"nq", "hotpotqa"}


def test_dropped_rows_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(
        tmp_path / "nq" / "dev.jsonl",
        [
            {"id": "a", "question": " who founded Qelm ", "golden_answers": ["Anra Voss"]},
            {"id": "b", "question": "   ", "golden_answers": ["x"]},
            {"id": "c", "question": "what is it", "golden_answers": []},
            {"id": "d", "question": "what year", "golden_answers": 1932, "metadata": {"k": 1}},
            {"id": "e", "question": "where", "golden_answers": ["", "  "], "type": "bridge"},
        ],
    )
    c = prepare(["nq"], source_dir=tmp_path, progress=False)["nq"]["dev"]
    assert (c["read"], c["rows"]) == (5, 2)
    assert (c["dropped_empty_question"], c["dropped_no_answers"]) == (1, 2)
    assert "dropped 3 of 5 rows" in capsys.readouterr().err
    rows = load_split("nq", "dev")
    assert [r["id"] for r in rows] == ["a", "d"]
    assert rows[0]["question"] == "who founded Qelm"
    assert rows[1]["golden_answers"] == ["1932"] and rows[1]["metadata"] == {"k": 1}


def test_duplicate_ids_are_an_error(tmp_path: Path) -> None:
    row = {"id": "7", "question": "q", "golden_answers": ["a"]}
    _write(tmp_path / "nq" / "dev.jsonl", [row, {**row, "id": "8"}, row])
    with pytest.raises(Sr1Error, match=r"dev.jsonl:3: duplicate id '7' \(first at line 1\)"):
        prepare(["nq"], source_dir=tmp_path, progress=False)
    assert not parquet_path("nq", "dev").exists()


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    _write(
        tmp_path / "nq" / "dev.jsonl",
        ['{"id": "1", "question": "q", "golden_answers": ["a"]}', "{oops"],
    )
    with pytest.raises(Sr1Error, match=r"nq/dev.jsonl:2: not valid JSON"):
        prepare(["nq"], source_dir=tmp_path, progress=False)


def test_missing_split_names_the_expected_path(tmp_path: Path) -> None:
    _write(tmp_path / "nq" / "dev.jsonl", [{"id": "1", "question": "q", "golden_answers": ["a"]}])
    with pytest.raises(NotFoundError) as e:
        prepare(["nq"], source_dir=tmp_path, splits=["test"], progress=False)
    assert str(tmp_path / "nq" / "test.jsonl") in str(e.value) and "dev" in str(e.value)
    with pytest.raises(NotFoundError, match=str(tmp_path / "nq" / "train.jsonl")):
        load_split("nq", "train", source_dir=tmp_path)
    with pytest.raises(NotFoundError, match="no popqa split files"):
        prepare(["popqa"], source_dir=tmp_path, progress=False)
    with pytest.raises(NotFoundError, match="source directory not found"):
        prepare(["nq"], source_dir=tmp_path / "nope", progress=False)


def test_nothing_available_says_how_to_prepare(no_shared: None) -> None:
    with pytest.raises(NotFoundError) as e:
        load_split("nq", "test")
    assert "sr1 data prepare nq --source-dir" in str(e.value)
    with pytest.raises(NotFoundError, match="sr1 data synth"):
        load_split("synth", "test")
    with pytest.raises(NotFoundError, match="valid: 2wikimultihopqa, bamboogle"):
        load_split("squad", "dev")
    with pytest.raises(Sr1Error, match="--all-datasets"):
        prepare([], progress=False)


def test_source_change_is_prepared_again(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "popqa" / "dev.jsonl", [{"id": "1", "question": "q1", "golden_answers": ["a"]}]
    )
    assert [r["question"] for r in load_split("popqa", "dev", source_dir=tmp_path)] == ["q1"]
    sha = read_manifest("popqa")["dev"]["source_sha256"]
    assert [r["question"] for r in load_split("popqa", "dev")] == ["q1"]
    _write(f, [{"id": "1", "question": "q2", "golden_answers": ["a"]}])
    assert [r["question"] for r in load_split("popqa", "dev", source_dir=tmp_path)] == ["q2"]
    assert read_manifest("popqa")["dev"]["source_sha256"] != sha


def test_hub_download_fails_clearly_offline(
    monkeypatch: pytest.MonkeyPatch, no_shared: None
) -> None:
    # The machine is offline: the real hub code path must end in a clear, actionable error.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(Sr1Error, match="could not download bamboogle/test.jsonl") as e:
        prepare(["bamboogle"], download=True, progress=False)
    assert "--source-dir" in str(e.value)
    with pytest.raises(NotFoundError, match="no dev on the hub"):
        prepare(["bamboogle"], download=True, splits=["dev"], progress=False)


def test_instruct_template_needs_a_tokenizer(shared_data: Path) -> None:
    with pytest.raises(Sr1Error, match="chat template"):
        prepare(["bamboogle"], source_dir=shared_data / "qa", template="instruct", progress=False)
