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
    `--index http://HOST:PORT/retrieve` in sr1 both work against it. Limits and timeouts are
    the retrieval.server_* settings (README: "The retrieval server"). Ctrl-C stops it.
    """
    from sr1.retrieval import open_retriever
    from sr1.retrieval.server import bind_socket, make_app, make_server

    cfg = resolve_config(config, set_, retrieval={"index": index}).retrieval
    sock = bind_socket(host, port)  # a taken port fails now, not after loading the index
    try:
        with err_console.status(f"loading index {cfg.index} ..."):
            retriever = open_retriever(cfg.index, cfg)
            retriever.search(["warm up"], 1)  # pays the numba JIT / encoder load before serving
        app = make_app(retriever, cfg)
        server = make_server(app, host, verbose=verbose, sock=sock)
    except BaseException:
        sock.close()
        raise
    cache = f"cache {cfg.server_cache_mb} MiB" if cfg.server_cache_mb else "no cache"
    err_console.print(
        f"[green]serving[/] {cfg.index} on {server.url}/retrieve (health: /health; "
        f"searches of up to {cfg.server_max_batch} queries, queries cut at "
        f"{cfg.server_max_query_chars} chars, {cache}, read timeout "
        f"{cfg.server_read_timeout_s:g} s, up to {cfg.server_max_connections} connections)",
        highlight=False,
    )
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
        err_console.print("stopped")


@serve_app.command("engine")
def engine_cmd(
    model: str = typer.Option(..., "--model", help="Model alias, hub id or local path."),
    engine: str = typer.Option(None, "--engine", help="vllm or hf (default: rollout.engine)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(8100, "--port", help="Port to bind (0 = any free port)."),
    device: str = typer.Option(None, "--device", help="Device (default: model.device)."),
    dtype: str = typer.Option(None, "--dtype", help="Dtype (default: model.dtype)."),
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
    ready_file: str = typer.Option(None, "--ready-file", hidden=True),
) -> None:
    """Serve a rollout engine: POST /generate (token ids in; token ids, sampled-token log-probs,
    finish reasons and the policy version out), POST /weights (new weights + version), GET
    /health.

    `sr1 train`, `sr1 eval` and `sr1 rollout` use it with `--set rollout.engine_url=http://HOST:PORT`
    (README: "Rollout placement"). vLLM runs inside this process, so weight reloads reach its
    model. Ctrl-C stops it.
    """
    from sr1.rollout.openmp import start_hint
    from sr1.rollout.server import bind_socket, load_service, serve

    cfg = resolve_config(
        config,
        set_,
        model={"name": model, "device": device, "dtype": dtype},
        rollout={"engine": engine},
    )
    sock = bind_socket(host, port)  # a taken port fails now, not after a minute of loading
    try:
        name = cfg.rollout.engine
        with err_console.status(f"loading {model} into the {name} engine ..."):
            svc = load_service(model, name, cfg, cfg.model.device, cfg.model.dtype)
        bound = sock.getsockname()[1]
        err_console.print(
            f"[green]serving[/] {model} ({name} engine, max context {svc.engine.max_context}, "
            f"OpenMP {svc.health()['openmp']}) on http://{host}:{bound} (health: /health)",
            highlight=False,
        )
        # a child sr1 started (ready file) already got what rollout.engine_openmp asked for
        hint = None if ready_file else start_hint(cfg.rollout.engine_openmp, name, cfg.model.device)
        if hint:
            err_console.print(hint, highlight=False)
        serve(svc, sock, ready_file)
    finally:
        sock.close()


def register(app: typer.Typer) -> None:
    app.add_typer(serve_app, name="serve")
