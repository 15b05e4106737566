"""`sr1 search`: query an index (or a remote /retrieve server) and show the top-k passages."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from sr1.cli.common import CONFIG_HELP, JSON_HELP, SET_HELP, out_console, print_json
from sr1.config import resolve_config


def register(app: typer.Typer) -> None:
    @app.command("search")
    def search_cmd(
        queries: list[str] = typer.Argument(..., help="One or more queries (batched together)."),
        index: str = typer.Option(
            None,
            "--index",
            "-i",
            help="Index name or http(s) /retrieve URL (default: retrieval.index).",
        ),
        k: int = typer.Option(None, "-k", "--topk", help="Passages per query (default 3)."),
        config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
        set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
        json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        """Search an index and print the top-k passages per query, best first.

        With --json, each result also has ``observation``: the exact text a rollout inserts
        between ``<information>`` and ``</information>`` (Search-R1's ``Doc i(Title: T) text``
        lines, title line as stored, stripped), before rollout.max_obs_length cuts it.
        """
        import time

        from sr1.errors import Sr1Error
        from sr1.retrieval import open_retriever
        from sr1.retrieval.base import format_passages

        cfg = resolve_config(config, set_, retrieval={"index": index, "topk": k}).retrieval
        if cfg.topk < 1:
            raise Sr1Error(f"-k must be at least 1, got {cfg.topk}")
        retriever = open_retriever(cfg.index, cfg)
        t0 = time.perf_counter()
        results = retriever.search(queries, cfg.topk)
        took = time.perf_counter() - t0
        if json_out:
            print_json(
                {
                    "index": cfg.index,
                    "k": cfg.topk,
                    "retriever": retriever.describe(),
                    "seconds": round(took, 6),
                    "results": [
                        {
                            "query": q,
                            # the exact text a rollout inserts between <information> tags
                            # (before the model's tokenizer cuts it to rollout.max_obs_length)
                            "observation": format_passages(ps),
                            "passages": [
                                {
                                    "id": p.id,
                                    "title": p.title,
                                    "contents": p.contents,
                                    "score": p.score,
                                }
                                for p in ps
                            ],
                        }
                        for q, ps in zip(queries, results, strict=True)
                    ],
                }
            )
            return
        for q, ps in zip(queries, results, strict=True):
            t = Table(title=f"{q}  [dim]({cfg.index}, top {cfg.topk}, {took * 1000:.1f} ms)[/]")
            for c, kw in (
                ("#", {}),
                ("score", {}),
                ("id", {}),
                ("title", {}),
                ("text", {"ratio": 1}),
            ):
                t.add_column(c, **kw)
            for i, p in enumerate(ps, 1):
                text = p.text if len(p.text) <= 240 else p.text[:237] + "..."
                t.add_row(str(i), f"{p.score:.3f}", p.id, p.title, text)
            out_console.print(t)
