"""``sr1 serve engine``: a long-running rollout engine (HF or vLLM) behind HTTP.

Routes (JSON unless said otherwise; errors are 4xx/5xx with ``{"error": "..."}``):

- ``GET /health`` -> ``{"status": "ok", "model", "model_path", "engine", "version",
  "max_context", "vocab_size", "weights_updated", "host_key", "pid", "weight_transfer",
  "world_size"}``.
- ``POST /generate`` ``{"prompts": [[int]], "max_new_tokens": int | [int], "stop": [str],
  "temperature": float, "top_p": float, "seed": int | [int] | null}`` -> ``{"outputs": [{"token_ids",
  "logprobs", "finish_reason", "stop_str"}], "version"}`` (one output per prompt, in order:
  :class:`~sr1.rollout.engines.GenOutput` as the engines return it in-process).
- ``POST /weights``: ``{"paths": [FILE.safetensors, ...], "version": N, "delete": bool}``
  (files on this machine, loaded memory-mapped; with ``delete`` the server removes them after
  loading, only files named ``sr1-weights-*``) or the bytes of one safetensors file with
  ``Content-Type: application/octet-stream`` and ``?version=N``. Answers ``{"version",
  "tensors", "seconds"}``. Tensors are checkpoint names; a subset updates just those.
- vLLM's RL weight-transfer routes (``/init_weight_transfer_engine``, ``/start_weight_update``,
  ``/update_weights``, ``/finish_weight_update``, ``/shutdown_weight_transfer_engine``), same
  bodies as ``vllm serve``'s, when started with ``rollout.weight_sync=nccl`` (vLLM on GPUs;
  untested here, no GPU).

Every engine call (generate, a weight load) runs on one worker thread, in arrival order: the
engine is never used concurrently and a weight update never lands inside a generate. The event
loop stays free, so ``/health`` answers while a long batch runs. vLLM runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the weight reload reaches its model directly
(``reload_weights``, as in-process).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from sr1 import net
from sr1.errors import Sr1Error
from sr1.rollout.openmp import forget_registration, loaded_runtime
from sr1.rollout.remote import WEIGHTS_PREFIX, host_key, iter_safetensors

# How long the server keeps a client's idle connection open. Its clients (a trainer, an eval)
# go quiet between requests for a whole update, minutes on a large model, or frozen with the
# server (rollout.engine_pause); under uvicorn's default of 5 s the server closes the pooled
# connection meanwhile, and the next request races that close: "connection reset" (seen when
# both were continued after a freeze, whose expired timer fires at once). A day is past any
# update; the clients are few (one per trainer rank or eval).
KEEP_ALIVE_S = 24 * 3600


class BadRequest(Exception):
    """A client error: a 400 with ``{"error": message}``."""


def bind_socket(host: str, port: int) -> socket.socket:
    """:func:`sr1.net.bind_socket`, listening (the engine server accepts on it directly)."""
    sock = net.bind_socket(host, port)
    sock.listen(128)
    return sock


class _Worker:
    """One daemon thread running engine calls in order (a daemon: a stop never waits for a
    batch in flight)."""

    def __init__(self) -> None:
        self._q: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._loop, name="sr1-engine", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, fut, loop = self._q.get()
            try:
                res, err = fn(), None
            except BaseException as e:  # noqa: BLE001 - handed to the request that asked
                res, err = None, e
            loop.call_soon_threadsafe(_settle, fut, res, err)

    async def run(self, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._q.put((fn, fut, loop))
        return await fut


def _settle(fut: asyncio.Future[Any], res: Any, err: BaseException | None) -> None:
    if fut.done():  # the client went away
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(res)


def _int(v: Any, what: str, lo: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"{what} must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise BadRequest(f"{what} must be >= {lo}, got {v}")
    return v


def _float(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise BadRequest(f"{what} must be a finite number, got {v!r}")
    return float(v)


def parse_generate(body: Any) -> dict[str, Any]:
    """The keyword arguments of ``Engine.generate`` from a request body (BadRequest if bad)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    prompts = body.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, list) and p for p in prompts):
        raise BadRequest("prompts must be a list of non-empty lists of token ids")
    prompts = [[_int(t, "a token id", 0) for t in p] for p in prompts]
    m = body.get("max_new_tokens")
    if isinstance(m, list):
        if len(m) != len(prompts):
            raise BadRequest(f"{len(m)} max_new_tokens for {len(prompts)} prompts")
        m = [_int(x, "max_new_tokens", 1) for x in m]
    else:
        m = _int(m, "max_new_tokens", 1)
    stop = body.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop must be a list of non-empty strings")
    temperature = _float(body.get("temperature", 1.0), "temperature")
    top_p = _float(body.get("top_p", 1.0), "top_p")
    if temperature < 0 or not 0 < top_p <= 1:
        raise BadRequest("temperature must be >= 0 and top_p in (0, 1]")
    seed = body.get("seed")
    if isinstance(seed, list):
        if len(seed) != len(prompts):
            raise BadRequest(f"{len(seed)} seeds for {len(prompts)} prompts")
        seed = [_int(x, "seed", 0) for x in seed]
    elif seed is not None:
        seed = _int(seed, "seed", 0)
    return dict(
        prompts=prompts,
        max_new_tokens=m,
        stop=stop,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )


