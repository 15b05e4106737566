"""Render a report dict (``sr1.report.build.build_report``) as rich tables, markdown, CSV or JSON.

Markdown and the rich tables show 3 decimals (the paper's style); CSV and JSON carry full
precision. A registry maps each ``--format`` to its renderer.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Any

from sr1.registry import Registry

FORMATS: Registry[Callable[[dict[str, Any]], Any]] = Registry("report format")


def fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def fmt_delta(v: float | None) -> str:
    return "" if v is None else f"{v:+.3f}"


def _cell(row: dict[str, Any], d: str) -> str:
    v = row["avg"] if d == "avg" else row["values"].get(d)
    s = fmt(v)
    if row.get("delta") is not None and v is not None:
        dv = row["delta"].get(d)
        if dv is not None:
            s += f" ({fmt_delta(dv)})"
    return s


def _ci_cell(row: dict[str, Any], d: str) -> str:
    c = row["avg_ci"] if d == "avg" else row["ci"].get(d)
    return "-" if not c else f"[{c[0]:.3f}, {c[1]:.3f}]"


def _dist(dist: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in dist.items())


def sections(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report as (title, header, rows of strings) sections, shared by markdown and rich."""
    metric = report["metric"].upper()
    cols = [*report["datasets"], "avg"]
    out = []
    title = f"{metric} by dataset"
    if report.get("baseline"):
        title += f" (delta vs {report['baseline']})"
    out.append(
        (
            title,
            ["run", "run_id", *cols],
            [[r["label"], r["run_id"], *[_cell(r, d) for d in cols]] for r in report["rows"]],
        )
    )
    out.append(
        (
            f"{metric} 95% bootstrap intervals ({report['n_boot']} resamples, seed {report['seed']})",
            ["run", *cols],
            [[r["label"], *[_ci_cell(r, d) for d in cols]] for r in report["rows"]],
        )
    )
    if report["search_by_dataset"]:
        out.append(
            (
                "Search behaviour by dataset",
                [
                    "run",
                    "dataset",
                    "hops",
                    "n",
                    "searches",
                    "distribution",
                    "ans-in-docs",
                    "well-formed",
                ],
                [
                    [
                        s["label"],
                        s["dataset"],
                        s["hops"],
                        str(s["n"]),
                        fmt(s["searches_mean"], 2),
                        _dist(s["searches_dist"]),
                        fmt(s["answer_in_docs"]),
                        fmt(s["well_formed"]),
                    ]
                    for s in report["search_by_dataset"]
                ],
            )
        )
    if report["search_by_hops"]:
        m = report["metric"]
        out.append(
            (
                "Single- vs multi-hop (pooled over examples)",
                ["run", "group", "n", metric, "searches", "ans-in-docs"],
                [
                    [
                        s["label"],
                        s["group"],
                        str(s["n"]),
                        fmt(s[m]),
                        fmt(s["searches_mean"], 2),
                        fmt(s["answer_in_docs"]),
                    ]
                    for s in report["search_by_hops"]
                ],
            )
        )
    c = report.get("compare")
    if c:
        rows = []
        for d, t in [*c["per_dataset"].items(), ("all", c["overall"])]:
            rows.append(
                [
                    d,
                    str(t["n"]),
                    fmt(t["mean_a"]),
                    fmt(t["mean_b"]),
                    fmt_delta(t["diff"]) or "-",
                    "-" if not t["ci"] else f"[{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}]",
                    "-" if t["p_value"] is None else f"{t['p_value']:.4f}",
                    str(t["b_better"]),
                    str(t["a_better"]),
                ]
            )
        out.append(
            (
                f"Paired comparison: B={c['b_label']} ({c['b']}) vs A={c['a_label']} ({c['a']}), "
                f"{c['shared_examples']} shared examples",
                ["dataset", "n", "A", "B", "B-A", "95% CI", "p (perm.)", "B better", "A better"],
                rows,
            )
        )
        out.append(
            (
                f"Flipped questions ({c['gained']} gained, {c['lost']} lost; "
                f"showing {len(c['flipped'])})",
                ["dataset", "id", "question", "gold", "A", "B", "flip"],
                [
                    [
                        f["dataset"],
                        f["example_id"],
                        str(f["question"] or ""),
                        " | ".join(f["golden_answers"] or []),
                        str(f["a_prediction"]),
                        str(f["b_prediction"]),
                        f["direction"],
                    ]
                    for f in c["flipped"]
                ],
            )
        )
    return out


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


@FORMATS.register("markdown")
def to_markdown(report: dict[str, Any]) -> str:
    parts = []
    for title, header, rows in sections(report):
        parts.append(f"### {title}\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "|".join("---" for _ in header) + "|")
        for r in rows:
            parts.append("| " + " | ".join(_md_escape(x) for x in r) + " |")
        parts.append("")
    for w in report.get("warnings", []):
        parts.append(f"> warning: {w}")
    for p in report.get("plots", []):
        parts.append(f"![{p}]({p})")
    return "\n".join(parts).rstrip() + "\n"


@FORMATS.register("csv")
def to_csv(report: dict[str, Any]) -> str:
    """The main table, wide: one line per run; value, CI and (with a baseline) delta columns."""
    ds = [*report["datasets"], "avg"]
    header = ["run_id", "label", "method", "model", "metric", *ds]
    header += [f"{d}_n" for d in report["datasets"]]
    header += [f"{d}_ci_lo" for d in ds] + [f"{d}_ci_hi" for d in ds]
    if report.get("baseline"):
        header += [f"{d}_delta" for d in ds]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)

    def num(v: float | None) -> str:
        return "" if v is None else repr(round(float(v), 6))

    for r in report["rows"]:
        vals = [r["values"].get(d) for d in report["datasets"]] + [r["avg"]]
        cis = [r["ci"].get(d) for d in report["datasets"]] + [r["avg_ci"]]
        line = [r["run_id"], r["label"], r["method"] or "", r["model"] or "", report["metric"]]
        line += [num(v) for v in vals]
        line += [str(r["n"].get(d, "")) for d in report["datasets"]]
        line += [num(c[0]) if c else "" for c in cis] + [num(c[1]) if c else "" for c in cis]
        if report.get("baseline"):
            line += [num((r["delta"] or {}).get(d)) for d in ds]
        w.writerow(line)
    return buf.getvalue()


@FORMATS.register("json")
def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=str, ensure_ascii=False) + "\n"


_WRAPPED = {"run", "question", "gold", "distribution"}


@FORMATS.register("table")
def to_rich(report: dict[str, Any]) -> list[Any]:
    """rich Table objects (the CLI prints them); warnings and plot paths as captions."""
    from rich.table import Table

    tables = []
    for title, header, rows in sections(report):
        t = Table(title=title, title_justify="left")
        for h in header:
            free = h in _WRAPPED
            t.add_column(h, overflow="fold", no_wrap=not free)
        for r in rows:
            t.add_row(*r)
        tables.append(t)
    if tables:
        notes = [f"warning: {w}" for w in report.get("warnings", [])]
        notes += [f"plot: {p}" for p in report.get("plots", [])]
        if notes:
            tables[-1].caption = "\n".join(notes)
    return tables


def render(report: dict[str, Any], fmt_name: str) -> Any:
    """Render with the named format (unknown names list the valid ones)."""
    return FORMATS.get(fmt_name)(report)
