"""Dataset preparation: FlashRAG-format JSONL in, one parquet per split out, in one row schema.

Every prepared split is ``$SR1_HOME/data/<dataset>/<split>.parquet`` with the columns

* ``id`` (str, unique within the split), ``data_source`` (the dataset name; the reward and
  eval pick their scorer from it), ``question`` (as in the source, stripped),
  ``golden_answers`` (list[str]), ``split``,
* ``prompt``: the Search-R1 prompt rendered with the chosen template (``base`` by default:
  consumers that know their tokenizer re-render it with :func:`sr1.data.prompts.render_prompt`),
* ``metadata``: a JSON object (the source's ``metadata`` plus any other keys it had); rows
  returned by :func:`load_split` carry it decoded as a dict.

Rows with an empty question or no non-empty answer are dropped, counted and reported (never
silently); a duplicate id is an error naming both lines. ``manifest.json`` next to the
parquet files records each split's source file, its sha256, the template and the counts, so a
changed source is prepared again on the next :func:`load_split` with that source.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sr1 import paths
from sr1.data.datasets import (
    BENCHMARKS,
    DATASETS,
    HUB_REPO,
    TRAIN_MIX,
    default_source_dir,
    download_split,
    get_spec,
    source_file,
    source_splits,
)
from sr1.data.prompts import TEMPLATES, render_prompt
from sr1.errors import NotFoundError, Sr1Error
from sr1.io import atomic_path, iter_jsonl, write_json_atomic
from sr1.progress import ProgressFactory
from sr1.progress import resolve as resolve_progress

COLUMNS = ("id", "data_source", "question", "golden_answers", "split", "prompt", "metadata")
_CORE_KEYS = {"id", "question", "golden_answers", "metadata"}


def parquet_path(dataset: str, split: str) -> Path:
    """Where a prepared split lives: ``$SR1_HOME/data/<dataset>/<split>.parquet``.

    Both are names, never paths: ``--split ../../x`` is a ConfigError (:func:`paths.safe_name`).
    """
    d = paths.safe_name("dataset name", dataset)
    return paths.data_dir() / d / f"{paths.safe_name('split', split)}.parquet"


def _manifest_path(dataset: str) -> Path:
    return paths.data_dir() / paths.safe_name("dataset name", dataset) / "manifest.json"


def read_manifest(dataset: str) -> dict[str, Any]:
    """The per-split provenance of a prepared dataset (empty when nothing is prepared)."""
    p = _manifest_path(dataset)
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _answers(raw: Any) -> list[str]:
    if raw is None:
        return []
    items = [raw] if isinstance(raw, str | int | float) else list(raw)
    return [str(a).strip() for a in items if a is not None and str(a).strip()]


def read_source(
    path: Path, dataset: str, split: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows in the common schema (without ``prompt``) and the drop counts for one source file.

    Raises Sr1Error on malformed JSON or UTF-8 (file:line) and on duplicate ids (both lines
    named).
    """
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    stats: dict[str, Any] = {
        "read": 0,
        "dropped_empty_question": 0,
        "dropped_no_answers": 0,
        "dropped_ids": [],
    }
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise Sr1Error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        rid = str(obj["id"]) if obj.get("id") is not None else f"{split}_{stats['read']}"
        stats["read"] += 1
        if rid in seen:
            raise Sr1Error(
                f"{path}:{lineno}: duplicate id {rid!r} (first at line {seen[rid]})",
                hint="ids must be unique within a split; fix or deduplicate the source file",
            )
        seen[rid] = lineno
        question = str(obj.get("question") or "").strip()
        answers = _answers(obj.get("golden_answers", obj.get("answers")))
        if not question or not answers:
            stats["dropped_empty_question" if not question else "dropped_no_answers"] += 1
            if len(stats["dropped_ids"]) < 20:
                stats["dropped_ids"].append(rid)
            continue
        meta = dict(obj.get("metadata") or {}) if isinstance(obj.get("metadata"), dict) else {}
        meta.update({k: v for k, v in obj.items() if k not in _CORE_KEYS})
        rows.append(
            {
                "id": rid,
                "data_source": dataset,
                "question": question,
                "golden_answers": answers,
                "split": split,
                "metadata": meta,
            }
        )
    if stats["read"] == 0:
        raise Sr1Error(f"{path}: no rows", hint="the file is empty; check the source directory")
    return rows, stats


