"""Experiment configuration: frozen dataclasses with help text, YAML files and ``--set`` overrides.

Precedence is defaults < YAML file (``experiments/*.yaml``) < ``--set section.key=value``.
Unknown keys are errors that list the valid keys. ``resolve_config`` returns the fully
resolved :class:`ExperimentConfig`; ``to_dict`` gives the form saved with every run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sr1.errors import ConfigError


def opt(default: Any, help: str) -> Any:  # noqa: A002 - "help" mirrors argparse/TRL naming
    """A dataclass field with a default and help text (mutable defaults handled)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    name: str = opt("smollm2-135m", "Model alias (sr1 model list), HF hub name, or local path.")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) for hub models.")
    dtype: str = opt(
        "auto", "auto (bf16 on GPU with bf16 support, fp32 on CPU), float32, bfloat16, float16."
    )
    device: str = opt("auto", "auto, cpu, cuda, cuda:N.")
    trust_remote_code: bool = opt(False, "Pass trust_remote_code to transformers.")


@dataclass(frozen=True)
class DataConfig:
    train_datasets: list[str] = opt(
        ["nq", "hotpotqa"], "Datasets whose train split forms the training mix."
    )
    eval_datasets: list[str] = opt(
        ["nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle"],
        "Datasets evaluated by --all-datasets.",
    )
    source_dir: str | None = opt(
        None, "Directory of FlashRAG-format <dataset>/<split>.jsonl files."
    )
    template: str = opt(
        "base",
        "Prompt template: base (raw Search-R1 prompt), instruct (chat template) or auto "
        "(chat template when the tokenizer has one, as Search-R1's trainer does).",
    )
    search_prompt: str = opt(
        "search",
        "Prompt of the search method in sft, train, rollout and eval: search (the paper's, "
        "verbatim) or search_short (same tags and rules in under half the tokens; the CPU "
        "quickstart's choice). Recorded with every run.",
    )
    max_train_examples: int | None = opt(None, "Cap on training examples (None = all).")
    seed: int = opt(0, "Seed for shuffling and sampling data.")


@dataclass(frozen=True)
class RetrievalConfig:
    index: str = opt(
        "wiki18",
        "Index name (sr1 index list) or an http(s) URL of a /retrieve server; the benchmarks "
        "use wiki18 (build it with `sr1 index build wiki18 --corpus-file PATH`).",
    )
    retriever: str = opt("bm25", "bm25 or dense.")
    topk: int = opt(3, "Passages returned per query.")
    encoder: str = opt("intfloat/e5-base-v2", "Dense encoder: sentence-transformers name or path.")
    query_prefix: str = opt("query: ", "Prefix added to queries for the dense encoder (e5 style).")
    passage_prefix: str = opt(
        "passage: ", "Prefix added to passages for the dense encoder (e5 style)."
    )
    faiss_index: str = opt("flat", "faiss index type for dense retrieval: flat or hnsw.")
    encode_batch_size: int = opt(256, "Batch size for dense passage encoding.")
    encode_max_length: int = opt(
        256, "Dense encoder token limit per passage/query (longer ones are cut)."
    )
    bm25_backend: str = opt(
        "auto",
        "bm25s backend: numba (about 50x faster per query, but a ~6 s JIT compile per process), "
        "numpy, or auto (numba from bm25_numba_min_passages passages up).",
    )
    bm25_numba_min_passages: int = opt(
        100_000, "With bm25_backend=auto, indices this large use numba; smaller ones numpy."
    )
    bm25_k1: float = opt(1.5, "BM25 k1 (term-frequency saturation).")
    bm25_b: float = opt(0.75, "BM25 b (document-length normalisation).")
    bm25_threads: int = opt(1, "Threads for one BM25 batch search (numba backend; -1 = all cores).")
    hnsw_m: int = opt(32, "HNSW graph degree (faiss_index=hnsw).")
    hnsw_ef_construction: int = opt(200, "HNSW efConstruction (build-time beam width).")
    hnsw_ef_search: int = opt(128, "HNSW efSearch (query-time beam width).")
    build_chunk: int = opt(
        8192, "Passages per build chunk (dense: embeddings saved per chunk, so a crash resumes)."
    )
    skip_bad_lines: bool = opt(False, "Skip malformed corpus lines instead of stopping.")
    server_max_batch: int = opt(
        512,
        "Queries per search call inside the retrieval server: a request's queries are searched "
        "in chunks this size (concurrent requests merged up to it), which bounds memory.",
    )
    server_max_queries: int = opt(
        16384,
        "Most queries one /retrieve request may carry (413 above); a GRPO turn of 512 prompts "
        "x 5 samples = 2,560 queries fits in one request.",
    )
    server_max_body_mb: int = opt(64, "Largest /retrieve request body, in MiB (413 above).")
    server_max_topk: int = opt(
        100, "Largest topk the server returns; a larger topk is clamped to it (and to the corpus)."
    )
    server_cache_size: int = opt(10000, "Entries in the server's (query, k) LRU result cache.")
    server_batch_wait_ms: float = opt(
        0.0,
        "Extra wait to gather concurrent requests into one search (0: batch whatever queued "
        "while the previous search ran).",
    )
    remote_timeout_s: float = opt(60.0, "HTTP timeout for a remote /retrieve server.")
    wiki18_corpus: str | None = opt(
        None,
        "Local wiki-18 file (wiki-18.jsonl[.gz] or DPR psgs_w100.tsv[.gz]); else SR1_WIKI18, "
        "else the one remembered from `sr1 index build wiki18 --corpus-file PATH`.",
    )


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = opt("hf", "Generation engine: hf (transformers generate) or vllm.")
    env: str = opt(
        "search",
        "Tool environment the policy calls (sr1.envs): search (the retriever, Search-R1) or "
        "calculator (arithmetic, <calculator> expr </calculator>).",
    )
    max_turns: int = opt(
        2,
        "Turns that may search (at most this many searches); then one final turn whose search "
        "is not executed (then force_answer). 0 = single turn, no search.",
    )
    topk: int = opt(3, "Passages inserted per search call (k=3 in the paper).")
    max_response_length: int = opt(128, "Max tokens the policy generates per turn.")
    max_total_response_length: int = opt(
        768, "Max tokens of the whole response (generated + inserted)."
    )
    max_obs_length: int = opt(
        200, "Observation (<information> block) tokens kept; longer ones are truncated."
    )
    max_prompt_length: int = opt(512, "Prompts longer than this many tokens are left-truncated.")
    temperature: float = opt(1.0, "Sampling temperature for training rollouts.")
    top_p: float = opt(1.0, "Nucleus sampling p.")
    n_samples: int = opt(1, "Responses per prompt (GRPO/RLOO group size).")
    batch_size: int = opt(16, "Prompts per generation batch.")
    vllm_gpu_memory_utilization: float = opt(0.5, "vLLM GPU memory fraction (GPU only).")
    vllm_kv_cache_gib: int = opt(2, "vLLM CPU KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE).")
    seed: int = opt(0, "Sampling seed.")
    force_answer: bool = opt(
        True,
        "When the turns are used up without an answer, append force_answer_text (mask 0) and "
        "let the model write the answer (False: stop there, as Search-R1's final turn does).",
    )
    force_answer_text: str = opt(
        "\nI have used all my searches, so I must give the final answer now.\n<answer>",
        "Inserted (mask 0) to force an answer; ends with the opening <answer> tag.",
    )


