"""Assemble a report from the DuckDB store: the paper-style table, intervals, deltas, search
behaviour, a paired comparison with flipped questions, and (optionally) training-curve plots.

The result is one JSON-able dict; ``sr1.report.render`` turns it into a rich table, markdown,
CSV or JSON. Numbers are recomputed from the per-example rows, so they match ``sr1 eval``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sr1.errors import Sr1Error
from sr1.eval.metrics import hop_group, order_datasets, summarize
from sr1.report.stats import bootstrap_ci, bootstrap_ci_of_average, paired_test
from sr1.tracking.store import Store

METRICS = ("em", "cover_em", "f1")
TRAIN_KINDS = ("train", "sft")
# Setup keys that must agree for numbers in one column to be comparable.
_COMPARABLE = ("split", "limit", "examples_hash", "template", "topk", "retriever", "sampling")


def _match_run(store: Store, run_id: str) -> dict[str, Any]:
    """A run by id or unique prefix; unknown ids raise NotFoundError listing recent runs."""
    found = store.find_runs(run_id)
    if run_id not in found and len(found) == 1:
        run_id = found[0]
    elif run_id not in found and len(found) > 1:
        raise Sr1Error(
            f"run id prefix {run_id!r} is ambiguous: {', '.join(sorted(found)[:10])}",
            hint="pass more of the id",
        )
    return store.get_run(run_id)


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _label(run: dict[str, Any], summaries: list[dict[str, Any]]) -> str:
    if run.get("name"):
        return str(run["name"])
    method = next((s["method"] for s in summaries if s.get("method")), None) or run["kind"]
    model = next((s["model"] for s in summaries if s.get("model")), None) or run.get("model") or "?"
    return f"{method} ({model})"


def _table_row(
    run: dict[str, Any],
    summaries: list[dict[str, Any]],
    examples: list[dict[str, Any]],
    metric: str,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """One row of the main table: per-dataset value, n and bootstrap CI, plus Avg."""
    by_ds: dict[str, list[float]] = defaultdict(list)
    for e in examples:
        if e.get(metric) is not None:
            by_ds[e["dataset"]].append(float(e[metric]))
    values: dict[str, float | None] = {}
    ns: dict[str, int] = {}
    ci: dict[str, list[float] | None] = {}
    for d, xs in by_ds.items():
        values[d], ns[d] = _mean(xs), len(xs)
        c = bootstrap_ci(xs, n_boot=n_boot, seed=seed)
        ci[d] = list(c) if c else None
    for s in summaries:  # datasets summarised without stored rows (no CI possible)
        d = s["dataset"]
        if d not in values and s["metrics"].get(metric) is not None:
            values[d], ns[d], ci[d] = float(s["metrics"][metric]), int(s.get("n") or 0), None
    present = [v for v in values.values() if v is not None]
    avg = _mean(present)
    groups = [by_ds[d] for d in values if by_ds.get(d)]
    avg_ci = None
    if len(groups) == len(values) and groups:
        c = bootstrap_ci_of_average(groups, n_boot=n_boot, seed=seed)
        avg_ci = list(c) if c else None
    setup = summaries[0]["setup"] if summaries else {}
    return {
        "run_id": run["run_id"],
        "label": _label(run, summaries),
        "kind": run["kind"],
        "method": next((s["method"] for s in summaries if s.get("method")), None),
        "model": next((s["model"] for s in summaries if s.get("model")), None) or run.get("model"),
        "values": values,
        "n": ns,
        "ci": ci,
        "avg": avg,
        "avg_over": len(present),
        "avg_ci": avg_ci,
        "setup": {
            k: setup.get(k)
            for k in ("method", "split", "limit", "template", "topk", "index", "seed", "engine")
        }
        | {"retriever": setup.get("retriever"), "model": setup.get("model")},
    }


def _search_tables(
    rows: list[dict[str, Any]], examples: dict[str, list[dict[str, Any]]], metric: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Searches, answer-in-docs, EM and cover-EM by dataset, and pooled single- vs multi-hop
    groups."""
    by_dataset, by_hops = [], []
    for row in rows:
        exs = examples.get(row["run_id"], [])
        per_ds: dict[str, list[dict]] = defaultdict(list)
        per_hop: dict[str, list[dict]] = defaultdict(list)
        for e in exs:
            per_ds[e["dataset"]].append(e)
            per_hop[hop_group(e["dataset"], e)].append(e)
        for d in order_datasets(per_ds):
            s = summarize(per_ds[d])
            by_dataset.append(
                {
                    "run_id": row["run_id"],
                    "label": row["label"],
                    "dataset": d,
                    "hops": hop_group(d),
                    "n": s["n"],
                    "em": s["em"],
                    "cover_em": s["cover_em"],
                    "searches_mean": s["searches_mean"],
                    "searches_dist": s["searches_dist"],
                    "answer_in_docs": s["answer_in_docs"],
                    "well_formed": s["well_formed"],
                    "response_tokens_mean": s["response_tokens_mean"],
                }
            )
        for g in ("single", "multi", "unknown"):
            if not per_hop.get(g):
                continue
            s = summarize(per_hop[g])
            by_hops.append(
                {
                    "run_id": row["run_id"],
                    "label": row["label"],
                    "group": g,
                    "n": s["n"],
                    # the report's metric, and EM and cover-EM whatever it is
                    **{k: s[k] for k in dict.fromkeys((metric, "em", "cover_em"))},
                    "searches_mean": s["searches_mean"],
                    "answer_in_docs": s["answer_in_docs"],
                }
            )
    return by_dataset, by_hops


