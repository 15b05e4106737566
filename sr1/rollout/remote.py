"""The Engine protocol over HTTP: a client for ``sr1 serve engine`` and the weight channels.

:class:`RemoteEngine` is what ``rollout.engine_url`` (a server someone started) and
``rollout.placement=process`` (a child process sr1 starts) give the rollout loop, trainer and
eval. Requests (see :mod:`sr1.rollout.server`):

- ``POST /generate`` ``{"prompts": [[ids]], "max_new_tokens": n | [n, ...], "stop": [...],
  "temperature", "top_p", "seed"}`` -> ``{"outputs": [{"token_ids", "logprobs",
  "finish_reason", "stop_str"}], "version"}``: today's :class:`~sr1.rollout.engines.GenOutput`
  plus the policy version that sampled them. Floats travel as JSON's shortest round-trip
  repr, so log-probs arrive bit for bit.
- ``POST /weights``: new weights and their version, as a safetensors file by path (same host:
  ``rollout.weight_sync=shm``; the file is written to ``/dev/shm``, or the temp dir when that
  is missing or too small, the server loads it memory-mapped and deletes it) or as the same
  safetensors bytes in the body (another host: ``weight_sync=http``). ``auto`` picks shm when
  the server's ``/health`` reports this machine (same boot id, pid namespace and host name).
- ``weight_sync=nccl``: vLLM's own NCCL weight transfer (``NCCLTrainerWeightTransferEngine``
  driving the server's vLLM-compatible routes with vLLM's ``HTTPVLLMWeightSyncClient``).
  GPU only, and **not tested here** (this project's machines have no GPU).

Failures are :class:`EngineError` (one line: which server, which request, what it said);
an engine *process* sr1 started that died is :class:`EngineDied` (its exit code and the last
lines of its log).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sr1.config import RolloutConfig
from sr1.errors import Sr1Error
from sr1.rollout.engines import GenOutput

if TYPE_CHECKING:  # pragma: no cover
    from sr1.rollout.placement import EngineProcess

WEIGHTS_PREFIX = "sr1-weights-"  # the only files a server deletes after loading them
SHM = Path("/dev/shm")


class EngineError(Sr1Error):
    """The engine server failed a request or cannot be reached."""


class EngineDied(EngineError):
    """The engine process sr1 started has exited (``exit_code``, ``log_tail``)."""

    def __init__(self, message: str, exit_code: int | None, log_tail: str) -> None:
        super().__init__(message)
        self.exit_code, self.log_tail = exit_code, log_tail


def _reason(e: Exception) -> str:
    """A connection failure in a few words."""
    text = str(e)
    for key in (
        "Connection refused",
        "Connection reset",
        "Connection aborted",
        "Remote end closed connection",
        "Name or service not known",
        "No route to host",
    ):
        if key in text:
            return key.lower()
    return text[:200]


def host_key() -> str:
    """What identifies this machine *and* its /dev/shm: boot id, pid namespace, host name."""
    parts = []
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    parts.append(socket.gethostname())
    return "/".join(parts)


# -- the weight channels (client side) ------------------------------------------------------------
def _cpu_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Name -> contiguous CPU tensor (no copy for CPU tensors that are contiguous already)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in named_tensors:
        full = getattr(t, "full_tensor", None)  # an FSDP DTensor shard: gather it
        t = full() if callable(full) else t
        out[name] = t.detach().to("cpu").contiguous()
    return out


def weights_dir(nbytes: int) -> Path:
    """``/dev/shm`` when it exists, is writable and has room for ``nbytes`` (+10%), else the
    temp dir (a real disk: slower, but a full /dev/shm must not kill the run)."""
    need = int(nbytes * 1.1) + (1 << 20)
    if SHM.is_dir() and os.access(SHM, os.W_OK):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(SHM).free > need:
                return SHM
    return Path(tempfile.gettempdir())


def write_weights_file(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Path:
    """The tensors as one safetensors file under :func:`weights_dir`, written atomically."""
    from safetensors.torch import save_file

    tensors = _cpu_tensors(named_tensors)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    d = weights_dir(nbytes)
    name = f"{WEIGHTS_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp, path = d / f".{name}.tmp", d / f"{name}.safetensors"
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path


def weights_bytes(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """The tensors as the bytes of a safetensors file (for a server on another host)."""
    from safetensors.torch import save

    return save(_cpu_tensors(named_tensors))


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files holding a transformers checkpoint's weights."""
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise Sr1Error(
            f"{d} has no *.safetensors weights to send to the engine server",
            hint="save the model with save_pretrained (safetensors), or start the server "
            "with this model (`sr1 serve engine --model PATH`)",
        )
    return files