class EngineService:
    """The engine and what ``/health`` reports; every engine call goes through one worker."""

    def __init__(
        self,
        engine: Any,
        *,
        model: str,
        model_path: str,
        engine_name: str,
        weight_transfer: str | None = None,
    ) -> None:
        self.engine = engine
        self.model, self.model_path, self.engine_name = model, model_path, engine_name
        self.weight_transfer = weight_transfer
        self.weights_updated = False
        self.worker = _Worker()
        self._version_lock = threading.Lock()

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.model,
            "model_path": self.model_path,
            "engine": self.engine_name,
            "version": int(self.engine.version),
            "max_context": int(self.engine.max_context),
            "vocab_size": len(self.engine.tokenizer),
            "weights_updated": self.weights_updated,
            "host_key": host_key(),
            "pid": os.getpid(),
            "weight_transfer": self.weight_transfer,
            "world_size": 1,
            "openmp": loaded_runtime(),  # intel (libiomp5) / gnu (libgomp): see rollout.openmp
        }

    def generate(self, req: dict[str, Any]) -> dict[str, Any]:
        outs = self.engine.generate(**req)
        return {
            "outputs": [
                {
                    "token_ids": o.token_ids,
                    "logprobs": o.logprobs,
                    "finish_reason": o.finish_reason,
                    "stop_str": o.stop_str,
                }
                for o in outs
            ],
            "version": int(self.engine.version),
        }

    def load_files(self, paths: list[str], version: int, delete: bool) -> dict[str, Any]:
        files = [Path(p) for p in paths]
        for f in files:
            if f.suffix != ".safetensors" or not f.is_file():
                raise BadRequest(f"{f} is not a safetensors file on the server's machine")
        t0 = time.perf_counter()
        n = [0]

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            for kv in iter_safetensors(files):
                n[0] += 1
                yield kv

        try:
            self.engine.update_weights(counted(), version)
        finally:
            if delete:
                for f in files:
                    if f.name.startswith(WEIGHTS_PREFIX):
                        with contextlib.suppress(OSError):
                            f.unlink()
        self.weights_updated = True
        return {"version": version, "tensors": n[0], "seconds": time.perf_counter() - t0}

    def load_bytes(self, data: bytes, version: int) -> dict[str, Any]:
        from safetensors.torch import load

        t0 = time.perf_counter()
        try:
            tensors = load(data)
        except Exception as e:  # noqa: BLE001 - a malformed body is the client's error
            raise BadRequest(f"the body is not a safetensors file ({e})") from None
        self.engine.update_weights(iter(tensors.items()), version)
        self.weights_updated = True
        return {"version": version, "tensors": len(tensors), "seconds": time.perf_counter() - t0}

    # vLLM's weight-transfer lifecycle (NCCL on GPUs), as `vllm serve`'s RL routes do it.
    # UNTESTED here (no GPU). The engine is a VLLMEngine built with weight_transfer="nccl".
    def wt(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        llm = self.engine.llm
        if op == "init":
            llm.init_weight_transfer_engine({"init_info": payload.get("init_info", {})})
        elif op == "start":
            llm.start_weight_update()
        elif op == "update":
            llm.update_weights({"update_info": payload.get("update_info", {})})
        elif op == "finish":
            llm.finish_weight_update()
            self.engine._refresh_tied_head(self.engine._model_runner().model)
            llm.reset_prefix_cache()
            v = payload.get("weight_version")
            if v is not None:
                self.engine.version = int(v)
            self.weights_updated = True
        elif op == "shutdown":
            llm.shutdown_weight_transfer_engine()
        return {"message": f"weight transfer {op} done", "version": int(self.engine.version)}


def make_asgi(svc: EngineService) -> Any:
    """The Starlette app serving ``svc`` (routes in the module docstring)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse as _JSON
    from starlette.responses import Response
    from starlette.routing import Route

    class JSONResponse(_JSON):
        def render(self, content: Any) -> bytes:  # a -inf log-prob must not be a 500
            return json.dumps(content, separators=(",", ":")).encode()

    def err(status: int, msg: str) -> Response:
        return JSONResponse({"error": msg}, status_code=status)

    async def call(fn: Callable[[], Any]) -> Response:
        try:
            return JSONResponse(await svc.worker.run(fn))
        except BadRequest as e:
            return err(400, str(e))
        except Sr1Error as e:
            return err(422, str(e).splitlines()[0])
        except Exception as e:  # noqa: BLE001 - the server stays up; the client sees why
            return err(500, f"{type(e).__name__}: {e}")

    async def json_body(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except ValueError as e:
            raise BadRequest(f"the body is not JSON ({e})") from None

    async def health(request: Request) -> Response:
        return JSONResponse(svc.health())

    async def generate(request: Request) -> Response:
        try:
            req = parse_generate(await json_body(request))
        except BadRequest as e:
            return err(400, str(e))
        return await call(lambda: svc.generate(req))

    async def weights(request: Request) -> Response:
        try:
            if request.headers.get("content-type", "").startswith("application/octet-stream"):
                version = request.query_params.get("version")
                if version is None or not version.lstrip("-").isdigit():
                    raise BadRequest("a safetensors body needs ?version=N (an integer)")
                data = await request.body()
                return await call(lambda: svc.load_bytes(data, int(version)))
            body = await json_body(request)
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            paths = body.get("paths")
            if (
                not isinstance(paths, list)
                or not paths
                or not all(isinstance(p, str) for p in paths)
            ):
                raise BadRequest('"paths" must be a non-empty list of file paths')
            version = _int(body.get("version"), "version")
            delete = bool(body.get("delete", False))
        except BadRequest as e:
            return err(400, str(e))
        return await call(lambda: svc.load_files(paths, version, delete))

    def wt_route(op: str) -> Callable[[Request], Any]:
        async def handler(request: Request) -> Response:
            if svc.weight_transfer is None:
                return err(
                    400,
                    "this server was not started with vLLM weight transfer "
                    "(rollout.weight_sync=nccl)",
                )
            raw = await request.body()
            try:
                payload = json.loads(raw) if raw else {}
            except ValueError:
                return err(400, "the body is not JSON")
            if op == "update":  # blocks in the NCCL receive: must not wait behind a generate
                return JSONResponse(await asyncio.to_thread(svc.wt, op, payload))
            return await call(lambda: svc.wt(op, payload))

        return handler

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/weights", weights, methods=["POST"]),
    ]
    for path, op in (
        ("/init_weight_transfer_engine", "init"),
        ("/start_weight_update", "start"),
        ("/update_weights", "update"),
        ("/finish_weight_update", "finish"),
        ("/shutdown_weight_transfer_engine", "shutdown"),
    ):
        routes.append(Route(path, wt_route(op), methods=["POST"]))
    return Starlette(routes=routes)


def _exit_on_signal(signum: int, _frame: Any) -> None:
    """SIGTERM after uvicorn's shutdown, or SIGHUP (a closed terminal; the kernel's signal to
    an orphaned group that sr1 left frozen, ``EngineProcess.paused``): exit at once as the
    signal would (tearing down vLLM and torch took 1-3 s), minus what dying by a signal leaves
    behind: libiomp5's /dev/shm registration, which only its exit handler removes."""
    forget_registration(os.getpid())
    os._exit(128 + signum)


