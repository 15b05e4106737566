"""Experiment configuration: frozen dataclasses with help text, YAML files and ``--set`` overrides.

Precedence is defaults < YAML file (``experiments/*.yaml``) < ``--set section.key=value``.
Unknown keys are errors that list the valid keys. ``resolve_config`` returns the fully
resolved :class:`ExperimentConfig`; ``to_dict`` gives the form saved with every run.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sr1.errors import ConfigError, NotFoundError


def opt(
    default: Any,
    help: str,  # noqa: A002 - "help" mirrors argparse/TRL naming
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | str | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """A dataclass field with a default, help text and its valid values.

    ``ge``/``gt``/``le``/``lt`` bound numbers (NaN and infinities are never valid); ``choices``
    is a tuple of names or ``"module:REGISTRY"`` (the names of an ``sr1.registry.Registry``,
    imported only when a non-default value is checked); ``check(value)`` returns an error
    message or None. Every section validates itself on construction (``_Section``), so YAML,
    ``--set``, CLI flags and ``dataclasses.replace`` in code are all checked, once, before
    any work starts.
    """
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    meta["check"] = check
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _choices(spec: tuple[str, ...] | str) -> list[str]:
    if isinstance(spec, tuple):
        return list(spec)
    module, _, attr = spec.partition(":")
    return list(getattr(importlib.import_module(module), attr).names())


def valid_range(f: dataclasses.Field) -> str:
    """The valid values of a config field, in words (``--help`` and docs)."""
    m = f.metadata
    parts = []
    for key, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if m.get(key) is not None:
            parts.append(f"{sym} {m[key]:g}")
    spec = m.get("choices")
    if spec is not None:
        parts.append("one of " + ", ".join(spec) if isinstance(spec, tuple) else f"in {spec}")
    return " and ".join(parts)


_CMP = {
    "ge": lambda a, b: a >= b,
    "gt": lambda a, b: a > b,
    "le": lambda a, b: a <= b,
    "lt": lambda a, b: a < b,
}


def _field_error(f: dataclasses.Field, value: Any) -> str | None:
    """Why ``value`` is not valid for field ``f`` (None when it is)."""
    m = f.metadata
    if value is None:
        return None
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, float) and not math.isfinite(v):
            return "must be a finite number"
        if isinstance(v, int | float) and not isinstance(v, bool):
            for key, ok in _CMP.items():
                if m.get(key) is not None and not ok(v, m[key]):
                    return f"must be {valid_range(f)}"
        if m.get("choices") is not None and isinstance(v, str):
            names = _choices(m["choices"])
            if v not in names:
                return f"unknown value; valid: {', '.join(names)}"
    return m["check"](value) if m.get("check") is not None else None


class UnknownNameError(ConfigError, NotFoundError):
    """A config value that must name a registered thing (an engine, a reward…) names none."""


class _Section:
    """Validates every field of a config section when it is built (defaults are trusted:
    ``tests/foundation/test_config_values.py`` checks they are valid)."""

    def __post_init__(self) -> None:
        section = _SECTION_NAMES.get(type(self).__name__, type(self).__name__)
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value) or _is_default(f, value):
                continue
            err = _field_error(f, value)
            if err is not None:
                cls = UnknownNameError if err.startswith("unknown value") else ConfigError
                raise cls(
                    f"{section}.{f.name}={value!r}: {err}",
                    hint=f.metadata.get("help") or None,
                )


def _is_default(f: dataclasses.Field, value: Any) -> bool:
    if f.default is not dataclasses.MISSING:
        return bool(value == f.default) and type(value) is type(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return bool(value == f.default_factory())
    return False


def validate_defaults(cls: type) -> list[str]:
    """Errors of a section's own defaults (a test keeps this empty)."""
    errs = []
    for f in dataclasses.fields(cls):
        v = getattr(cls(), f.name)
        if not dataclasses.is_dataclass(v):
            err = _field_error(f, v)
            if err:
                errs.append(f"{cls.__name__}.{f.name}={v!r}: {err}")
    return errs


_DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu|npu)(:\d+)?)$")


def _device_check(value: str) -> str | None:
    if not _DEVICE.match(value):
        return "must be auto, cpu, mps, cuda or cuda:N (xpu and npu likewise)"
    return None


