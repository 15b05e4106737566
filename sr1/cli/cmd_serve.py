"""`sr1 serve retriever`: an HTTP server speaking Search-R1's /retrieve protocol over an index."""

from __future__ import annotations

from pathlib import Path

import typer

from sr1.cli.common import CONFIG_HELP, SET_HELP, err_console
from sr1.config import resolve_config

serve_app = typer.Typer(help="Long-running services.", no_args_is_help=True)


@serve_app.command("retriever")
def retriever_cmd(
    index: str = typer.Option(None, "--index", "-i", help="Index name (default: retrieval.index)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(8000, "--port", help="Port to bind (0 = any free port)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every request to stderr."),
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Serve POST /retrieve {"queries": [...], "topk": 3, "return_scores": true} and GET /health.

    Responses have Search-R1's shape, so Search-R1 training scripts (retriever.url) and
    `--index http://HOST:PORT/retrieve` in sr1 both work against it. Ctrl-C stops it.
    """
    from sr1.retrieval import open_retriever
    from sr1.retrieval.server import make_app, make_server

    cfg = resolve_config(config, set_, retrieval={"index": index}).retrieval
    with err_console.status(f"loading index {cfg.index} ..."):
        retriever = open_retriever(cfg.index, cfg)
        retriever.search(["warm up"], 1)  # pays the numba JIT / encoder load before serving
    app = make_app(retriever, cfg)
    server = make_server(app, host, port, verbose=verbose)
    err_console.print(
        f"[green]serving[/] {cfg.index} on http://{host}:{server.server_port}/retrieve "
        f"(health: /health; max batch {cfg.server_max_batch}, cache {cfg.server_cache_size})",
        highlight=False,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        err_console.print("stopping")
    finally:
        server.server_close()
        app.close()


def register(app: typer.Typer) -> None:
    app.add_typer(serve_app, name="serve")