def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every tensor in the files, each file memory-mapped while read."""
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield k, st.get_tensor(k)


# -- the client ---------------------------------------------------------------------------------
class RemoteEngine:
    """An :class:`~sr1.rollout.engines.Engine` whose model runs in ``sr1 serve engine`` at ``url``.

    ``tokenizer`` is the local copy the rollout loop encodes and decodes with (it must be the
    server model's: the vocabulary sizes are checked). ``process``: the child process behind
    ``url`` when sr1 started it (placement=process), so a dead server is reported as such.
    ``version`` follows the server (every generate reports the version that sampled).
    """

    def __init__(
        self,
        url: str,
        tokenizer: Any,
        cfg: RolloutConfig | None = None,
        process: EngineProcess | None = None,
    ) -> None:
        import requests

        self.cfg = cfg or RolloutConfig()
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.process = process
        self._http = requests.Session()
        self._nccl: Any = None
        try:
            h = self.health()
        except EngineError as e:
            if process is not None:
                raise
            raise EngineError(
                f"no rollout engine server answers at {self.url} ({getattr(e, 'reason', e)})",
                hint="start one with `sr1 serve engine --model M --port P` and pass "
                "rollout.engine_url=http://HOST:P, or use rollout.placement=process",
            ) from None
        self.info = h
        self.version = int(h.get("version", 0))
        self._max_context = int(h["max_context"])
        vocab = h.get("vocab_size")
        if vocab is not None and int(vocab) != len(tokenizer):
            raise EngineError(
                f"the engine server at {self.url} serves {h.get('model')!r} with a vocabulary of "
                f"{vocab} tokens; this command's tokenizer has {len(tokenizer)}",
                hint="start the server with the same model family as --model",
            )
        self.same_host = h.get("host_key") == host_key()
        mode = self.cfg.weight_sync
        if mode == "auto":
            mode = "shm" if self.same_host else "http"
        if mode == "shm" and not self.same_host:
            raise EngineError(
                f"rollout.weight_sync=shm needs the engine server on this machine; {self.url} "
                "is on another host",
                hint="use rollout.weight_sync=http (or auto)",
            )
        self.weight_sync = mode

    # -- plumbing -------------------------------------------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        what: str,
        timeout: float | None = None,
        **kw: Any,
    ) -> dict[str, Any]:
        import requests

        t = self.cfg.engine_timeout_s if timeout is None else timeout
        try:
            r = self._http.request(method, self.url + path, timeout=(10.0, t), **kw)
        except requests.Timeout:
            raise EngineError(
                f"the engine server at {self.url} did not answer {what} within {t:.0f} s",
                hint="raise rollout.engine_timeout_s, or check the server's log",
            ) from None
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
            if self.process is not None:
                died = self.process.death(during=what)
                if died is not None:
                    raise died from None
            err = EngineError(
                f"the engine server at {self.url} stopped answering during {what} ({_reason(e)})",
                hint="check that `sr1 serve engine` is still running there",
            )
            err.reason = _reason(e)
            raise err from None
        try:
            body = r.json()
        except ValueError:
            body = {"error": r.text[:300]}
        if r.status_code >= 400:
            raise EngineError(
                f"the engine server at {self.url} answered {r.status_code} to {what}: "
                f"{body.get('error', body)}"
            )
        return body

    def health(self) -> dict[str, Any]:
        """``GET /health``: model, engine, version, max_context, vocab_size, host_key, pid."""
        return self._request("GET", "/health", "a health check", timeout=30.0)

    @property
    def max_context(self) -> int:
        return self._max_context

    # -- the Engine protocol --------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int | list[int],
        stop: list[str],
        temperature: float,
        top_p: float = 1.0,
        seed: int | list[int] | None = None,
    ) -> list[GenOutput]:
        if not prompts:
            return []
        req = {
            "prompts": [[int(t) for t in p] for p in prompts],
            "max_new_tokens": max_new_tokens
            if isinstance(max_new_tokens, int)
            else [int(m) for m in max_new_tokens],
            "stop": list(stop),
            "temperature": float(temperature),
            "top_p": float(top_p),
            "seed": seed if seed is None or isinstance(seed, int) else [int(s) for s in seed],
        }
        res = self._request("POST", "/generate", f"generate ({len(prompts)} prompts)", json=req)
        self.version = int(res["version"])
        outs = [
            GenOutput(
                [int(t) for t in o["token_ids"]],
                [float(x) for x in o["logprobs"]],
                str(o["finish_reason"]),
                o.get("stop_str"),
            )
            for o in res["outputs"]
        ]
        if len(outs) != len(prompts):
            raise EngineError(f"the engine server returned {len(outs)} outputs for {len(prompts)}")
        return outs

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Send the tensors by ``rollout.weight_sync`` (see the module docstring)."""
        what = f"a weight update (version {version})"
        if self.weight_sync == "nccl":
            self._nccl_send(named_tensors, int(version))
            return
        if self.weight_sync == "shm":
            path = write_weights_file(named_tensors)
            try:
                res = self._request(
                    "POST",
                    "/weights",
                    what,
                    json={"paths": [str(path)], "version": int(version), "delete": True},
                )
            finally:
                with contextlib.suppress(OSError):
                    path.unlink()  # the server deletes it; a failed request must not leak it
        else:
            res = self._request(
                "POST",
                "/weights",
                what,
                params={"version": int(version)},
                data=weights_bytes(named_tensors),
                headers={"Content-Type": "application/octet-stream"},
            )
        self.version = int(res["version"])

    def load_checkpoint(self, model_dir: str | Path, version: int = 0) -> None:
        """Make the server sample from a checkpoint folder's weights (eval, rollout): its own
        files by path on the same host (never deleted), else their tensors in the body."""
        files = checkpoint_files(model_dir)
        if self.weight_sync == "shm":
            req = {"paths": [str(f.resolve()) for f in files], "version": version, "delete": False}
            res = self._request("POST", "/weights", f"loading {model_dir}", json=req)
            self.version = int(res["version"])
        else:
            self.update_weights(iter_safetensors(files), version)

    def serves(self, model_dir: str | Path) -> bool:
        """Whether the server already samples from exactly ``model_dir``'s weights: it loaded
        that folder on this machine at start and never had weights pushed since."""
        h = self.health()
        return (
            self.same_host
            and not h.get("weights_updated", True)
            and str(Path(h.get("model_path", "")).resolve()) == str(Path(model_dir).resolve())
        )

    def close(self) -> None:
        if self._nccl is not None:
            with contextlib.suppress(Exception):
                self._nccl.shutdown()
            self._nccl = None
        self._http.close()

    # -- NCCL (vLLM's weight transfer engine) -----------------------------------------------------
    def _nccl_send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Broadcast the tensors over NCCL with vLLM's ``NCCLTrainerWeightTransferEngine``.

        UNTESTED: this project's machines have no GPU. It follows vLLM 0.32's own RL weight
        sync: the trainer (rank 0) and the server's workers (ranks 1..) form a
        ``StatelessProcessGroup`` + ``PyNcclCommunicator`` once (``/init_weight_transfer_engine``),
        then each update is ``/start_weight_update``, ``/update_weights`` (names, dtypes,
        shapes) concurrently with the broadcast, and ``/finish_weight_update`` (which carries
        the version). The tensors must be on this process's CUDA device.
        """
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        if self.info.get("weight_transfer") != "nccl":
            raise EngineError(
                f"rollout.weight_sync=nccl, but the engine server at {self.url} was not started "
                "with it",
                hint="start it with `sr1 serve engine --engine vllm --set "
                "rollout.weight_sync=nccl` (GPU only)",
            )
        pairs = [(n, t.detach().contiguous()) for n, t in named_tensors]

        class _Pairs(WeightSource):
            def __init__(self) -> None:
                self.pairs: list[tuple[str, torch.Tensor]] = []

            def metadata(self) -> list[Any]:
                return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.pairs]

            def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
                return iter(self.pairs)

        outer = self

        class _Client(HTTPVLLMWeightSyncClient):
            version = 0

            def finish_weight_update(self, weight_version: str | None = None) -> None:
                super().finish_weight_update(str(self.version))
                outer.version = int(self.version)

        if self._nccl is None:
            host = os.environ.get("SR1_NCCL_MASTER_ADDR") or socket.gethostbyname(
                socket.gethostname()
            )
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
            world = 1 + int(self.info.get("world_size", 1))
            client = _Client(self.url, timeout=self.cfg.engine_timeout_s)
            info = NCCLTrainerInitInfo(host, port, world, rank=0)
            self._nccl = NCCLTrainerWeightTransferEngine.trainer_init(
                info, client=client, source=_Pairs()
            )
        self._nccl.source.pairs = pairs
        self._nccl.client.version = version
        try:
            self._nccl.send_weights()
        finally:
            self._nccl.source.pairs = []