def _compare(
    a: dict[str, Any],
    b: dict[str, Any],
    ex_a: list[dict[str, Any]],
    ex_b: list[dict[str, Any]],
    metric: str,
    n_boot: int,
    seed: int,
    flips_limit: int,
) -> dict[str, Any]:
    """Paired test of B vs A on the examples both evaluated, per dataset and pooled."""
    ia = {(e["dataset"], e["example_id"]): e for e in ex_a if e.get(metric) is not None}
    ib = {(e["dataset"], e["example_id"]): e for e in ex_b if e.get(metric) is not None}
    shared = sorted(set(ia) & set(ib))
    per_ds: dict[str, Any] = {}
    for d in order_datasets({k[0] for k in shared}):
        keys = [k for k in shared if k[0] == d]
        per_ds[d] = paired_test(
            [ia[k][metric] for k in keys], [ib[k][metric] for k in keys], n_boot=n_boot, seed=seed
        )
    overall = paired_test(
        [ia[k][metric] for k in shared], [ib[k][metric] for k in shared], n_boot=n_boot, seed=seed
    )
    order = {d: i for i, d in enumerate(order_datasets({k[0] for k in shared}))}
    flipped = []
    for k in sorted(shared, key=lambda k: (order[k[0]], k[1])):
        va, vb = float(ia[k][metric]), float(ib[k][metric])
        if va == vb:
            continue
        flipped.append(
            {
                "dataset": k[0],
                "example_id": k[1],
                "question": ia[k].get("question"),
                "golden_answers": ia[k].get("golden_answers"),
                "a_prediction": ia[k].get("prediction"),
                "b_prediction": ib[k].get("prediction"),
                "a": va,
                "b": vb,
                "direction": "gained" if vb > va else "lost",
            }
        )
    return {
        "a": a["run_id"],
        "b": b["run_id"],
        "a_label": a["label"],
        "b_label": b["label"],
        "metric": metric,
        "shared_examples": len(shared),
        "only_a": len(set(ia) - set(ib)),
        "only_b": len(set(ib) - set(ia)),
        "per_dataset": per_ds,
        "overall": overall,
        "flipped_total": len(flipped),
        "gained": sum(f["direction"] == "gained" for f in flipped),
        "lost": sum(f["direction"] == "lost" for f in flipped),
        "flipped": flipped[:flips_limit],
    }