def write_split(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write rows in the common schema to parquet atomically (metadata stored as JSON text)."""
    import polars as pl

    schema = {
        "id": pl.Utf8,
        "data_source": pl.Utf8,
        "question": pl.Utf8,
        "golden_answers": pl.List(pl.Utf8),
        "split": pl.Utf8,
        "prompt": pl.Utf8,
        "metadata": pl.Utf8,
    }
    data = {c: [r[c] for r in rows] for c in COLUMNS}
    data["metadata"] = [
        json.dumps(m, ensure_ascii=False, sort_keys=True, default=str) for m in data["metadata"]
    ]
    df = pl.DataFrame(data, schema=schema)
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)


def read_split(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a prepared parquet file, ``metadata`` decoded to a dict."""
    import polars as pl

    df = pl.read_parquet(path, n_rows=limit)
    rows = df.to_dicts()
    for r in rows:
        m = r.get("metadata")
        r["metadata"] = json.loads(m) if isinstance(m, str) and m else (m or {})
        r["golden_answers"] = list(r.get("golden_answers") or [])
    return rows


def _plan(
    names: Sequence[str],
    source_dir: str | os.PathLike[str] | None,
    splits: Sequence[str] | None,
    download: bool,
) -> list[tuple[str, str, Path | None]]:
    """(dataset, split, local source or None = download) for every split to prepare."""
    plan: list[tuple[str, str, Path | None]] = []
    for name in names:
        spec = get_spec(name)
        src_dir = Path(source_dir).expanduser() if source_dir else None
        if src_dir is None and download:
            bad = [s for s in splits or () if s not in spec.splits]
            if not spec.on_hub or bad:
                raise NotFoundError(
                    f"{name} has no {', '.join(bad) or 'copy'} on the hub ({HUB_REPO})"
                    + (f"; its splits: {', '.join(spec.splits)}" if spec.on_hub else ""),
                    hint="run `sr1 data synth`" if name == "synth" else None,
                )
            plan += [(name, s, None) for s in (splits or spec.splits)]
            continue
        src_dir = src_dir or default_source_dir(name)
        if src_dir is None:
            hint = (
                "run `sr1 data synth` first"
                if name == "synth"
                else f"run `sr1 data prepare {name} --source-dir DIR` (DIR/{name}/<split>.jsonl "
                "in FlashRAG format), or add --download when online"
            )
            raise NotFoundError(f"no source for dataset {name!r}", hint=hint)
        if not src_dir.is_dir():
            raise NotFoundError(
                f"source directory not found: {src_dir}",
                hint=f"--source-dir must hold <dataset>/<split>.jsonl, e.g. {src_dir}/{name}/dev.jsonl",
            )
        want = list(splits) if splits else source_splits(src_dir, name)
        if not want:
            raise NotFoundError(
                f"no {name} split files under {src_dir / name}",
                hint=f"expected FlashRAG-format files such as {src_dir / name / 'dev.jsonl'} "
                f"(splits of the full set: {', '.join(spec.splits)})",
            )
        plan += [(name, s, source_file(src_dir, name, s)) for s in want]
    return plan


def prepare(
    datasets: list[str] | None,
    all_datasets: bool = False,
    source_dir: str | os.PathLike[str] | None = None,
    template: str = "base",
    splits: list[str] | None = None,
    progress: ProgressFactory | None = None,
    download: bool = False,
    tokenizer: Any = None,
) -> dict[str, dict]:
    """Prepare datasets into ``$SR1_HOME/data/<dataset>/<split>.parquet``; return the counts.

    ``datasets`` are registry names (``all_datasets`` adds the seven benchmarks). Sources:
    ``source_dir`` (``<dir>/<dataset>/<split>.jsonl``); else, with ``download``, the hub's
    FlashRAG collection; else the shared samples (``synth``: the synthetic world).
    ``splits`` defaults to every split file found. ``template`` names a prompt template
    (``instruct``/``auto`` need ``tokenizer``). Returns ``{dataset: {split: counts}}`` where
    counts has ``rows`` (written), ``read``, ``dropped_empty_question``,
    ``dropped_no_answers``, ``path`` and ``source``. ``progress`` reports splits prepared
    (:mod:`sr1.progress`; None: silent).
    """
    names = list(dict.fromkeys([*(datasets or []), *(BENCHMARKS if all_datasets else ())]))
    if not names:
        raise Sr1Error(
            "no dataset named",
            hint=f"name datasets ({', '.join(DATASETS.names())}) or pass --all-datasets",
        )
    for n in names:
        get_spec(n)
    TEMPLATES.get(template)
    if template == "instruct":
        render_prompt("x", template=template, tokenizer=tokenizer)  # fail before any work
    plan = _plan(names, source_dir, splits, download)
    out: dict[str, dict] = {}
    with resolve_progress(progress)("preparing", len(plan)) as advance:
        for name, split, src in plan:
            advance(0, description=f"{name}/{split}")
            if src is None:
                src = download_split(name, split)
            rows, stats = read_source(src, name, split)
            for r in rows:
                r["prompt"] = render_prompt(r["question"], "search", template, tokenizer)
            dest = parquet_path(name, split)
            write_split(rows, dest)
            counts = {
                "rows": len(rows),
                "read": stats["read"],
                "dropped_empty_question": stats["dropped_empty_question"],
                "dropped_no_answers": stats["dropped_no_answers"],
                "path": str(dest),
                "source": str(src),
            }
            if stats["dropped_ids"]:
                dropped = stats["dropped_empty_question"] + stats["dropped_no_answers"]
                print(
                    f"warning: {name}/{split}: dropped {dropped} of {stats['read']} rows "
                    f"({stats['dropped_empty_question']} empty question, "
                    f"{stats['dropped_no_answers']} no answers), e.g. ids "
                    f"{', '.join(stats['dropped_ids'][:5])}",
                    file=sys.stderr,
                )
            manifest = read_manifest(name)
            manifest[split] = {
                **counts,
                "source_sha256": _sha256(src),
                "template": template,
                "tokenizer": getattr(tokenizer, "name_or_path", None) if tokenizer else None,
                "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            write_json_atomic(_manifest_path(name), manifest)
            out.setdefault(name, {})[split] = counts
            advance(1)
    return out


def _is_fresh(dataset: str, split: str, src: Path) -> bool:
    entry = read_manifest(dataset).get(split)
    return (
        parquet_path(dataset, split).is_file()
        and entry is not None
        and entry.get("source") == str(src)
        and entry.get("source_sha256") == _sha256(src)
    )


def load_split(
    dataset: str,
    split: str,
    source_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Rows of one split in the common schema (``metadata`` as a dict), first ``limit`` only.

    With ``source_dir`` the split is (re)prepared from ``<source_dir>/<dataset>/<split>.jsonl``
    unless the parquet already comes from that exact file. Without it the prepared parquet is
    read; when it is missing, the split is prepared on the fly from the shared samples (or the
    synthetic world for ``synth``). Otherwise NotFoundError says how to prepare it.
    """
    get_spec(dataset)
    target = parquet_path(dataset, split)
    if source_dir is not None:
        src = source_file(source_dir, dataset, split)
        if not _is_fresh(dataset, split, src):
            prepare([dataset], source_dir=source_dir, splits=[split], progress=False)
    elif not target.is_file():
        d = default_source_dir(dataset)
        if d is not None and (d / dataset / f"{split}.jsonl").is_file():
            prepare([dataset], source_dir=d, splits=[split], progress=False)
        else:
            have = available_splits(dataset)
            raise NotFoundError(
                f"dataset {dataset!r} split {split!r} is not prepared ({target} is missing)"
                + (f"; available splits: {', '.join(have)}" if have else ""),
                hint=(
                    "run `sr1 data synth` first"
                    if dataset == "synth"
                    else f"run `sr1 data prepare {dataset} --source-dir DIR` "
                    f"(DIR/{dataset}/{split}.jsonl in FlashRAG format)"
                ),
            )
    return read_split(target, limit)


def available_splits(dataset: str, source_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Splits that :func:`load_split` can serve now: prepared ones and those with a source file."""
    get_spec(dataset)
    d = paths.data_dir() / dataset
    have = {p.stem for p in d.glob("*.parquet")} if d.is_dir() else set()
    src = Path(source_dir) if source_dir else default_source_dir(dataset)
    if src is not None:
        have.update(source_splits(src, dataset))
    order = ["train", "dev", "test"]
    return [s for s in order if s in have] + sorted(have - set(order))


def resolve_eval_split(
    dataset: str, requested: str = "test", source_dir: str | os.PathLike[str] | None = None
) -> str:
    """The split to evaluate: ``requested``, except that ``test`` falls back to ``dev`` where the
    set has no test split (the paper's selection: NQ/TriviaQA/PopQA/Bamboogle test,
    HotpotQA/2Wiki/MuSiQue dev). Local data decides first (the shared samples have dev only):
    with ``source_dir`` only its files count (that is where :func:`load_split` reads from),
    without it the prepared splits and the default source's files."""
    spec = get_spec(dataset)
    if requested != "test":
        return requested
    have = (
        source_splits(source_dir, dataset) if source_dir is not None else available_splits(dataset)
    )
    if "test" in have:
        return "test"
    if "dev" in have:
        return "dev"
    return spec.eval_split


def train_mix(
    datasets: Iterable[str] = TRAIN_MIX,
    source_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    split: str = "train",
) -> list[dict[str, Any]]:
    """The Search-R1 training mix: the ``train`` splits of ``datasets`` (NQ + HotpotQA) together.

    Rows keep their ``data_source``. ``shuffle`` interleaves the sets deterministically (seeded)
    so ``limit`` keeps a mix; ids that collide across sets are prefixed ``<dataset>/``.
    """
    names = list(datasets)
    parts = [load_split(n, split, source_dir=source_dir) for n in names]
    rows = [r for part in parts for r in part]
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        for r in rows:
            r["id"] = f"{r['data_source']}/{r['id']}"
    if shuffle:
        random.Random(seed).shuffle(rows)
    return rows[:limit] if limit is not None else rows


def list_datasets() -> list[dict[str, Any]]:
    """Every registered dataset: hops, full-release splits, eval split, what is prepared here."""
    import polars as pl

    out = []
    for name in [*BENCHMARKS, *(n for n in DATASETS.names() if n not in BENCHMARKS)]:
        spec = get_spec(name)
        d = paths.data_dir() / name
        prepared = (
            {
                p.stem: int(pl.scan_parquet(p).select(pl.len()).collect().item())
                for p in sorted(d.glob("*.parquet"))
            }
            if d.is_dir()
            else {}
        )
        src = default_source_dir(name)
        out.append(
            {
                "name": name,
                "hops": spec.hops,
                "splits": list(spec.splits),
                "eval_split": spec.eval_split,
                "prepared": prepared,
                "local_source": str(src / name) if src else None,
                "local_splits": source_splits(src, name) if src else [],
                "description": spec.description,
            }
        )
    return out
