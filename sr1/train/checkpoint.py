"""Atomic training checkpoints: an HF model folder plus ``trainer_state.pt``.

``run.dir/checkpoints/step-N`` (and ``final``) each hold a model + tokenizer that
``AutoModelForCausalLM.from_pretrained`` loads (LoRA adapters are merged for this; the raw
adapter is kept in ``adapter/`` for resuming), ``critic/`` for PPO, and ``trainer_state.pt``
(optimizer, scheduler, RNG states, data cursor, step). A folder is written under a temporary
name and renamed into place, so a crash leaves the previous checkpoint intact.

Hidden side folders: ``.NAME.tmp-HOST-PID`` (being written), ``.NAME.old-HOST-PID`` (the
checkpoint it replaces, for the instant between two renames) and ``.NAME.trash-HOST-PID``
(being deleted). Only ``step-N`` folders with a trainer state count for resuming, so none of
these is ever resumed from; :func:`clean_stale` removes those whose writer is dead (and puts an
``old`` one back if its checkpoint is missing). :func:`prune_checkpoints` keeps the newest N
``step-N`` folders, renaming each old one aside before deleting it, so a kill mid-delete
leaves a hidden trash folder, never a half-deleted ``step-N``.
"""

from __future__ import annotations

import copy
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sr1.errors import Sr1Error

STATE_FILE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step-(\d+)$")
# .NAME.TAG-HOST-PID (HOST absent in folders written before it was recorded)
_SIDE_RE = re.compile(r"^\.(?P<name>.+?)\.(?P<tag>tmp|old|trash)-(?:(?P<host>.+)-)?(?P<pid>\d+)$")
STALE_AFTER_S = 1800.0  # a side folder from another host untouched this long is abandoned


def _host_tag() -> str:
    import socket

    return re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "host"


def side_path(out: Path, tag: str) -> Path:
    """``out``'s hidden side folder ``.NAME.TAG-HOST-PID`` (tag: tmp, old or trash)."""
    return out.parent / f".{out.name}.{tag}-{_host_tag()}-{os.getpid()}"


def _writer_gone(side: Path, host: str | None, pid: int, stale_after_s: float) -> bool:
    from sr1.tracking.store import process_alive

    if pid == os.getpid() and host in (None, _host_tag()):
        return False  # ours: this process may be writing it now
    if host is None or host == _host_tag():
        return not process_alive(pid)
    try:  # another host's process cannot be asked: an untouched folder is abandoned
        return time.time() - side.stat().st_mtime > stale_after_s
    except OSError:
        return False


