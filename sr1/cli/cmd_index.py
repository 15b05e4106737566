"""`sr1 index build|list`: build named retrieval indices and list the built ones."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from sr1.cli.common import (
    CONFIG_HELP,
    JSON_HELP,
    SET_HELP,
    err_console,
    out_console,
    print_json,
    rich_progress,
)
from sr1.config import resolve_config

index_app = typer.Typer(
    help="Retrieval indices under $SR1_HOME/indices: build them, list them.", no_args_is_help=True
)


def _mb(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


@index_app.command("build")
def build_cmd(
    name: str = typer.Argument(
        ..., help="Index name: wiki18, synth, or any name given with --corpus-file."
    ),
    corpus_file: Path = typer.Option(
        None, "--corpus-file", help="Corpus: FlashRAG .jsonl or DPR psgs_w100 .tsv (.gz allowed)."
    ),
    retriever: str = typer.Option(None, "--retriever", help="bm25 or dense (default: bm25)."),
    encoder: str = typer.Option(
        None,
        "--encoder",
        help="Dense encoder: sentence-transformers name or path, or alias minilm / e5-base-v2.",
    ),
    faiss_index: str = typer.Option(None, "--faiss", help="Dense index type: flat or hnsw."),
    skip_bad_lines: bool = typer.Option(
        None,
        "--skip-bad-lines",
        help="Skip malformed or non-UTF-8 corpus lines (counted in the manifest).",
    ),
    download: bool = typer.Option(
        False,
        "--download",
        help="wiki18 only: fetch the corpus from the hub if no local copy is known.",
    ),
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Build (or rebuild) an index; the old one is replaced only when the new one is complete.

    Dense builds save embeddings chunk by chunk: rerun the same command after a crash to resume.
    """
    from sr1.retrieval.index import build_index

    cfg = resolve_config(
        config,
        set_,
        retrieval={
            "retriever": retriever,
            "encoder": encoder,
            "faiss_index": faiss_index,
            "skip_bad_lines": skip_bad_lines,
        },
    ).retrieval
    m = build_index(
        name,
        corpus_file=corpus_file,
        retriever=cfg.retriever,
        encoder=encoder or cfg.encoder,
        cfg=cfg,
        progress=rich_progress,
        download=download,
    )
    if json_out:
        print_json(m)
        return
    skipped = m["corpus"].get("skipped_lines", 0)
    undecodable = m["corpus"].get("skipped_undecodable", 0)
    err_console.print(
        f"[green]ok[/] index [bold]{name}[/] ({m['retriever']}): {m['passages']:,} passages "
        f"in {m['build_time_s']:.1f} s, {_mb(m['size_bytes'])} on disk, "
        f"peak RSS {m['peak_rss_mb']:,.0f} MiB"
        + (f", {skipped} malformed lines skipped" if skipped else "")
        + (f" ({undecodable} not UTF-8)" if undecodable else "")
        + f"\n   {m.get('path', '')}",
        highlight=False,
    )


@index_app.command("list")
def list_cmd(json_out: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List built indices with their corpus, size and build cost."""
    from sr1.retrieval.index import list_indices

    rows = list_indices()
    if json_out:
        print_json(rows)
        return
    t = Table(title="sr1 indices")
    for c in ("name", "retriever", "passages", "size", "build s", "peak RSS", "corpus", "built"):
        t.add_column(c)
    for m in rows:
        kind = m["retriever"]
        if kind == "dense":
            p = m.get("params", {})
            kind = f"dense ({p.get('faiss_index')}, {Path(str(p.get('encoder', ''))).name})"
        t.add_row(
            m["name"],
            kind,
            f"{m['passages']:,}",
            _mb(m.get("size_bytes")),
            f"{m.get('build_time_s', 0):.1f}",
            f"{m.get('peak_rss_mb', 0):,.0f} MiB",
            Path(m["corpus"]["path"]).name,
            str(m.get("created_at", ""))[:19],
        )
    if not rows:
        err_console.print(
            "no indices yet: build one with `sr1 index build NAME --corpus-file PATH`"
        )
    out_console.print(t)


def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")
