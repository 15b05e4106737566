"""Crash-safe file writing and JSON-lines helpers shared by every stage."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it is renamed over ``path`` atomically.

    A crash mid-write leaves the old file (or no file), never a half-written one.
    Works for files and directories (the directory case renames a fresh temp dir).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.unlink()
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        if tmp_path.is_dir():
            import shutil

            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists():
            tmp_path.unlink()
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl_atomic(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def _gzip_error(path: Path, lines_read: int, e: BaseException) -> tuple[str, str]:
    """Message and hint for a ``.gz`` file that cannot be decompressed past ``lines_read``."""
    at = f"{path}:{lines_read + 1}"
    if isinstance(e, gzip.BadGzipFile) and lines_read == 0 and "Not a gzipped file" in str(e):
        return (
            f"{at}: not a gzip file, although the name ends in .gz",
            "rename it without .gz if it is plain text, or compress it with gzip",
        )
    damaged = "the file is damaged or was not copied completely: download or compress it again"
    if isinstance(e, EOFError):
        return (
            f"{at}: truncated gzip file: the compressed data ends before its end marker "
            f"(after {lines_read} complete lines)",
            damaged,
        )
    return f"{at}: corrupt gzip data ({e}) after {lines_read} complete lines", damaged


def iter_text_lines(
    path: str | os.PathLike[str],
    on_bad: Callable[[int, str], None] | None = None,
) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for each line of a UTF-8 text file, line endings kept.

    A name ending in ``.gz`` is decompressed while reading. A line that is not valid UTF-8
    raises :class:`~sr1.errors.Sr1Error` naming ``file:line``, unless ``on_bad`` is given:
    then ``on_bad(lineno, why)`` is called (it may raise) and the line is skipped. A ``.gz``
    file that is not gzip, is cut short or is corrupt always raises, naming the file and the
    line reached. A UTF-8 byte-order mark at the start is dropped.
    """
    from sr1.errors import Sr1Error

    p = Path(path)
    gz = p.name.lower().endswith(".gz")
    lineno = 0
    with gzip.open(p, "rb") if gz else open(p, "rb") as f:
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (EOFError, zlib.error, gzip.BadGzipFile) as e:
                msg, hint = _gzip_error(p, lineno, e)
                raise Sr1Error(msg, hint=hint) from None
            lineno += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if lineno == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                    why = "not UTF-8: the file starts with a UTF-16 byte-order mark; convert it"
                elif lineno == 1 and raw.startswith(b"\x1f\x8b"):
                    why = "not text: gzip-compressed data in a file not named .gz; rename it"
                else:
                    why = (
                        f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of "
                        "the line); convert the file to UTF-8"
                    )
                if on_bad is None:
                    raise Sr1Error(f"{p}:{lineno}: {why}") from None
                on_bad(lineno, why)
                continue
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]
            yield lineno, text


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of a JSON-lines file (``.gz`` allowed);
    malformed JSON or UTF-8 raises with the file and line number."""
    from sr1.errors import Sr1Error

    for lineno, line in iter_text_lines(path):
        line = line.strip()
        if not line:
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise Sr1Error(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Stream JSON objects from a file; a malformed line raises with the file and line number."""
    for _, obj in iter_jsonl(path):
        yield obj