@dataclass(frozen=True)
class AlgorithmConfig:
    name: str = opt("grpo", "ppo, grpo, reinforce_pp or rloo.")
    gamma: float = opt(1.0, "GAE discount.")
    lam: float = opt(1.0, "GAE lambda.")
    norm_adv_by_std: bool = opt(True, "GRPO: divide group-centred rewards by the group std.")
    clip_ratio: float = opt(
        0.2,
        "PPO clip epsilon (lower). policy_loss=gspo keeps its own 3e-4/4e-4 unless clip_ratio "
        "or clip_ratio_high is changed.",
    )
    clip_ratio_high: float | None = opt(
        None, "Upper clip epsilon (clip-higher, DAPO); None = clip_ratio."
    )
    dual_clip_c: float | None = opt(
        None, "Dual-clip constant c (>1) for negative advantages; None = off."
    )
    value_clip: float = opt(0.5, "Value-function clip range (PPO).")
    kl_coef: float = opt(0.001, "KL-to-reference coefficient.")
    kl_estimator: str = opt(
        "k3",
        "KL estimator: k1, k2 or k3 (low-variance, value clamped to 10); verl's names kl, mse "
        "and low_var_kl are the same three.",
    )
    kl_in_reward: bool = opt(False, "Apply KL as a reward penalty instead of a loss term.")
    entropy_coef: float = opt(0.001, "Entropy bonus coefficient.")
    loss_agg: str = opt(
        "token-mean",
        "Loss aggregation: token-mean, seq-mean-token-sum, seq-mean-token-mean or "
        "seq-mean-token-sum-norm (sum of sequence token sums / padded response length, Dr. GRPO "
        "and verl). policy_loss=gspo keeps its own seq-mean-token-mean unless this is changed.",
    )
    reward: str = opt("em", "Reward: em, f1 or format (EM with format shaping).")
    use_mask: bool = opt(
        True, "Mask retrieved tokens out of the loss (the paper's point; off only for ablation)."
    )
    adv_estimator: str | None = opt(
        None,
        "Advantage estimator (gae, grpo, rloo, reinforce_pp, reinforce_pp_baseline); "
        "None = the algorithm's own (ppo: gae, grpo: grpo, rloo: rloo, reinforce_pp: reinforce_pp).",
    )
    policy_loss: str = opt("vanilla", "Policy loss: vanilla (PPO clip) or gspo (sequence ratio).")
    format_score: float = opt(
        0.2, "Format reward: well-formed but wrong (and subtracted from correct but malformed)."
    )
    final_format_score: float = opt(0.1, "Format reward: an answer, wrong and malformed.")
    retrieval_score: float = opt(
        0.0, "Format reward: extra credit when well-formed, wrong, and a gold answer was retrieved."
    )


