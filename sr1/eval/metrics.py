"""Per-dataset summary metrics computed from per-example eval rows (what eval stores and report reads).

The summary is always recomputed from the stored rows, never accumulated in memory, so a
resumed eval and ``sr1 report`` see exactly the same numbers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sr1.data.datasets import BENCHMARKS, DATASETS

# Column order of the paper's Table 2; other datasets (synth, custom) follow alphabetically.
PAPER_ORDER: list[str] = list(BENCHMARKS)

# Metrics averaged over datasets for the "avg" entry (macro average, as in the paper).
AVERAGED = ("em", "cover_em", "f1", "answer_in_docs", "searches_mean")


def order_datasets(names: Iterable[str]) -> list[str]:
    """Paper order first, then any other dataset names alphabetically."""
    names = set(names)
    return [d for d in PAPER_ORDER if d in names] + sorted(names - set(PAPER_ORDER))


def hop_group(dataset: str, row: Mapping[str, Any] | None = None) -> str:
    """``single`` or ``multi`` for a row carrying ``hops``, else the dataset's registered kind
    (``single``, ``multi``, ``mixed`` for the synthetic world); ``unknown`` for others."""
    if row is not None and row.get("hops") is not None:
        try:
            return "single" if int(row["hops"]) <= 1 else "multi"
        except (TypeError, ValueError):
            pass
    return DATASETS.get(dataset).hops if dataset in DATASETS else "unknown"


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Summary of one dataset's per-example rows.

    Keys: ``n``, ``em`` (primary), ``cover_em``, ``f1``, ``well_formed``, ``answer_in_docs``
    (None when the method retrieves nothing), ``searches_mean``, ``searches_dist``
    (``{"0": count, "1": count, ...}``), ``response_tokens_mean``, ``generated_tokens_mean``,
    ``seconds_per_question``, ``finish_reasons``.
    """
    searches = [int(r.get("num_searches") or 0) for r in rows]
    dist = Counter(searches)
    return {
        "n": len(rows),
        "em": _mean([r.get("em") for r in rows]),
        "cover_em": _mean([r.get("cover_em") for r in rows]),
        "f1": _mean([r.get("f1") for r in rows]),
        "well_formed": _mean([r.get("well_formed") for r in rows]),
        "answer_in_docs": _mean([r.get("answer_in_docs") for r in rows]),
        "searches_mean": _mean(searches),
        "searches_dist": {str(k): dist[k] for k in sorted(dist)},
        "response_tokens_mean": _mean([r.get("response_tokens") for r in rows]),
        "generated_tokens_mean": _mean([r.get("generated_tokens") for r in rows]),
        "seconds_per_question": _mean([r.get("seconds") for r in rows]),
        "finish_reasons": dict(
            sorted(Counter(str(r.get("finish_reason", "")) for r in rows).items())
        ),
    }


def macro_average(per_dataset: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over datasets of the :data:`AVERAGED` metrics (the paper's Avg column)."""
    out: dict[str, Any] = {"datasets": len(per_dataset)}
    for key in AVERAGED:
        out[key] = _mean([m.get(key) for m in per_dataset.values()])
    return out