def _bm25_threads_check(value: int) -> str | None:
    return None if value == -1 or value >= 1 else "must be -1 (all cores) or >= 1"


@dataclass(frozen=True)
class ModelConfig(_Section):
    name: str = opt("smollm2-135m", "Model alias (sr1 model list), HF hub name, or local path.")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) for hub models.")
    dtype: str = opt(
        "auto",
        "auto (bf16 on GPUs with bf16 support; on CPU bf16 only where the CPU runs it "
        "natively, AMX-BF16 or AVX512-BF16, else fp32, and sr1 sft keeps the weights it trains "
        "in fp32; SR1_CPU_BF16=0/1 overrides the detection), float32, bfloat16, float16.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    device: str = opt("auto", "auto, cpu, cuda, cuda:N.", check=_device_check)
    trust_remote_code: bool = opt(False, "Pass trust_remote_code to transformers.")


@dataclass(frozen=True)
class DataConfig(_Section):
    train_datasets: list[str] = opt(
        ["nq", "hotpotqa"],
        "Datasets whose train split forms the training mix.",
        choices="sr1.data.datasets:DATASETS",
    )
    eval_datasets: list[str] = opt(
        ["nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle"],
        "Datasets evaluated by --all-datasets.",
        choices="sr1.data.datasets:DATASETS",
    )
    source_dir: str | None = opt(
        None, "Directory of FlashRAG-format <dataset>/<split>.jsonl files."
    )
    template: str = opt(
        "base",
        "Prompt template: base (raw Search-R1 prompt), instruct (chat template) or auto "
        "(chat template when the tokenizer has one, as Search-R1's trainer does).",
        choices="sr1.data.prompts:TEMPLATES",
    )
    search_prompt: str = opt(
        "search",
        "Prompt of the search method in sft, train, rollout and eval: search (the paper's, "
        "verbatim) or search_short (same tags and rules in under half the tokens; the CPU "
        "quickstart's choice). Recorded with every run.",
        choices="sr1.data.prompts:METHODS",
    )
    max_train_examples: int | None = opt(None, "Cap on training examples (None = all).", ge=1)
    seed: int = opt(0, "Seed for shuffling and sampling data.", ge=0)


@dataclass(frozen=True)
class RetrievalConfig(_Section):
    index: str = opt(
        "wiki18",
        "Index name (sr1 index list) or an http(s) URL of a /retrieve server; the benchmarks "
        "use wiki18 (build it with `sr1 index build wiki18 --corpus-file PATH`).",
    )
    retriever: str = opt("bm25", "bm25 or dense.", choices="sr1.retrieval.index:KINDS")
    topk: int = opt(3, "Passages returned per query.", ge=1, le=1000)
    encoder: str = opt("intfloat/e5-base-v2", "Dense encoder: sentence-transformers name or path.")
    query_prefix: str = opt("query: ", "Prefix added to queries for the dense encoder (e5 style).")
    passage_prefix: str = opt(
        "passage: ", "Prefix added to passages for the dense encoder (e5 style)."
    )
    faiss_index: str = opt(
        "flat", "faiss index type for dense retrieval: flat or hnsw.", choices=("flat", "hnsw")
    )
    encode_batch_size: int = opt(256, "Batch size for dense passage encoding.", ge=1)
    encode_max_length: int = opt(
        256, "Dense encoder token limit per passage/query (longer ones are cut).", ge=1
    )
    bm25_backend: str = opt(
        "auto",
        "bm25s backend: numba (about 50x faster per query, but a ~6 s JIT compile per process), "
        "numpy, or auto (numba from bm25_numba_min_passages passages up).",
        choices=("auto", "numba", "numpy"),
    )
    bm25_numba_min_passages: int = opt(
        100_000, "With bm25_backend=auto, indices this large use numba; smaller ones numpy.", ge=0
    )
    bm25_k1: float = opt(1.5, "BM25 k1 (term-frequency saturation).", ge=0)
    bm25_b: float = opt(0.75, "BM25 b (document-length normalisation).", ge=0, le=1)
    bm25_threads: int = opt(
        1,
        "Threads for one BM25 batch search (numba backend; -1 = all cores).",
        check=_bm25_threads_check,
    )
    hnsw_m: int = opt(32, "HNSW graph degree (faiss_index=hnsw).", ge=2)
    hnsw_ef_construction: int = opt(200, "HNSW efConstruction (build-time beam width).", ge=1)
    hnsw_ef_search: int = opt(128, "HNSW efSearch (query-time beam width).", ge=1)
    build_chunk: int = opt(
        8192,
        "Passages per build chunk (dense: embeddings saved per chunk, so a crash resumes).",
        ge=1,
    )
    skip_bad_lines: bool = opt(False, "Skip malformed corpus lines instead of stopping.")
    server_max_batch: int = opt(
        512,
        "Queries per search call inside the retrieval server: a request's queries are searched "
        "in chunks this size (concurrent requests merged up to it), which bounds memory.",
        ge=1,
    )
    server_max_queries: int = opt(
        16384,
        "Most queries one /retrieve request may carry (413 above); a GRPO turn of 512 prompts "
        "x 5 samples = 2,560 queries fits in one request.",
        ge=1,
    )
    server_max_body_mb: int = opt(64, "Largest /retrieve request body, in MiB (413 above).", ge=1)
    server_max_topk: int = opt(
        100,
        "Largest topk the server returns; a larger topk is clamped to it (and to the corpus).",
        ge=1,
    )
    server_cache_mb: int = opt(
        256,
        "Memory for the server's (query, k) LRU result cache, in MiB (entry sizes estimated "
        "from the query and passage texts); 0 turns it off.",
        ge=0,
    )
    server_max_query_chars: int = opt(
        4096,
        "Longer queries are cut to this many characters before searching (the response says "
        "how many were cut in an X-Sr1-Truncated-Queries header).",
        ge=1,
    )
    server_read_timeout_s: float = opt(
        30.0,
        "A request (headers and body) must arrive whole within this many seconds of its first "
        "byte, or of the connection opening; else the server answers 408 and closes it. Also "
        "how long a client may leave a response unread.",
        gt=0,
    )
    server_keep_alive_s: float = opt(
        5.0, "Idle keep-alive connections are closed after this many seconds.", gt=0
    )
    server_max_connections: int = opt(
        512,
        "Open connections (and in-flight requests) the server takes; beyond it new requests "
        "get a 503 (uvicorn's limit_concurrency).",
        ge=1,
    )
    server_backlog: int = opt(
        1024, "Listen backlog: connections the kernel queues before accepting.", ge=1
    )
    server_batch_wait_ms: float = opt(
        0.0,
        "Extra wait to gather concurrent requests into one search (0: batch whatever queued "
        "while the previous search ran).",
        ge=0,
    )
    remote_timeout_s: float = opt(60.0, "HTTP timeout for a remote /retrieve server.")
    wiki18_corpus: str | None = opt(
        None,
        "Local wiki-18 file (wiki-18.jsonl[.gz] or DPR psgs_w100.tsv[.gz]); else SR1_WIKI18, "
        "else the one remembered from `sr1 index build wiki18 --corpus-file PATH`.",
    )


@dataclass(frozen=True)
class RolloutConfig(_Section):
    engine: str = opt(
        "hf",
        "Generation engine: hf (transformers generate) or vllm.",
        choices="sr1.rollout.engines:ENGINES",
    )
    env: str = opt(
        "search",
        "Tool environment the policy calls (sr1.envs): search (the retriever, Search-R1) or "
        "calculator (arithmetic, <calculator> expr </calculator>).",
        choices="sr1.envs:ENVS",
    )
    max_turns: int = opt(
        2,
        "Turns that may search (at most this many searches); then one final turn whose search "
        "is not executed (then force_answer). 0 = single turn, no search.",
        ge=0,
        le=64,
    )
    topk: int = opt(3, "Passages inserted per search call (k=3 in the paper).", ge=1, le=100)
    max_response_length: int = opt(128, "Max tokens the policy generates per turn.", ge=1)
    max_total_response_length: int = opt(
        768, "Max tokens of the whole response (generated + inserted).", ge=1
    )
    max_obs_length: int = opt(
        200, "Observation (<information> block) tokens kept; longer ones are truncated.", ge=0
    )
    max_prompt_length: int = opt(
        512, "Prompts longer than this many tokens are left-truncated.", ge=1
    )
    temperature: float = opt(1.0, "Sampling temperature for training rollouts.", ge=0, le=10)
    top_p: float = opt(1.0, "Nucleus sampling p.", gt=0, le=1)
    n_samples: int = opt(1, "Responses per prompt (GRPO/RLOO group size).", ge=1, le=1024)
    batch_size: int = opt(16, "Prompts per generation batch.", ge=1)
    vllm_gpu_memory_utilization: float = opt(
        0.5, "vLLM GPU memory fraction (GPU only).", gt=0, le=1
    )
    vllm_kv_cache_gib: int = opt(2, "vLLM CPU KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE).", ge=1)
    hf_kv_reuse: bool = opt(
        True, "HF engine: keep each trajectory's KV cache across turns (prefill only new tokens)."
    )
    seed: int = opt(0, "Sampling seed.", ge=0)
    force_answer: bool = opt(
        True,
        "When the turns are used up without an answer, append force_answer_text (mask 0) and "
        "let the model write the answer (False: stop there, as Search-R1's final turn does).",
    )
    force_answer_text: str = opt(
        "\nI have used all my searches, so I must give the final answer now.\n<answer>",
        "Inserted (mask 0) to force an answer; ends with the opening <answer> tag.",
    )
    placement: str = opt(
        "inprocess",
        "Where the rollout engine runs: inprocess (in the command's own process; the HF engine "
        "shares the trainer's module) or process (sr1 starts `sr1 serve engine` as a child "
        "process on a free port and stops it on exit). rollout.engine_url overrides both.",
        choices=("inprocess", "process"),
    )
    engine_url: str | None = opt(
        None,
        "http://HOST:PORT of a running `sr1 serve engine`: train, eval and rollout generate "
        "there (weights pushed to it). None = rollout.placement decides.",
        check=lambda v: (
            None
            if v is None or str(v).startswith(("http://", "https://"))
            else "must start with http:// or https://"
        ),
    )
    weight_sync: str = opt(
        "auto",
        "How weights reach an engine outside the process: auto (shm on the same host, else "
        "http), shm (a safetensors file in /dev/shm or the temp dir; its path is posted), http "
        "(the safetensors bytes in the request body), nccl (vLLM's NCCL weight transfer, GPU "
        "only; the server must be started with it; untested without GPUs).",
        choices=("auto", "shm", "http", "nccl"),
    )
    engine_device: str | None = opt(
        None,
        "Device of the engine process that placement=process starts (e.g. cuda:1, to keep it off "
        "the trainer's GPU); None = the command's device.",
    )
    engine_openmp: str = opt(
        "auto",
        "OpenMP runtime of the engine process that placement=process starts: auto (Intel's "
        "libiomp5, which vllm-cpu installs, preloaded for a vLLM engine on CPU, as vLLM's CPU "
        "guide asks: ~1.4x its sampled tokens/s on 2 cores; else the default), intel (preload "
        "it for any engine; an error if it is not installed), default (the environment as it "
        "is: torch's libgomp unless LD_PRELOAD says otherwise). "
        "Recorded as engine_openmp; sr1 serve engine reports its own in /health.",
        choices=("auto", "intel", "default"),
    )
    engine_pause: str = opt(
        "auto",
        "sr1 train, synchronous (trainer.async_steps=0) with placement=process: freeze the "
        "engine process (SIGSTOP to its process group) while the trainer computes a step's "
        "update and continue it (SIGCONT) before the weight push, as GPU peers put vLLM to "
        "sleep during training. On CPU cores shared with the trainer an idle vLLM engine's "
        "polling threads otherwise preempt the update. auto (when that engine runs on CPU), "
        "always (any device), never. always needs placement=process without engine_url and "
        "async_steps=0 (else the engine is not sr1's to freeze, or samples during the update).",
        choices=("auto", "always", "never"),
    )
    engine_startup_timeout_s: float = opt(
        900.0, "Seconds to wait for an engine process / server to answer /health.", gt=0
    )
    engine_timeout_s: float = opt(
        3600.0, "Seconds one request to an engine server may take (a generate batch).", gt=0
    )


@dataclass(frozen=True)
class AlgorithmConfig(_Section):
    name: str = opt("grpo", "ppo, grpo, reinforce_pp or rloo.", choices="sr1.train.trainer:ALGOS")
    gamma: float = opt(1.0, "GAE discount.", ge=0, le=1)
    lam: float = opt(1.0, "GAE lambda.", ge=0, le=1)
    norm_adv_by_std: bool = opt(True, "GRPO: divide group-centred rewards by the group std.")
    clip_ratio: float = opt(
        0.2,
        "PPO clip epsilon (lower). policy_loss=gspo keeps its own 3e-4/4e-4 unless clip_ratio "
        "or clip_ratio_high is changed.",
        gt=0,
        lt=1,
    )
    clip_ratio_high: float | None = opt(
        None, "Upper clip epsilon (clip-higher, DAPO); None = clip_ratio.", gt=0, lt=1
    )
    dual_clip_c: float | None = opt(
        None, "Dual-clip constant c (>1) for negative advantages; None = off.", gt=1
    )
    value_clip: float = opt(0.5, "Value-function clip range (PPO).", gt=0)
    kl_coef: float = opt(0.001, "KL-to-reference coefficient.", ge=0)
    kl_estimator: str = opt(
        "k3",
        "KL estimator: k1, k2 or k3 (low-variance, value clamped to 10); verl's names kl, mse "
        "and low_var_kl are the same three.",
        choices="sr1.algos.core:KL_ESTIMATORS",
    )
    kl_in_reward: bool = opt(False, "Apply KL as a reward penalty instead of a loss term.")
    entropy_coef: float = opt(0.001, "Entropy bonus coefficient.", ge=0)
    loss_agg: str = opt(
        "token-mean",
        "Loss aggregation: token-mean, seq-mean-token-sum, seq-mean-token-mean or "
        "seq-mean-token-sum-norm (sum of sequence token sums / padded response length, Dr. GRPO "
        "and verl). policy_loss=gspo keeps its own seq-mean-token-mean unless this is changed.",
        choices="sr1.algos.core:LOSS_AGG_MODES",
    )
    reward: str = opt(
        "em",
        "Reward: em, f1 or format (EM with format shaping).",
        choices="sr1.algos.rewards:REWARDS",
    )
    use_mask: bool = opt(
        True, "Mask retrieved tokens out of the loss (the paper's point; off only for ablation)."
    )
    adv_estimator: str | None = opt(
        None,
        "Advantage estimator (gae, grpo, rloo, reinforce_pp, reinforce_pp_baseline); "
        "None = the algorithm's own (ppo: gae, grpo: grpo, rloo: rloo, reinforce_pp: reinforce_pp).",
        choices="sr1.algos.core:ADV_ESTIMATORS",
    )
    policy_loss: str = opt(
        "vanilla",
        "Policy loss: vanilla (PPO clip) or gspo (sequence ratio).",
        choices="sr1.algos.core:POLICY_LOSSES",
    )
    format_score: float = opt(
        0.2,
        "Format reward: well-formed but wrong (and subtracted from correct but malformed).",
        ge=0,
        le=1,
    )
    final_format_score: float = opt(
        0.1, "Format reward: an answer, wrong and malformed.", ge=0, le=1
    )
    retrieval_score: float = opt(
        0.0,
        "Format reward: extra credit when well-formed, wrong, and a gold answer was retrieved.",
        ge=0,
        le=1,
    )


@dataclass(frozen=True)
class TrainerConfig(_Section):
    max_steps: int = opt(20, "RL steps (each: rollout a batch, then update).", ge=1)
    prompts_per_step: int = opt(8, "Prompts per RL step (train batch size).", ge=1)
    ppo_epochs: int = opt(1, "Passes over each rollout batch.", ge=1, le=100)
    mini_batch_size: int = opt(8, "Trajectories per optimiser update.", ge=1)
    micro_batch_size: int = opt(
        4,
        "Trajectories per forward/backward (gradient accumulation); the most per micro-batch "
        "when micro_batch_tokens is set.",
        ge=1,
    )
    micro_batch_tokens: int = opt(
        0,
        "Token-budget micro-batches (verl's dynamic batch size; bounds activation memory on an "
        "accelerator): each forward/backward computes at most this many token positions "
        "(rows x the columns of its longest prompt + longest response, padding included; a "
        "longer single trajectory runs alone) and at most micro_batch_size rows; of such "
        "splits of the length-ordered rows, the fewest micro-batches, then the least padding. "
        "Applies to the update and the old/reference/value passes; the loss is the same up to "
        "float summation order. 0 = fixed micro_batch_size rows (length-ordered chunks).",
        ge=0,
    )
    lr: float = opt(1e-6, "Actor learning rate.", gt=0, le=1)
    critic_lr: float = opt(1e-5, "Critic learning rate (PPO).", gt=0, le=1)
    warmup_steps: int = opt(0, "Linear lr warmup steps.", ge=0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", ge=0)
    adam_eps: float = opt(
        1e-8,
        "AdamW epsilon (policy and critic). Adam's first step is lr*sign(grad) wherever "
        "|grad| >> eps.",
        gt=0,
    )
    grad_clip: float = opt(1.0, "Max gradient norm.", gt=0)
    gradient_checkpointing: bool = opt(False, "Recompute activations to save memory.")
    mixed_precision: str = opt(
        "auto",
        "Autocast for the training forward passes (sft and RL): bf16, no, or auto (on CPU: "
        "bf16 where the CPU has AMX-BF16/AVX512-BF16, else none; on an accelerator: none, "
        "unless `accelerate launch --mixed_precision` applies its own; use that for fp16). "
        "Weights and optimiser state stay in model.dtype; log-probs are taken in fp32. bf16: "
        "~1.5x tokens/s for SmolLM2-135M on a CPU with AVX512-BF16, 24x slower on AVX2 only.",
        choices=("auto", "no", "bf16"),
    )
    cpu_malloc_cache: str = opt(
        "never",
        "Keep memory the training process frees for its next step (glibc malloc: no mmap for "
        "large blocks, no trimming below 2 GiB; sr1.train.allocator), as a GPU's caching "
        "allocator does: without it every update faults its working set in again (~1 GB a "
        "quickstart update with the whole-logits head, 0.3-0.7 GB with logits_chunk_mib). "
        "Measured before the chunked head: +8.5% update tokens/s on the same batches, "
        "0.72-0.84x the update time in the RL loop; but the heap fragments: peak memory 4.6 GB "
        "against 3.8 "
        "over 32 quickstart steps, and a pattern of large blocks with small survivors grew it "
        "without bound in a probe, so it is opt-in. auto (training on CPU), always, never. "
        "Recorded as cpu_malloc_cache.",
        choices=("auto", "always", "never"),
    )
    logits_chunk_mib: int = opt(
        0,
        "The output head's log-probs and entropies are computed this many MiB of fp32 logits "
        "at a time and the head's logits recomputed in backward (sr1.train.head; Liger's fused "
        "linear cross-entropy, for log-probs and entropy): the (tokens x vocab) logits, the "
        "update's largest tensors, are never whole. Same values up to float rounding, one more "
        "head matmul. 0 = auto: 16 on CPU (under glibc's 32 MiB mmap threshold, so the chunks "
        "reuse heap memory instead of faulting ~2 GB of pages in per quickstart update), 1024 "
        "on an accelerator (memory); -1 = whole logits (the plain head; also what a LoRA or "
        "biased head gets).",
        ge=-1,
    )
    skip_inert_rows: bool = opt(
        True,
        "Leave out of the update's forward and backward the trajectories whose advantage is 0 "
        "at every token (a GRPO/RLOO group whose samples all scored the same), when nothing else "
        "in the loss sees them: kl_coef 0, entropy_coef 0, no critic, and a policy loss whose "
        "gradient vanishes with the advantage (vanilla, gspo). Their gradient is exactly zero "
        "and the loss normaliser still counts their tokens, so the update is the same up to "
        "float summation order; the optimiser still steps. actor/* metrics are then over the "
        "computed trajectories; perf/update_rows_frac says what share that was.",
    )
    reuse_old_logprobs: bool = opt(
        True,
        "With one on-policy update per batch (ppo_epochs 1, mini_batch_size >= batch), take the "
        "old log-probs from the update's own forward instead of a separate pass. Never for a "
        "batch sampled by an older policy version (async_steps): those are recomputed.",
    )
    async_steps: int = opt(
        0,
        "Rollouts may run this many policy versions behind the update: 0 = synchronous; 1 = "
        "one-step-off (step t+1's rollout runs in a thread while step t updates; weights are "
        "pushed after each update). Needs the engine outside the trainer "
        "(rollout.placement=process or rollout.engine_url).",
        ge=0,
        le=8,
    )
    lora_rank: int = opt(0, "LoRA rank (0 = full fine-tuning).", ge=0)
    freeze_layers: int = opt(
        0,
        "Freeze the embeddings and the first N decoder layers (sft and RL): the backward stops "
        "there, ~1.9x tokens/s on SmolLM2-135M with 20 of 30 frozen on CPU. 0 = train all.",
        ge=0,
    )
    lora_alpha: int = opt(32, "LoRA alpha.", ge=1)
    save_every: int = opt(10, "Checkpoint every N steps (and at the end).", ge=1)
    keep_checkpoints: int = opt(
        3,
        "Keep the newest N step-K checkpoints (plus final); older ones are deleted after each "
        "save (renamed aside first, so resume never sees a half-deleted one). 0 = keep all.",
        ge=0,
    )
    sft_epochs: int = opt(2, "SFT warm-start epochs.", ge=1)
    sft_lr: float = opt(1e-4, "SFT learning rate.", gt=0, le=1)
    sft_examples: int = opt(256, "Training questions turned into SFT trajectories.", ge=1)
    sft_supported_only: bool = opt(
        True,
        "Warm-start only on questions whose gold retrieval shows every key the trajectory "
        "quotes (the bridge, then a gold answer), taking further questions in the data order "
        "until there are sft_examples; False keeps every question, and a trajectory whose "
        "documents miss the key then names it anyway (teaching the policy to guess).",
    )
    sft_multi_search_share: float | None = opt(
        None,
        "Most share of the warm-start's trajectories that search more than once (multi-hop "
        "questions); further ones are passed over in the data order. Small values leave "
        "multi-turn search for RL to discover. None = as the data comes.",
        ge=0,
        le=1,
    )
    sft_batch_size: int | None = opt(
        None,
        "SFT examples per optimiser update (in micro-batches of micro_batch_size). None = "
        "mini_batch_size; set it so that resizing RL's mini-batch leaves SFT unchanged.",
        ge=1,
    )
    seed: int = opt(0, "Training seed.", ge=0)


@dataclass(frozen=True)
class EvalConfig(_Section):
    method: str = opt("search", "direct, cot, rag or search.", choices="sr1.eval.methods:METHODS")
    split: str = opt("test", "Split to evaluate (test falls back to dev where a set has no test).")
    limit: int | None = opt(None, "Evaluate the first N questions of each dataset.", ge=1)
    batch_size: int = opt(32, "Questions per generation batch.", ge=1)
    temperature: float = opt(
        0.0, "0 = greedy decoding (the paper's validation setting).", ge=0, le=10
    )
    max_new_tokens: int = opt(128, "Generation budget per turn.", ge=1)
    seed: int = opt(0, "Seed for sampling and bootstrap.", ge=0)
    answer_fallback: str = opt(
        "none",
        "A response without <answer> tags: none (no answer, as Search-R1 scores) or response "
        "(score its first line, as FlashRAG scores untagged baselines).",
        choices=("none", "response"),
    )


@dataclass(frozen=True)
class ScoringConfig(_Section):
    nfkc: bool = opt(
        False,
        "Fold unicode (NFKC: full-width letters, ligatures) before SQuAD normalisation. Off = "
        "exact Search-R1/FlashRAG parity.",
    )
    default_task: str = opt(
        "qa",
        "Task (sr1.tasks) scoring rows whose data_source sr1 does not list; empty = refuse them.",
    )

    def options(self, answer_fallback: str = "none") -> Any:
        """The scorer's options (``sr1.tasks.ScoreOptions``)."""
        from sr1.tasks import ScoreOptions

        return ScoreOptions(nfkc=self.nfkc, answer_fallback=answer_fallback)


@dataclass(frozen=True)
class TrackingConfig(_Section):
    experiment: str = opt("sr1", "MLflow experiment name.")
    mlflow_uri: str | None = opt(
        None, "MLflow tracking URI; None = MLFLOW_TRACKING_URI or sqlite:///$SR1_HOME/mlflow.db."
    )
    log_every: int = opt(1, "Log metrics every N steps.", ge=1)


@dataclass(frozen=True)
class QuickstartConfig(_Section):
    synth_seed: int = opt(0, "Seed of the synthetic world.", ge=0)
    synth_entities: int = opt(300, "Entities in the synthetic world.", ge=10)
    synth_train: int = opt(800, "Synthetic training questions (at most).", ge=1)
    synth_dev: int = opt(50, "Synthetic dev questions.", ge=1)
    synth_test: int = opt(200, "Synthetic test questions (eval.limit of them are evaluated).", ge=1)
    baselines: list[str] = opt(
        ["direct", "rag", "search"],
        "Methods evaluated on the untrained model.",
        choices="sr1.eval.methods:METHODS",
    )
    algo: str = opt(
        "grpo", "RL algorithm run from the SFT checkpoint.", choices="sr1.train.trainer:ALGOS"
    )


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    quickstart: QuickstartConfig = field(default_factory=QuickstartConfig)


_SECTION_NAMES = {
    f.type if isinstance(f.type, str) else f.type.__name__: f.name
    for f in dataclasses.fields(ExperimentConfig)
}


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (what is saved with a run)."""
    return dataclasses.asdict(cfg)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce a YAML/CLI value to the annotated type, or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be None")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value] if args else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "1",
            "yes",
            "on",
            "false",
            "0",
            "no",
            "off",
        ):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _apply(section_obj: Any, updates: dict[str, Any], where: str) -> Any:
    if not isinstance(updates, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {updates!r}")
    hints = _field_types(type(section_obj))
    valid = [f.name for f in dataclasses.fields(section_obj)]
    changes: dict[str, Any] = {}
    for key, value in updates.items():
        if key not in valid:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(valid)}")
        sub = getattr(section_obj, key)
        if dataclasses.is_dataclass(sub):
            changes[key] = _apply(sub, value, f"{where}.{key}" if where else key)
        else:
            changes[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return dataclasses.replace(section_obj, **changes)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false are booleans, so the values
    ``no``, ``off``, ``yes``, ``on`` stay strings (``trainer.mixed_precision: no`` means "no",
    not False). Boolean fields still take them (``_coerce``)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config; syntax errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path}", hint="pass a path like experiments/quickstart.yaml"
        )
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (model, data, ...)")
    return data


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """Turn ``["trainer.lr=1e-5", "rollout.max_turns=3"]`` into nested dicts (values YAML-parsed)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. trainer.lr=1e-5")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key part")
        try:
            value = _yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ConfigError(f"--set {item!r}: {p} is both a value and a section")
        d[parts[-1]] = value
    return out


def resolve_config(
    yaml_path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: ExperimentConfig | None = None,
    **section_updates: dict[str, Any],
) -> ExperimentConfig:
    """Defaults < YAML < ``section_updates`` (from CLI flags) < ``--set`` overrides."""
    cfg = base or ExperimentConfig()
    if yaml_path is not None:
        cfg = _apply(cfg, load_yaml(yaml_path), str(yaml_path))
    flag_updates = {
        k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in section_updates.items()
    }
    flag_updates = {k: v for k, v in flag_updates.items() if v}
    if flag_updates:
        cfg = _apply(cfg, flag_updates, "")
    if overrides:
        cfg = _apply(cfg, parse_set(overrides), "--set")
    return cfg


def help_table(cfg: Any = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, for docs and ``--help`` text."""
    cfg = cfg if cfg is not None else ExperimentConfig()
    rows: list[tuple[str, str, str]] = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            rows += help_table(v, f"{prefix}{f.name}.")
        else:
            rng = valid_range(f)
            text = f.metadata.get("help", "") + (f" [valid: {rng}]" if rng else "")
            rows.append((f"{prefix}{f.name}", repr(v), text))
    return rows


def check_flag(name: str, value: int | None, ge: int = 1) -> None:
    """Refuse a numeric CLI flag below ``ge`` (``--max-steps 0``, ``--limit -1``) before any
    work, in the same words as a config field."""
    if value is not None and value < ge:
        raise ConfigError(f"{name}={value}: must be >= {ge}")