def _warnings(summaries_by_run: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Columns whose rows were produced under different setups (not directly comparable)."""
    per_ds: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    import json

    for sums in summaries_by_run.values():
        for s in sums:
            for k in _COMPARABLE:
                v = s["setup"].get(k)
                if v is not None:
                    per_ds[s["dataset"]][k].add(json.dumps(v, sort_keys=True, default=str))
    out = []
    for d in order_datasets(per_ds):
        diff = [k for k in _COMPARABLE if len(per_ds[d].get(k, ())) > 1]
        if diff:
            out.append(f"{d}: rows differ in {', '.join(diff)}; compare with care")
    return out


def build_report(
    run_ids: Sequence[str] | None = None,
    baseline: str | None = None,
    compare: tuple[str, str] | Sequence[str] | None = None,
    metric: str = "em",
    plots_dir: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    flips_limit: int = 50,
    attach_plots: bool = True,
    store: Store | None = None,
) -> dict[str, Any]:
    """The report over ``run_ids`` (default: every run with eval results, plus train runs).

    ``baseline``: a run id whose row the others are compared to (deltas). ``compare=(A, B)``:
    a paired test of B against A on shared examples and the questions that flipped.
    ``plots_dir``: write PNGs there (training curves, EM by dataset) and attach the curves to
    the training runs in MLflow. Run ids may be unique prefixes.
    """
    if metric not in METRICS:
        raise Sr1Error(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    store = store or Store()
    if run_ids:
        runs = [_match_run(store, r) for r in run_ids]
    else:
        with_evals = {s["run_id"] for s in store.eval_summaries()}
        runs = [
            r
            for r in store.list_runs()
            if r["kind"] == "eval" or r["run_id"] in with_evals or r["kind"] in TRAIN_KINDS
        ]
    extra_ids = [baseline] if baseline else []
    extra_ids += list(compare or [])
    known = {r["run_id"] for r in runs}
    for rid in extra_ids:
        r = _match_run(store, rid)
        if r["run_id"] not in known:
            runs.append(r)
            known.add(r["run_id"])
    runs = list({r["run_id"]: r for r in runs}.values())

    ids = [r["run_id"] for r in runs]
    summaries_by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in store.eval_summaries(ids) if ids else []:
        summaries_by_run[s["run_id"]].append(s)
    examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in store.eval_results(ids) if ids else []:
        examples[e["run_id"]].append(e)

    table_runs = [r for r in runs if summaries_by_run.get(r["run_id"]) or examples.get(r["run_id"])]
    rows = [
        _table_row(r, summaries_by_run[r["run_id"]], examples[r["run_id"]], metric, n_boot, seed)
        for r in table_runs
    ]
    datasets = order_datasets({d for row in rows for d in row["values"]})

    by_id = {row["run_id"]: row for row in rows}

    def _resolve(rid: str) -> dict[str, Any]:
        full = _match_run(store, rid)["run_id"]
        if full not in by_id:
            raise Sr1Error(
                f"run {full!r} has no eval results to compare",
                hint="pass an eval run id (sr1 runs list --kind eval)",
            )
        return by_id[full]

    base_row = _resolve(baseline) if baseline else None
    for row in rows:
        row["delta"] = None
        if base_row is not None:
            delta = {
                d: row["values"][d] - base_row["values"][d]
                for d in datasets
                if row["values"].get(d) is not None and base_row["values"].get(d) is not None
            }
            same_cols = set(row["values"]) == set(base_row["values"])
            delta["avg"] = (
                row["avg"] - base_row["avg"]
                if same_cols and row["avg"] is not None and base_row["avg"] is not None
                else None
            )
            row["delta"] = delta

    search_by_dataset, search_by_hops = _search_tables(rows, examples, metric)
    comparison = None
    if compare:
        if len(compare) != 2:
            raise Sr1Error("--compare takes exactly two run ids: A B")
        ra, rb = _resolve(compare[0]), _resolve(compare[1])
        comparison = _compare(
            ra,
            rb,
            examples[ra["run_id"]],
            examples[rb["run_id"]],
            metric,
            n_boot,
            seed,
            flips_limit,
        )

    train_runs = [r for r in runs if r["kind"] in TRAIN_KINDS]
    parents = {r.get("parent_run") for r in table_runs if r.get("parent_run")}
    for pid in sorted(parents - {r["run_id"] for r in train_runs}):
        try:
            train_runs.append(store.get_run(pid))
        except Sr1Error:
            continue
    report: dict[str, Any] = {
        "metric": metric,
        "datasets": datasets,
        "rows": rows,
        "baseline": base_row["run_id"] if base_row else None,
        "n_boot": n_boot,
        "seed": seed,
        "search_by_dataset": search_by_dataset,
        "search_by_hops": search_by_hops,
        "compare": comparison,
        "train_runs": [r["run_id"] for r in train_runs],
        "warnings": _warnings({r["run_id"]: summaries_by_run[r["run_id"]] for r in table_runs}),
        "plots": [],
    }
    if plots_dir is not None:
        from sr1.report.plots import write_plots

        report["plots"] = write_plots(report, train_runs, Path(plots_dir), store, attach_plots)
    return report
