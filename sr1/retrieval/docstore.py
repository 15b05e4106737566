"""Passage storage next to an index: row number -> (id, contents), memory-mapped.

Two files: ``docs.bin`` (each record ``id NUL contents`` in UTF-8, concatenated) and
``docs.offsets.npy`` (uint64, ``N + 1`` record boundaries). Reading maps both, so a
21M-passage store costs page cache, not Python objects; writing streams.
"""

from __future__ import annotations

import mmap
import os
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from sr1.retrieval.base import Passage

DOCS = "docs.bin"
OFFSETS = "docs.offsets.npy"


class DocStoreWriter:
    """Append passages in index order; ``close()`` writes the offsets."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._f: BinaryIO = open(self.dir / DOCS, "wb")  # noqa: SIM115 - closed by close()
        self._offsets = array("Q", [0])  # compact: 8 bytes a passage, not a Python int each
        self._pos = 0

    def add(self, pid: str, contents: str) -> None:
        rec = pid.encode("utf-8") + b"\x00" + contents.encode("utf-8")
        self._f.write(rec)
        self._pos += len(rec)
        self._offsets.append(self._pos)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def close(self) -> None:
        self._f.close()
        np.save(self.dir / OFFSETS, np.frombuffer(self._offsets, dtype=np.uint64))


class DocStore:
    """Read-only, memory-mapped passages by row number."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        d = Path(directory)
        self.offsets = np.load(d / OFFSETS, mmap_mode="r")  # (N + 1,) uint64
        self._file = open(d / DOCS, "rb")  # noqa: SIM115 - lives as long as the store
        size = os.fstat(self._file.fileno()).st_size
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, row: int, score: float = 0.0) -> Passage:
        a, b = int(self.offsets[row]), int(self.offsets[row + 1])
        rec = self._mm[a:b]
        pid, _, contents = rec.partition(b"\x00")
        return Passage(id=pid.decode("utf-8"), contents=contents.decode("utf-8"), score=score)

    def get_many(self, rows: Sequence[int], scores: Sequence[float]) -> list[Passage]:
        return self.get_batch(np.asarray(rows)[None, :], np.asarray(scores)[None, :])[0]

    def get_batch(self, rows: np.ndarray, scores: np.ndarray) -> list[list[Passage]]:
        """Passages for a ``(Q, k)`` array of row numbers (-1 = none) and their ``(Q, k)`` scores."""
        rows = np.asarray(rows, dtype=np.int64)
        valid = rows >= 0
        safe = np.where(valid, rows, 0)
        # One vectorised gather of the offsets instead of 2*Q*k memmap scalar reads.
        starts = self.offsets[safe].tolist()
        ends = self.offsets[safe + 1].tolist()
        sc = np.asarray(scores, dtype=np.float64).tolist()
        ok = valid.tolist()
        mm = self._mm
        out = []
        for qs, qe, qsc, qok in zip(starts, ends, sc, ok, strict=True):
            row = []
            for a, b, s, v in zip(qs, qe, qsc, qok, strict=True):
                if v:
                    pid, _, contents = mm[a:b].partition(b"\x00")
                    row.append(Passage(pid.decode("utf-8"), contents.decode("utf-8"), s))
            out.append(row)
        return out

    def close(self) -> None:
        if isinstance(self._mm, mmap.mmap):
            self._mm.close()
        self._file.close()
