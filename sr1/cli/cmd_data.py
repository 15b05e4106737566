"""`sr1 data prepare|synth|list`: prepare QA benchmarks, build the synthetic world, list datasets."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from sr1.cli.common import JSON_HELP, err_console, out_console, print_json, rich_progress

data_app = typer.Typer(
    help="QA datasets: prepare the seven benchmarks, build the synthetic world, list them.",
    no_args_is_help=True,
)


@data_app.command("prepare")
def prepare_cmd(
    datasets: list[str] | None = typer.Argument(
        None,
        help="nq triviaqa popqa hotpotqa 2wikimultihopqa musique bamboogle (or synth).",
        show_default=False,
    ),
    all_datasets: bool = typer.Option(
        False, "--all-datasets", help="Prepare all seven Search-R1 benchmarks."
    ),
    source_dir: Path | None = typer.Option(
        None,
        "--source-dir",
        help="Directory of FlashRAG-format <dataset>/<split>.jsonl files "
        "(default: ../shared/data/qa when present; synth: the synthetic world).",
    ),
    template: str = typer.Option(
        "base",
        "--template",
        help="Prompt template of the stored prompt: base (raw Search-R1 text), instruct "
        "(the model's chat template; needs --model) or auto.",
    ),
    model: str | None = typer.Option(
        None, "--model", help="Model whose tokenizer renders --template instruct/auto."
    ),
    split: list[str] | None = typer.Option(
        None, "--split", help="Only these splits (repeatable); default: every split file found."
    ),
    download: bool = typer.Option(
        False,
        "--download",
        help="Fetch missing sets from the hub (RUC-NLPIR/FlashRAG_datasets); needs internet.",
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Write $SR1_HOME/data/<dataset>/<split>.parquet in the common row schema; print counts.

    Rows with an empty question or no answers are dropped and counted; duplicate ids stop
    the run with the file and lines named.
    """
    from sr1.data.prepare import prepare

    tokenizer = None
    if model is not None:
        from sr1.models import load_tokenizer

        tokenizer = load_tokenizer(model)
    counts = prepare(
        list(datasets or []),
        all_datasets=all_datasets,
        source_dir=source_dir,
        template=template,
        splits=list(split) if split else None,
        progress=None if json_out else rich_progress,
        download=download,
        tokenizer=tokenizer,
    )
    if json_out:
        print_json(counts)
        return
    t = Table(title=f"prepared (template {template})")
    for c in ("dataset", "split", "rows", "read", "empty question", "no answers", "path"):
        t.add_column(c, justify="right" if c in ("rows", "read") else "left")
    for name, per in counts.items():
        for s, c in per.items():
            t.add_row(
                name,
                s,
                str(c["rows"]),
                str(c["read"]),
                str(c["dropped_empty_question"]),
                str(c["dropped_no_answers"]),
                c["path"],
            )
    out_console.print(t)


@data_app.command("synth")
def synth_cmd(
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Output folder (default $SR1_HOME/corpora/synth, where `sr1 index build synth` "
        "looks for corpus.jsonl).",
    ),
    seed: int = typer.Option(0, "--seed", help="World seed: the same seed gives the same files."),
    n_entities: int = typer.Option(
        300, "--n-entities", help="People, companies, cities, rivers, countries in the world."
    ),
    n_train: int = typer.Option(
        800, "--n-train", help="Training questions at most (all not in dev/test if fewer)."
    ),
    n_dev: int = typer.Option(100, "--n-dev", help="Dev questions."),
    n_test: int = typer.Option(200, "--n-test", help="Test questions."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Build the fictional world: corpus.jsonl (wiki-18 format) and single-/two-hop QA splits.

    The QA is also prepared as dataset `synth` (sr1 eval --dataset synth, sr1 train).
    """
    from sr1.data.synth import synthesize

    with err_console.status("building the synthetic world ..."):
        stats = synthesize(
            out, seed=seed, n_entities=n_entities, n_train=n_train, n_dev=n_dev, n_test=n_test
        )
    if json_out:
        print_json(stats)
        return
    q, h = stats["questions"], stats["two_hop"]
    err_console.print(
        f"[green]ok[/] {stats['passages']} passages "
        f"({stats['passage_words']['mean']} words on average) -> {stats['corpus']}\n"
        f"   questions: "
        + ", ".join(f"{s} {q[s]} ({h[s]} two-hop)" for s in ("train", "dev", "test"))
        + f" -> {stats['qa_dir']}\n   next: sr1 index build synth"
        + ("" if out is None else f" --corpus-file {stats['corpus']}"),
        highlight=False,
    )


@data_app.command("list")
def list_cmd(json_out: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Registered datasets: hop type, splits, the eval split, and what is prepared here."""
    from sr1.data.prepare import list_datasets

    rows = list_datasets()
    if json_out:
        print_json(rows)
        return
    t = Table(title="sr1 datasets")
    for c in ("name", "hops", "splits", "eval split", "prepared", "local source"):
        t.add_column(c)
    for r in rows:
        prepared = ", ".join(f"{s} {n}" for s, n in r["prepared"].items()) or "-"
        local = ", ".join(r["local_splits"]) if r["local_splits"] else "-"
        t.add_row(r["name"], r["hops"], "/".join(r["splits"]), r["eval_split"], prepared, local)
    out_console.print(t)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
