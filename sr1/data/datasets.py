"""The dataset registry: the seven Search-R1 benchmarks and the synthetic world, and where each
split's FlashRAG-format source file is found (a local directory, the shared samples, the hub).

A source directory holds ``<dataset>/<split>.jsonl`` with one ``{"id", "question",
"golden_answers"}`` object per line (FlashRAG's layout; ``metadata`` and other keys are kept).
The hub copy is the ``RUC-NLPIR/FlashRAG_datasets`` dataset repository, same layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sr1 import paths
from sr1.errors import NotFoundError, Sr1Error
from sr1.registry import Registry

HUB_REPO = "RUC-NLPIR/FlashRAG_datasets"
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """One QA dataset: its splits in the full FlashRAG release and how the paper evaluates it."""

    name: str
    hops: str  # "single", "multi" or "mixed" (the synthetic world has both)
    splits: tuple[str, ...]  # splits of the full release (the hub copy)
    eval_split: str  # the paper's choice: test where the set has one, else dev
    on_hub: bool
    description: str


DATASETS: Registry[DatasetSpec] = Registry("dataset")
for _s in (
    DatasetSpec("nq", "single", SPLITS, "test", True, "Natural Questions (open)"),
    DatasetSpec("triviaqa", "single", SPLITS, "test", True, "TriviaQA"),
    DatasetSpec("popqa", "single", ("test",), "test", True, "PopQA (long-tail entities)"),
    DatasetSpec("hotpotqa", "multi", ("train", "dev"), "dev", True, "HotpotQA (2-hop)"),
    DatasetSpec("2wikimultihopqa", "multi", ("train", "dev"), "dev", True, "2WikiMultiHopQA"),
    DatasetSpec("musique", "multi", ("train", "dev"), "dev", True, "MuSiQue (2-4 hops)"),
    DatasetSpec("bamboogle", "multi", ("test",), "test", True, "Bamboogle (2-hop, 125 Qs)"),
    DatasetSpec("synth", "mixed", SPLITS, "test", False, "synthetic world (sr1 data synth)"),
):
    DATASETS.add(_s.name, _s)

# The seven benchmarks of the paper, in the order of its Table 2.
BENCHMARKS: tuple[str, ...] = (
    "nq",
    "triviaqa",
    "popqa",
    "hotpotqa",
    "2wikimultihopqa",
    "musique",
    "bamboogle",
)
TRAIN_MIX: tuple[str, ...] = ("nq", "hotpotqa")


def get_spec(name: str) -> DatasetSpec:
    """The spec of ``name``; unknown names raise NotFoundError listing the valid ones."""
    return DATASETS.get(name)


def synth_source_dir() -> Path:
    """Where ``sr1 data synth`` writes its QA by default (``<corpora>/synth/qa``)."""
    return paths.corpora_dir() / "synth" / "qa"


def default_source_dir(dataset: str) -> Path | None:
    """The source directory used when none is given: the synthetic world's QA for ``synth``,
    else the shared samples (``../shared/data/qa``); None when neither exists."""
    if dataset == "synth":
        d = synth_source_dir()
        return d if (d / "synth").is_dir() else None
    shared = paths.shared_data_dir()
    if shared is not None and (shared / "qa" / dataset).is_dir():
        return shared / "qa"
    return None


def source_file(source_dir: str | os.PathLike[str], dataset: str, split: str) -> Path:
    """The FlashRAG file for one split: ``<source_dir>/<dataset>/<split>.jsonl``.

    A missing file raises NotFoundError naming the path expected and the splits that exist;
    a dataset or split that is not a plain name (``../../x``) raises ConfigError.
    """
    paths.safe_name("dataset name", dataset)
    paths.safe_name("split", split)
    d = Path(source_dir).expanduser()
    if not d.is_dir():
        raise NotFoundError(
            f"source directory not found: {d}",
            hint=f"--source-dir must hold <dataset>/<split>.jsonl, e.g. {d}/{dataset}/{split}.jsonl",
        )
    p = d / dataset / f"{split}.jsonl"
    if not p.is_file():
        have = source_splits(d, dataset)
        raise NotFoundError(
            f"{dataset} split {split!r} not found: expected {p}",
            hint=(
                f"splits present in {d / dataset}: {', '.join(have)}"
                if have
                else f"put FlashRAG-format {dataset}/{split}.jsonl under {d}"
            ),
        )
    return p


def source_splits(source_dir: str | os.PathLike[str], dataset: str) -> list[str]:
    """The splits (train/dev/test order, then others by name) with a file under ``source_dir``."""
    d = Path(source_dir).expanduser() / dataset
    if not d.is_dir():
        return []
    names = sorted(
        p.name[: -len(".jsonl")]
        for p in d.glob("*.jsonl")
        if p.is_file() and not p.name.startswith(".")  # hidden or temp files are no splits
    )
    return [s for s in SPLITS if s in names] + [s for s in names if s not in SPLITS]


def download_split(dataset: str, split: str, cache_dir: Path | None = None) -> Path:
    """Fetch ``<dataset>/<split>.jsonl`` from the hub's FlashRAG collection; return its path.

    Needs network access; offline (or with ``HF_HUB_OFFLINE=1``) this raises an Sr1Error that
    says to use ``--source-dir`` instead.
    """
    spec = get_spec(dataset)
    if not spec.on_hub:
        raise Sr1Error(
            f"dataset {dataset!r} is not on the hub",
            hint="build it locally (sr1 data synth)" if dataset == "synth" else None,
        )
    if split not in spec.splits:
        raise NotFoundError(
            f"{dataset} has no {split!r} split on the hub; it has: {', '.join(spec.splits)}"
        )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover - transformers depends on huggingface_hub
        raise Sr1Error(
            "huggingface_hub is not installed", hint="pip install huggingface_hub"
        ) from e
    try:
        return Path(
            hf_hub_download(
                repo_id=HUB_REPO,
                filename=f"{dataset}/{split}.jsonl",
                repo_type="dataset",
                cache_dir=str(cache_dir) if cache_dir else None,
            )
        )
    except Exception as e:  # offline, DNS, 404, auth: all end the same way for the user
        raise Sr1Error(
            f"could not download {dataset}/{split}.jsonl from the hub ({HUB_REPO}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": "),
            hint=(
                "this needs internet access (and HF_HUB_OFFLINE unset); offline, pass "
                f"--source-dir DIR with {dataset}/{split}.jsonl in FlashRAG format"
            ),
        ) from None
