"""Atomic training checkpoints: an HF model folder plus ``trainer_state.pt``.

``run.dir/checkpoints/step-N`` (and ``final``) each hold a model + tokenizer that
``AutoModelForCausalLM.from_pretrained`` loads (LoRA adapters are merged for this; the raw
adapter is kept in ``adapter/`` for resuming), ``critic/`` for PPO, and ``trainer_state.pt``
(optimizer, scheduler, RNG states, data cursor, step). A folder is written under a temporary
name and renamed into place, so a crash leaves the previous checkpoint intact.
"""

from __future__ import annotations

import copy
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model with LoRA weights merged (the model itself when not LoRA)."""
    if not _is_peft(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


def save_checkpoint(
    out: Path,
    model: torch.nn.Module,
    tokenizer: Any,
    state: dict[str, Any],
    critic: Any | None = None,
) -> Path:
    """Write a checkpoint folder at ``out`` atomically (replacing an older one of that name)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if _is_peft(model):
            model.save_pretrained(tmp / "adapter")
        merged_copy(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if critic is not None:
            (tmp / "critic").mkdir()
            critic.save(tmp / "critic")
        torch.save(state, tmp / STATE_FILE)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The ``step-N`` folder with the largest N that has a trainer state, if any."""
    if not ckpt_dir.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for d in ckpt_dir.iterdir():
        m = _STEP_RE.match(d.name)
        if m and (d / STATE_FILE).is_file() and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), d)
    return best[1] if best else None


def load_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)
