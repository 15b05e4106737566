"""Corpus readers over the real sample: JSONL and DPR TSV agree; bad lines are located."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from sr1.errors import NotFoundError, Sr1Error
from sr1.retrieval.corpus import iter_corpus, resolve_corpus
from tests.retrieval.conftest import write_slice


def _to_dpr_tsv(passages, path: Path) -> None:
    """Write passages the way DPR's psgs_w100.tsv is written: header, csv quoting, tabs."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["id", "text", "title"])
        for p in passages:
            w.writerow([p.id, p.text, p.title])


def test_jsonl_and_tsv_readers_agree(sample_corpus: Path, tmp_path: Path) -> None:
    part = write_slice(sample_corpus, tmp_path / "part.jsonl", 500, start=1000)
    from_jsonl = list(iter_corpus(part))
    assert len(from_jsonl) == 500
    assert from_jsonl[0].contents.startswith('"') and "\n" in from_jsonl[0].contents
    # the sample has quotes inside texts: csv quoting must round-trip them
    assert any('"' in p.text for p in from_jsonl)
    tsv = tmp_path / "psgs_w100.tsv"
    _to_dpr_tsv(from_jsonl, tsv)
    from_tsv = list(iter_corpus(tsv))
    assert from_tsv == from_jsonl
    gz = tmp_path / "psgs_w100.tsv.gz"
    gz.write_bytes(gzip.compress(tsv.read_bytes()))
    assert list(iter_corpus(gz)) == from_jsonl


def test_malformed_lines_name_file_and_line(sample_corpus: Path, tmp_path: Path) -> None:
    part = write_slice(sample_corpus, tmp_path / "bad.jsonl", 20)
    lines = part.read_text(encoding="utf-8").splitlines()
    lines[6] = lines[6][:40]  # truncated JSON on line 7
    lines[11] = json.dumps({"id": "x"})  # no contents on line 12
    part.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(Sr1Error, match=r"bad\.jsonl:7: .*JSON") as e:
        list(iter_corpus(part))
    assert "--skip-bad-lines" in str(e.value)
    stats: dict[str, int] = {}
    good = list(iter_corpus(part, skip_bad_lines=True, stats=stats))
    assert len(good) == 18 and stats["skipped"] == 2

    tsv = tmp_path / "bad.tsv"
    tsv.write_text("id\ttext\ttitle\n1\tsome text\tT\n2\tonly two columns\n", encoding="utf-8")
    with pytest.raises(Sr1Error, match=r"bad\.tsv:3: .*3 tab-separated columns"):
        list(iter_corpus(tsv))


def test_unknown_format_and_named_corpora(tmp_path: Path, sr1_home: Path) -> None:
    odd = tmp_path / "corpus.csv"
    odd.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(Sr1Error, match="unknown corpus format"):
        list(iter_corpus(odd))
    with pytest.raises(NotFoundError, match="sr1 data synth"):
        resolve_corpus("synth")
    synth = sr1_home / "corpora" / "synth" / "corpus.jsonl"
    synth.parent.mkdir(parents=True)
    synth.write_text(json.dumps({"id": "1", "contents": '"T"\nx'}) + "\n", encoding="utf-8")
    assert resolve_corpus("synth") == synth.resolve()
    with pytest.raises(NotFoundError, match="--corpus-file"):
        resolve_corpus("no-such-corpus")


def test_build_index_skips_bad_lines_when_asked(sample_corpus: Path, tmp_path: Path) -> None:
    from sr1.retrieval.index import build_index, list_indices

    part = write_slice(sample_corpus, tmp_path / "bad.jsonl", 30)
    lines = part.read_text(encoding="utf-8").splitlines()
    lines[4] = "{not json"
    part.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(Sr1Error, match=r"bad\.jsonl:5: "):
        build_index("bad", corpus_file=part, progress=False)
    assert list_indices() == []  # the failed build left no index behind
    m = build_index("bad", corpus_file=part, progress=False, skip_bad_lines=True)
    assert m["passages"] == 29 and m["corpus"]["skipped_lines"] == 1