@dataclass(frozen=True)
class TrainerConfig:
    max_steps: int = opt(20, "RL steps (each: rollout a batch, then update).")
    prompts_per_step: int = opt(8, "Prompts per RL step (train batch size).")
    ppo_epochs: int = opt(1, "Passes over each rollout batch.")
    mini_batch_size: int = opt(8, "Trajectories per optimiser update.")
    micro_batch_size: int = opt(4, "Trajectories per forward/backward (gradient accumulation).")
    lr: float = opt(1e-6, "Actor learning rate.")
    critic_lr: float = opt(1e-5, "Critic learning rate (PPO).")
    warmup_steps: int = opt(0, "Linear lr warmup steps.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    grad_clip: float = opt(1.0, "Max gradient norm.")
    gradient_checkpointing: bool = opt(False, "Recompute activations to save memory.")
    mixed_precision: str = opt(
        "auto",
        "Autocast for the training forward passes (sft and RL): bf16, no, or auto (none, unless "
        "`accelerate launch --mixed_precision` applies its own; use that for fp16). Weights "
        "and optimiser state stay in model.dtype; log-probs are taken in fp32. bf16: ~1.5x "
        "tokens/s for SmolLM2-135M on a CPU with AVX512-BF16.",
    )
    reuse_old_logprobs: bool = opt(
        True,
        "With one on-policy update per batch (ppo_epochs 1, mini_batch_size >= batch), take the "
        "old log-probs from the update's own forward instead of a separate pass.",
    )
    lora_rank: int = opt(0, "LoRA rank (0 = full fine-tuning).")
    freeze_layers: int = opt(
        0,
        "Freeze the embeddings and the first N decoder layers (sft and RL): the backward stops "
        "there, ~1.9x tokens/s on SmolLM2-135M with 20 of 30 frozen on CPU. 0 = train all.",
    )
    lora_alpha: int = opt(32, "LoRA alpha.")
    save_every: int = opt(10, "Checkpoint every N steps (and at the end).")
    sft_epochs: int = opt(2, "SFT warm-start epochs.")
    sft_lr: float = opt(1e-4, "SFT learning rate.")
    sft_examples: int = opt(256, "Training questions turned into SFT trajectories.")
    seed: int = opt(0, "Training seed.")


@dataclass(frozen=True)
class EvalConfig:
    method: str = opt("search", "direct, cot, rag or search.")
    split: str = opt("test", "Split to evaluate (test falls back to dev where a set has no test).")
    limit: int | None = opt(None, "Evaluate the first N questions of each dataset.")
    batch_size: int = opt(32, "Questions per generation batch.")
    temperature: float = opt(0.0, "0 = greedy decoding (the paper's validation setting).")
    max_new_tokens: int = opt(128, "Generation budget per turn.")
    seed: int = opt(0, "Seed for sampling and bootstrap.")
    answer_fallback: str = opt(
        "none",
        "A response without <answer> tags: none (no answer, as Search-R1 scores) or response "
        "(score its first line, as FlashRAG scores untagged baselines).",
    )


@dataclass(frozen=True)
class ScoringConfig:
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
class TrackingConfig:
    experiment: str = opt("sr1", "MLflow experiment name.")
    mlflow_uri: str | None = opt(
        None, "MLflow tracking URI; None = MLFLOW_TRACKING_URI or sqlite:///$SR1_HOME/mlflow.db."
    )
    log_every: int = opt(1, "Log metrics every N steps.")


@dataclass(frozen=True)
class QuickstartConfig:
    synth_seed: int = opt(0, "Seed of the synthetic world.")
    synth_entities: int = opt(300, "Entities in the synthetic world.")
    synth_train: int = opt(800, "Synthetic training questions (at most).")
    synth_dev: int = opt(50, "Synthetic dev questions.")
    synth_test: int = opt(200, "Synthetic test questions (eval.limit of them are evaluated).")
    baselines: list[str] = opt(
        ["direct", "rag", "search"], "Methods evaluated on the untrained model."
    )
    algo: str = opt("grpo", "RL algorithm run from the SFT checkpoint.")


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


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config; syntax errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path}", hint="pass a path like experiments/quickstart.yaml"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
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
            value = yaml.safe_load(raw) if raw.strip() else ""
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
            rows.append((f"{prefix}{f.name}", repr(v), f.metadata.get("help", "")))
    return rows
