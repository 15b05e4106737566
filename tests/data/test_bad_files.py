"""Damaged input files through the real CLI (``main()``, what the ``sr1`` script runs): corpus
files for ``sr1 index build --corpus-file`` and QA files for ``sr1 data prepare`` / ``sr1 rollout
--data``. Each is one ``error:`` line naming the file and line, exit 2, never a traceback;
``--skip-bad-lines`` skips (and counts) lines that are not UTF-8, but never a damaged gzip."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sr1.cli.main import app, main

LATIN1 = "café".encode("latin-1")  # b"caf\xe9": not UTF-8


def _passages(n: int, start: int = 0) -> list[bytes]:
    return [
        json.dumps(
            {"id": str(i), "contents": f'"Title {i}"\npassage number {i} about things'}
        ).encode()
        for i in range(start, start + n)
    ]


def _lines(rows: list[bytes]) -> bytes:
    return b"".join(r + b"\n" for r in rows)


def _with_latin1_line(rows: list[bytes], at: int) -> bytes:
    """``rows`` with line ``at`` (1-based) replaced by a JSON row holding a latin-1 byte."""
    rows = list(rows)
    rows[at - 1] = b'{"id": "bad", "contents": "\\"T\\"\\n' + LATIN1 + b'"}'
    return _lines(rows)


def _truncated_gz(data: bytes) -> tuple[bytes, int]:
    """A gzip of ``data`` cut in the middle, and the line a reader stops at (1-based)."""
    full = gzip.compress(data)
    cut = full[: len(full) // 2]
    prefix = zlib.decompressobj(31).decompress(cut)  # what can be decompressed before the cut
    return cut, prefix.count(b"\n") + 1


def _error_line(err: str, path: Path) -> str:
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err
    assert str(path) in errors[0], err
    return errors[0]


def _build(path: Path, *extra: str) -> list[str]:
    return ["index", "build", "bad", "--corpus-file", str(path), *extra]


SAME = "same error"  # --skip-bad-lines does not hide a damaged gzip: it is not a bad line
EMPTY = "no passages"  # every line is undecodable or malformed: nothing left to index
SKIPPED = "skipped"  # the bad line is skipped and the build succeeds


def _corpus_cases(tmp: Path) -> dict[str, tuple[Path, str, str]]:
    """name -> (file, expected error text after ``file``, what --skip-bad-lines gives)."""
    rows = _passages(40)
    cases: dict[str, tuple[bytes, str, str]] = {}
    cases["latin1.jsonl"] = (_with_latin1_line(rows, 7), ":7: not valid UTF-8 (byte 0xe9", SKIPPED)
    cases["latin1.tsv"] = (
        b"id\ttext\ttitle\n1\tsome text\tT\n2\t" + LATIN1 + b"\tT2\n3\tmore\tT3\n",
        ":3: not valid UTF-8",
        SKIPPED,
    )
    cases["latin1-in-gzip.jsonl.gz"] = (
        gzip.compress(_with_latin1_line(rows, 12)),
        ":12: not valid UTF-8",
        SKIPPED,
    )
    cases["utf16.jsonl"] = (_lines(rows).decode().encode("utf-16"), ":1: not UTF-8", EMPTY)
    cases["gzip-not-named-gz.jsonl"] = (gzip.compress(_lines(rows)), ":1: not text: gzip", EMPTY)
    cases["fake.jsonl.gz"] = (_lines(rows), ":1: not a gzip file", SAME)
    big = _lines(_passages(3000))
    cut, at = _truncated_gz(big)
    cases["truncated.jsonl.gz"] = (cut, f":{at}: truncated gzip file", SAME)
    full = gzip.compress(big)
    flipped = full[:40] + bytes(b ^ 0xFF for b in full[40:80]) + full[80:]
    cases["corrupt.jsonl.gz"] = (flipped, ":1: corrupt gzip data", SAME)
    small = gzip.compress(_lines(rows))
    bad_crc = small[:-8] + bytes([small[-8] ^ 0xFF]) + small[-7:]
    cases["bad-crc.jsonl.gz"] = (bad_crc, ":41: corrupt gzip data (CRC check failed", SAME)
    tsv = b"id\ttext\ttitle\n" + b"".join(b"%d\ttext %d\tT\n" % (i, i) for i in range(3000))
    cut, at = _truncated_gz(tsv)
    cases["truncated.tsv.gz"] = (cut, f":{at}: truncated gzip file", SAME)
    out = {}
    for name, (data, expect, with_skip) in cases.items():
        p = tmp / name
        p.write_bytes(data)
        out[name] = (p, expect, with_skip)
    return out


def test_bad_corpus_files_are_one_error_line(tmp_path: Path, capsys) -> None:
    cases = _corpus_cases(tmp_path)
    assert len(cases) == 10
    for name, (path, expect, with_skip) in cases.items():
        assert main(_build(path)) == 2, name
        line = _error_line(capsys.readouterr().err, path)
        assert f"{path}{expect}" in line, (name, line)
        rc = main(_build(path, "--skip-bad-lines"))
        err = capsys.readouterr().err
        if with_skip == SKIPPED:
            assert rc == 0 and "1 malformed lines skipped" in " ".join(err.split()), (name, err)
            continue
        assert rc == 2, name
        line = _error_line(err, path)
        if with_skip == SAME:
            assert f"{path}{expect}" in line, (name, line)
        else:
            assert "no passages" in line and "malformed lines skipped" in line, (name, line)


def test_skip_bad_lines_skips_and_counts_undecodable_lines(tmp_path: Path, capsys) -> None:
    rows = _passages(40)
    data = _with_latin1_line(rows, 7)
    data = data.replace(rows[19] + b"\n", b"{broken json\n")  # line 20: a malformed line too
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(data)
    assert main(_build(path)) == 2
    assert f"{path}:7: not valid UTF-8" in _error_line(capsys.readouterr().err, path)
    res = CliRunner().invoke(app, _build(path, "--skip-bad-lines", "--json"))
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert m["passages"] == 38
    assert m["corpus"]["skipped_lines"] == 2 and m["corpus"]["skipped_undecodable"] == 1
    # the human summary says so too
    assert main(_build(path, "--skip-bad-lines")) == 0
    err = " ".join(capsys.readouterr().err.split())  # rich wraps the summary at 80 columns
    assert "2 malformed lines skipped (1 not UTF-8)" in err and "Traceback" not in err
    gz = tmp_path / "mixed.jsonl.gz"
    gz.write_bytes(gzip.compress(data))
    res = CliRunner().invoke(app, _build(gz, "--skip-bad-lines", "--json"))
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["corpus"]["skipped_undecodable"] == 1


def test_truncated_gzip_in_a_real_process(tmp_path: Path) -> None:
    """click turns a stray EOFError into 'Aborted!' (exit 1): the whole process must not."""
    cut, at = _truncated_gz(_lines(_passages(3000)))
    path = tmp_path / "wiki-18.jsonl.gz"
    path.write_bytes(cut)
    r = subprocess.run(
        [sys.executable, "-m", "sr1.cli.main", *_build(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    line = _error_line(r.stderr, path)
    assert f"{path}:{at}: truncated gzip file" in line and f"after {at - 1} complete lines" in line


def _qa(n: int) -> list[bytes]:
    return [
        json.dumps(
            {"id": str(i), "question": f"question {i}?", "golden_answers": [f"a{i}"]}
        ).encode()
        for i in range(n)
    ]


def _qa_cases(tmp: Path) -> dict[str, tuple[bytes, str]]:
    rows = _qa(10)
    bad = list(rows)
    bad[2] = b'{"id": "2", "question": "' + LATIN1 + b'?", "golden_answers": ["x"]}'
    cut, at = _truncated_gz(_lines(_qa(4000)))
    return {
        "latin1": (_lines(bad), ":3: not valid UTF-8 (byte 0xe9"),
        "utf16": (_lines(rows).decode().encode("utf-16"), ":1: not UTF-8"),
        "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\n", ":1: not valid UTF-8"),
        "not-an-object": (_lines(rows[:3]) + b"5\n", ":4: expected a JSON object"),
        "fake.gz": (_lines(rows), ":1: not a gzip file"),
        "truncated.gz": (cut, f":{at}: truncated gzip file"),
    }


def test_bad_qa_files_for_prepare(tmp_path: Path, capsys) -> None:
    n = 0
    for name, (data, expect) in _qa_cases(tmp_path).items():
        if name.endswith(".gz"):
            continue  # prepare reads <dataset>/<split>.jsonl only
        src = tmp_path / name
        path = src / "nq" / "test.jsonl"
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        assert main(["data", "prepare", "nq", "--source-dir", str(src)]) == 2, name
        assert f"{path}{expect}" in _error_line(capsys.readouterr().err, path), name
        n += 1
    assert n == 4


def _qa_file(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / (f"{name[:-3]}.jsonl.gz" if name.endswith(".gz") else f"{name}.jsonl")
    path.write_bytes(data)
    return path


def test_bad_qa_files_for_rollout_data(tmp_path: Path, tiny_qwen2: str, capsys) -> None:
    from sr1.errors import Sr1Error
    from sr1.rollout.api import read_flashrag

    cases = _qa_cases(tmp_path)
    for name, (data, expect) in cases.items():  # the reader behind --data, every case
        path = _qa_file(tmp_path, name, data)
        with pytest.raises(Sr1Error) as e:
            read_flashrag(path)
        assert str(e.value).startswith(f"{path}{expect}"), (name, str(e.value))
    for name in ("latin1", "truncated.gz", "not-an-object"):  # and the CLI (tokenizer loads first)
        path = _qa_file(tmp_path, name, cases[name][0])
        args = ["rollout", "--model", tiny_qwen2, "--index", "none", "--data", str(path)]
        assert main(args) == 2, name
        assert f"{path}{cases[name][1]}" in _error_line(capsys.readouterr().err, path), name


@pytest.mark.parametrize("gz", [False, True])
def test_good_files_still_read(tmp_path: Path, gz: bool) -> None:
    """The same reader serves clean files: a BOM is dropped, CRLF endings are fine, .gz works."""
    from sr1.rollout.api import read_flashrag

    data = b"\xef\xbb\xbf" + _lines(_qa(3)).replace(b"\n", b"\r\n")
    path = tmp_path / ("qa.jsonl.gz" if gz else "qa.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    rows = read_flashrag(path)
    assert [r["id"] for r in rows] == ["0", "1", "2"] and rows[2]["golden_answers"] == ["a2"]
