"""Corpus readers and the corpus registry: stream wiki-18-style passages from JSONL or DPR TSV.

Formats (detected by extension, optionally ``.gz``):

* ``.jsonl`` / ``.json``: FlashRAG / Search-R1 rows ``{"id", "contents": "\\"Title\\"\\ntext"}``;
  rows with ``title`` and ``text`` instead of ``contents`` are accepted too.
* ``.tsv``: DPR's ``psgs_w100.tsv`` with columns ``id, text, title`` (a header row is skipped).

Both yield :class:`Passage` objects whose ``contents`` is ``"Title"\\ntext``, so the same passage
read from either file is identical. Files are streamed line by line; a malformed line (bad
JSON, missing fields, wrong column count, or not UTF-8) raises :class:`Sr1Error` naming
``file:line`` unless ``skip_bad_lines`` is set, in which case it is counted
(``CorpusReader.bad_lines``; ``undecodable_lines`` of them not UTF-8) and skipped. A ``.gz``
file that is not gzip, or is truncated or corrupt, is always an error naming the line reached.

The registry maps corpus *names* to files: ``synth`` (written by ``sr1 data synth``), ``wiki18``
(a path from config / ``SR1_WIKI18``, or downloaded from the hub on request), and any other name
that has ``$SR1_HOME/corpora/<name>/corpus.jsonl``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sr1 import paths
from sr1.errors import NotFoundError, Sr1Error
from sr1.io import iter_text_lines
from sr1.registry import Registry
from sr1.retrieval.base import Passage

csv.field_size_limit(
    min(sys.maxsize, 2**31 - 1)
)  # wiki paragraphs can exceed csv's 128 KiB default

_SKIP_HINT = "fix the line, or pass --skip-bad-lines to skip malformed lines"


def corpus_format(path: str | os.PathLike[str]) -> str:
    """``jsonl`` or ``tsv`` from the file name (``.gz`` allowed); anything else is an error."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".tsv"):
        return "tsv"
    raise Sr1Error(
        f"{path}: unknown corpus format",
        hint="use FlashRAG JSONL (.jsonl, {id, contents}) or DPR TSV (.tsv: id, text, title), optionally .gz",
    )


def make_contents(title: str, text: str) -> str:
    """wiki-18's passage form: the quoted title on the first line, then the text."""
    return f'"{title}"\n{text}'