def clean_stale(ckpt_dir: Path, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Remove the side folders in ``ckpt_dir`` left by dead writers (a killed save, prune or
    copy); an ``old`` folder whose checkpoint is missing (the writer died between its two
    renames) is renamed back instead. Returns what was done, one line per folder."""
    done: list[str] = []
    if not Path(ckpt_dir).is_dir():
        return done
    for d in sorted(Path(ckpt_dir).iterdir()):
        m = _SIDE_RE.match(d.name)
        if not m or not d.is_dir():
            continue
        if not _writer_gone(d, m["host"], int(m["pid"]), stale_after_s):
            continue
        target = d.parent / m["name"]
        if m["tag"] == "old" and not target.exists():
            try:
                os.replace(d, target)
            except OSError:  # another rank cleaning the same folder got there first
                continue
            done.append(f"restored {target.name} from {d.name}")
            continue
        shutil.rmtree(d, ignore_errors=True)
        done.append(f"removed {d.name}")
    return done


def step_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """The complete ``step-N`` folders (those with a trainer state), oldest first."""
    if not Path(ckpt_dir).is_dir():
        return []
    out = []
    for d in Path(ckpt_dir).iterdir():
        m = _STEP_RE.match(d.name)
        if m and (d / STATE_FILE).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def remove_dir(d: Path) -> None:
    """Delete folder ``d`` so that it disappears at once: rename it to a hidden trash name,
    then delete that (a kill mid-delete leaves only the trash, which :func:`clean_stale`
    removes later)."""
    trash = side_path(d, "trash")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(d, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune_checkpoints(ckpt_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete ``step-N`` folders (0: keep all; ``final``
    and anything else are never touched). Returns the names removed."""
    if keep <= 0:
        return []
    gone = []
    for _, d in step_checkpoints(ckpt_dir)[:-keep]:
        remove_dir(d)
        gone.append(d.name)
    return gone


def link_copy(src: Path, dst: Path) -> Path:
    """``dst`` as a copy of folder ``src`` using hard links where possible (checkpoints are
    large), replacing ``dst`` atomically (the old one is renamed aside, then deleted)."""
    src, dst = Path(src), Path(dst)
    tmp = side_path(dst, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    try:
        shutil.copytree(src, tmp, copy_function=link)
        _swap_in(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename complete folder ``tmp`` to ``out``; an existing ``out`` is moved aside first and
    deleted after. Interrupted between the two renames, the old ``out`` is put back here (or,
    if the process dies, by :func:`clean_stale`)."""
    old = side_path(out, "old")
    had = out.exists()
    try:
        if had:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if had and not out.exists() and old.exists():
            os.replace(old, out)
        raise
    if had:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states in plain types and tensors only, so that
    ``torch.load(weights_only=True)`` reads them back (numpy's key is a list, not an array)."""
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": (str(name), [int(k) for k in key], int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
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
    *,
    tmp: Path | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    critic_state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder at ``out`` atomically (replacing an older one of that name).

    ``tmp``: a side folder from :func:`begin_checkpoint` that other ranks have already
    written their parts into (FSDP optimiser shards); without it one is made here.
    ``state_dict`` / ``critic_state_dict``: the full (gathered) weights to write, when the
    modules hold shards (FSDP)."""
    out = Path(out)
    tmp = begin_checkpoint(out) if tmp is None else Path(tmp)
    try:
        if _is_peft(model):
            model.save_pretrained(tmp / "adapter")
        if state_dict is not None:  # gathered weights: written through an unsharded skeleton
            sd = untie(state_dict, model.config)
            skeleton(model, causal_lm=True).save_pretrained(tmp, state_dict=sd)
        else:
            merged_copy(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if critic is not None:
            (tmp / "critic").mkdir()
            critic.save(tmp / "critic", state_dict=critic_state_dict)
        torch.save(state, tmp / STATE_FILE)  # last: a folder with a state is complete
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def skeleton(model: torch.nn.Module, causal_lm: bool) -> torch.nn.Module:
    """A weightless (meta-device) plain transformers model of ``model``'s config, to write a
    gathered state dict with ``save_pretrained``: the FSDP module itself holds shards, and
    ``save_pretrained`` inspects the module's own parameters (a collective when they are
    DTensors, so rank 0 alone would hang there)."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if causal_lm else AutoModel
    with torch.device("meta"):
        return auto.from_config(model.config)


def untie(state_dict: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """``state_dict`` without the output embedding when the config ties it to the input one
    (what ``save_pretrained`` drops for a live model; a gathered state dict holds both)."""
    if not getattr(config, "tie_word_embeddings", False):
        return state_dict
    heads = [k for k in state_dict if k == "lm_head.weight" or k.endswith(".lm_head.weight")]
    return {k: v for k, v in state_dict.items() if k not in heads}


def begin_checkpoint(out: Path) -> Path:
    """The empty side folder a checkpoint for ``out`` is written into (then renamed)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = side_path(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The ``step-N`` folder with the largest N that has a trainer state, if any (side
    folders never count)."""
    done = step_checkpoints(Path(ckpt_dir))
    return done[-1][1] if done else None


def _legacy_numpy_globals() -> list[Any]:
    """What a numpy RNG key saved as an array (checkpoints written before the key became a
    list) needs: numpy's array reconstructor, ``ndarray`` and the uint32 dtype. They rebuild
    plain arrays only; nothing in them calls other code."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_state(ckpt: Path) -> dict[str, Any]:
    """``trainer_state.pt`` of a checkpoint, read with ``torch.load(weights_only=True)``.

    Only tensors, plain Python values (dicts, lists, tuples, numbers, strings) and, for older
    checkpoints, numpy uint32 arrays are accepted: a file holding anything else (a pickled
    object whose loading would run code) is refused with an Sr1Error and nothing in it runs.
    """
    import pickle

    f = Path(ckpt) / STATE_FILE
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            state = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in reason if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise Sr1Error(
            f"refusing to load {f}: it holds objects other than tensors and plain data"
            + (f" ({detail})" if detail else ""),
            hint="a trainer state written by sr1 never does; the file was altered or comes from "
            "elsewhere. Resume from another checkpoint or start a new run",
        ) from None
    if not isinstance(state, dict):
        raise Sr1Error(f"{f} is not an sr1 trainer state (got {type(state).__name__})")
    return state