def serve(
    svc: EngineService,
    sock: socket.socket,
    ready_file: str | None = None,
    log_level: str = "warning",
) -> None:
    """Serve ``svc`` on the bound ``sock`` until SIGINT/SIGTERM. ``ready_file`` gets
    ``{"url", "pid"}`` once the engine is loaded (what ``placement=process`` waits for)."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    config = uvicorn.Config(
        make_asgi(svc),
        log_level=log_level,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=3,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    server = uvicorn.Server(config)
    # uvicorn shuts down on SIGTERM and then raises it again under the handler it found
    main = threading.current_thread() is threading.main_thread()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if main and signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _exit_on_signal)
    if ready_file:
        from sr1.io import write_json_atomic

        write_json_atomic(ready_file, {"url": url, "pid": os.getpid()})
    server.run(sockets=[sock])


def load_service(
    model: str,
    engine_name: str,
    cfg: Any,
    device: str = "auto",
    dtype: str = "auto",
) -> EngineService:
    """Load ``model`` into the named engine (vLLM in-process) and wrap it for serving."""
    from sr1 import models
    from sr1.rollout.engines import make_engine

    if engine_name == "vllm":
        # the weight reload needs vLLM's model in this process (sr1.rollout.engines._vllm_env)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    path = models.resolve(model)
    tok = models.load_tokenizer(path, cfg.model.revision)
    rc = cfg.rollout
    wt = "nccl" if rc.weight_sync == "nccl" else None
    if wt is not None and engine_name != "vllm":
        raise Sr1Error("rollout.weight_sync=nccl needs --engine vllm (vLLM's weight transfer)")
    if wt is not None:
        from sr1.rollout.engines import VLLMEngine

        engine = VLLMEngine(path, tok, rc, device=device, dtype=dtype, weight_transfer=wt)
    else:
        engine = make_engine(engine_name, path, tok, rc, device=device, dtype=dtype)
    return EngineService(
        engine, model=model, model_path=path, engine_name=engine_name, weight_transfer=wt
    )