class CorpusReader:
    """Streams one corpus file; ``bad_lines`` counts the lines skipped with ``skip_bad_lines``."""

    def __init__(self, path: str | os.PathLike[str], skip_bad_lines: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise NotFoundError(
                f"corpus file not found: {self.path}",
                hint="pass an existing .jsonl or .tsv file with --corpus-file",
            )
        self.format = corpus_format(self.path)
        self.skip_bad_lines = skip_bad_lines
        self.bad_lines = 0
        self.undecodable_lines = 0
        self._lineno = 0  # the physical line last read (csv may consume several per row)

    def _bad(self, lineno: int, why: str) -> None:
        if not self.skip_bad_lines:
            raise Sr1Error(f"{self.path}:{lineno}: {why}", hint=_SKIP_HINT)
        self.bad_lines += 1

    def _undecodable(self, lineno: int, why: str) -> None:
        self._bad(lineno, why)
        self.undecodable_lines += 1

    def _lines(self) -> Iterator[str]:
        for lineno, line in iter_text_lines(self.path, on_bad=self._undecodable):
            self._lineno = lineno
            yield line

    def __iter__(self) -> Iterator[Passage]:
        reader: Callable[[Iterator[str]], Iterator[Passage]] = (
            self._iter_jsonl if self.format == "jsonl" else self._iter_tsv
        )
        yield from reader(self._lines())

    def _iter_jsonl(self, f: Iterator[str]) -> Iterator[Passage]:
        for line in f:
            lineno = self._lineno
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                self._bad(lineno, f"not valid JSON ({e.msg})")
                continue
            p = self._row_to_passage(row)
            if isinstance(p, str):
                self._bad(lineno, p)
                continue
            yield p

    @staticmethod
    def _row_to_passage(row: Any) -> Passage | str:
        """A Passage, or a string saying what is wrong with the row."""
        if not isinstance(row, dict):
            return "expected a JSON object with id and contents"
        pid = row.get("id", row.get("_id"))
        if pid is None or isinstance(pid, dict | list):
            return "missing 'id'"
        contents = row.get("contents")
        if contents is None and isinstance(row.get("text"), str):
            contents = make_contents(str(row.get("title", "")), row["text"])
        if not isinstance(contents, str):
            return "missing 'contents' (or 'title' and 'text')"
        return Passage(id=str(pid), contents=contents)

    def _iter_tsv(self, f: Iterator[str]) -> Iterator[Passage]:
        rows = csv.reader(f, delimiter="\t")
        first = True
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as e:
                self._bad(self._lineno, f"malformed TSV ({e})")
                continue
            lineno = self._lineno
            if first:
                first = False
                if [c.strip().lower() for c in row[:3]] == ["id", "text", "title"]:
                    continue
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != 3:
                self._bad(
                    lineno, f"expected 3 tab-separated columns (id, text, title), got {len(row)}"
                )
                continue
            pid, text, title = row
            if not pid.strip():
                self._bad(lineno, "empty id")
                continue
            yield Passage(id=pid, contents=make_contents(title, text))


def iter_corpus(
    path: str | os.PathLike[str],
    skip_bad_lines: bool = False,
    stats: dict[str, int] | None = None,
) -> Iterator[Passage]:
    """Stream the passages of a JSONL (FlashRAG) or TSV (DPR) corpus file, in file order.

    With ``stats``, ``stats["skipped"]`` holds the malformed lines skipped so far (of them
    ``stats["undecodable"]`` not UTF-8) and ``stats["passages"]`` the passages yielded (final
    once the iterator is exhausted).
    """
    reader = CorpusReader(path, skip_bad_lines=skip_bad_lines)
    if stats is None:
        return iter(reader)
    return _counting(reader, stats)


def _counting(reader: CorpusReader, stats: dict[str, int]) -> Iterator[Passage]:
    stats.setdefault("skipped", 0)
    stats.setdefault("undecodable", 0)
    stats.setdefault("passages", 0)
    for p in reader:
        stats["skipped"] = reader.bad_lines
        stats["undecodable"] = reader.undecodable_lines
        stats["passages"] += 1
        yield p
    stats["skipped"] = reader.bad_lines
    stats["undecodable"] = reader.undecodable_lines


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of the file's bytes (as stored, so a .gz corpus hashes its compressed form)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --- corpus registry ----------------------------------------------------------------------------

CORPORA: Registry[Callable[..., Path]] = Registry("corpus")

WIKI18_ENV = "SR1_WIKI18"
WIKI18_HUB = {"repo_id": "PeterJinGo/wiki-18-corpus", "filename": "wiki-18.jsonl.gz"}


@CORPORA.register("synth")
def _synth_corpus(wiki18_path: str | None = None, download: bool = False) -> Path:
    p = paths.corpora_dir() / "synth" / "corpus.jsonl"
    if not p.is_file():
        raise NotFoundError(
            f"the synth corpus is not built ({p} is missing)",
            hint=f"run `sr1 data synth --out {p.parent}` first, or pass --corpus-file",
        )
    return p


@CORPORA.register("wiki18")
def _wiki18_corpus(wiki18_path: str | None = None, download: bool = False) -> Path:
    given = wiki18_path or os.environ.get(WIKI18_ENV)
    if given:
        p = Path(given).expanduser()
        if not p.is_file():
            raise NotFoundError(
                f"wiki-18 corpus not found at {p} (from {'config' if wiki18_path else WIKI18_ENV})",
                hint="point SR1_WIKI18 (or retrieval.wiki18_corpus) at wiki-18.jsonl or psgs_w100.tsv",
            )
        return p
    for cand in ("wiki-18.jsonl", "wiki-18.jsonl.gz", "psgs_w100.tsv", "psgs_w100.tsv.gz"):
        p = paths.corpora_dir() / "wiki18" / cand
        if p.is_file():
            return p
    if download:
        return _download_wiki18()
    raise NotFoundError(
        "no wiki-18 corpus configured",
        hint=(
            "pass --corpus-file PATH (wiki-18.jsonl or DPR psgs_w100.tsv), set SR1_WIKI18=PATH once, "
            f"or pass --download to fetch {WIKI18_HUB['repo_id']} from the hub (needs internet, ~14 GB)"
        ),
    )


def _download_wiki18() -> Path:
    """Fetch wiki-18 from the hub into ``$SR1_HOME/corpora/wiki18`` (needs internet)."""
    try:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(
            repo_type="dataset",
            local_dir=str(paths.corpora_dir() / "wiki18"),
            **WIKI18_HUB,
        )
    except Exception as e:  # offline, auth, disk: all need the same user action
        raise Sr1Error(
            f"could not download wiki-18 from {WIKI18_HUB['repo_id']}: {type(e).__name__}: {e}",
            hint="download it elsewhere and pass --corpus-file PATH (or set SR1_WIKI18)",
        ) from None
    return Path(local)


def resolve_corpus(
    name: str,
    corpus_file: str | os.PathLike[str] | None = None,
    wiki18_path: str | None = None,
    download: bool = False,
) -> Path:
    """The corpus file an index called ``name`` is built from."""
    if corpus_file is not None:
        p = Path(corpus_file).expanduser()
        if not p.is_file():
            raise NotFoundError(f"corpus file not found: {p}", hint="check the --corpus-file path")
        return p.resolve()
    if name in CORPORA:
        return CORPORA.get(name)(wiki18_path=wiki18_path, download=download).resolve()
    p = paths.corpora_dir() / name / "corpus.jsonl"
    if p.is_file():
        return p.resolve()
    raise NotFoundError(
        f"no corpus known for index {name!r}",
        hint=f"pass --corpus-file PATH, or use one of: {', '.join(CORPORA.names())}",
    )
