"""Checkpoint folders under kills: leftovers of a dead writer are cleaned on the next start,
old checkpoints are pruned so that no half-deleted one is ever resumed from.

The faults are real: a subprocess saving / pruning / copying checkpoints SIGKILLs itself at a
chosen point (the functions are the real ones; only a hook that kills is patched in). The
model and tokenizer there are stand-ins that write files, so each kill costs a second.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sr1.models import load_tokenizer
from sr1.train.checkpoint import (
    STATE_FILE,
    _host_tag,
    clean_stale,
    latest_checkpoint,
    load_state,
    prune_checkpoints,
    side_path,
    step_checkpoints,
)
from sr1.train.trainer import train

from .helpers import build_tiny_index, rows, tiny_cfg

torch.set_num_threads(1)

WRITER = r"""
import os, shutil, signal, sys
from pathlib import Path
from sr1.train import checkpoint as C

mode, d = sys.argv[1], Path(sys.argv[2])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

class Model:
    def save_pretrained(self, out):
        Path(out, "model.safetensors").write_bytes(b"w" * 1000)

class Tok:
    def __init__(self, kill=False):
        self.kill = kill
    def save_pretrained(self, out):
        Path(out, "tokenizer.json").write_text("{}")
        if self.kill:
            die()  # mid-write: weights are there, the trainer state is not

def save(step, tok=None):
    C.save_checkpoint(d / f"step-{step}", Model(), tok or Tok(), {"step": step})

if mode == "setup":
    for s in (1, 2, 3):
        save(s)
elif mode == "write":
    save(4, Tok(kill=True))
elif mode == "swap":  # re-save step-3: die between moving the old one aside and the new in
    real = os.replace
    def replace(a, b):
        real(a, b)
        if ".old-" in str(b):
            die()
    C.os.replace = replace
    save(3)
elif mode == "prune":  # die while the pruned checkpoint's files are being deleted
    real = shutil.rmtree
    def rmtree(p, *a, **k):
        if ".trash-" in str(p) and Path(p).exists():
            die()
        return real(p, *a, **k)
    C.shutil.rmtree = rmtree
    C.prune_checkpoints(d, 1)  # step-3 is aside: step-1 and step-2 count, step-1 goes
elif mode == "final":  # die while copying the last checkpoint to final
    def link(a, b):
        die()
    C.os.link = link
    C.link_copy(d / "step-3", d / "final")
"""


def _writer(tmp_path: Path, mode: str, d: Path) -> int:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.run([sys.executable, str(script), mode, str(d)], capture_output=True)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.decode()[-2000:]
    return proc.returncode


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_killed_writers_leave_nothing_resumable_and_are_cleaned(tmp_path: Path) -> None:
    d = tmp_path / "checkpoints"
    assert _writer(tmp_path, "setup", d) == 0
    assert _names(d) == ["step-1", "step-2", "step-3"]

    # 1. killed mid-write: a hidden tmp folder without a state; step-3 is still the latest
    assert _writer(tmp_path, "write", d) == -signal.SIGKILL
    (tmp,) = [n for n in _names(d) if ".tmp-" in n]
    assert tmp.startswith(".step-4.tmp-") and not (d / tmp / STATE_FILE).exists()
    assert latest_checkpoint(d) == d / "step-3"

    # 2. killed between the two renames of a re-save: step-3 is gone from its place for now
    assert _writer(tmp_path, "swap", d) == -signal.SIGKILL
    assert not (d / "step-3").exists() and latest_checkpoint(d) == d / "step-2"

    # 3. killed while deleting a pruned checkpoint: it is already out of sight
    assert _writer(tmp_path, "prune", d) == -signal.SIGKILL
    assert "step-1" not in _names(d) and any(".step-1.trash-" in n for n in _names(d))
    assert latest_checkpoint(d) == d / "step-2"

    # 4. killed while copying to final: no final, a hidden tmp
    (d / "step-3").mkdir()  # stand-in source for the copy (restored for real below)
    (d / "step-3" / "x").write_text("x")
    assert _writer(tmp_path, "final", d) == -signal.SIGKILL
    assert not (d / "final").exists() and any(".final.tmp-" in n for n in _names(d))
    (d / "step-3" / "x").unlink()
    (d / "step-3").rmdir()

    # a side folder whose writer is alive (this process) is left alone
    mine = side_path(d / "step-9", "tmp")
    mine.mkdir()
    done = clean_stale(d)
    assert any(line.startswith("restored step-3") for line in done), done
    assert _names(d) == [mine.name, "step-2", "step-3"]
    assert load_state(latest_checkpoint(d))["step"] == 3  # the previous step-3, intact
    mine.rmdir()
    assert clean_stale(d) == []


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    for s in (2, 10, 11, 3):
        (d / f"step-{s}").mkdir(parents=True)
        torch.save({"step": s}, d / f"step-{s}" / STATE_FILE)
    (d / "final").mkdir()
    (d / "step-1").mkdir()  # no state: not a checkpoint, never touched
    assert prune_checkpoints(d, 0) == [] and len(step_checkpoints(d)) == 4
    assert prune_checkpoints(d, 2) == ["step-2", "step-3"]
    assert _names(d) == ["final", "step-1", "step-10", "step-11"]


@pytest.fixture
def setup(tiny_qwen2, tmp_path):
    index = build_tiny_index(tmp_path)
    short = ["rollout.max_response_length=4", "rollout.max_total_response_length=24",
             "rollout.max_obs_length=12", "rollout.max_prompt_length=24",
             "trainer.micro_batch_size=4", "algorithm.kl_coef=0"]  # fmt: skip
    cfg = tiny_cfg(
        "grpo",
        f"retrieval.index={index}",
        "trainer.save_every=1",
        "trainer.keep_checkpoints=2",
        *short,
    )
    return cfg, rows(load_tokenizer(tiny_qwen2))


def test_training_keeps_two_plus_final_and_resumes_from_the_newest(
    tiny_qwen2: str, setup, sr1_home: Path
) -> None:
    cfg, data = setup
    part = train(cfg, "grpo", tiny_qwen2, max_steps=3, progress=False, rows=data)
    ck = sr1_home / "runs" / part["run_id"] / "checkpoints"
    assert _names(ck) == ["final", "step-2", "step-3"]
    # a dead writer's leftover next to them is removed when the run resumes
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale = ck / f".step-4.tmp-{_host_tag()}-{dead}"
    stale.mkdir()
    res = train(cfg, "", "", resume=part["run_id"], max_steps=4, progress=False, rows=data)
    assert res["start_step"] == 3 and [s["step"] for s in res["steps"]] == [4]
    assert _names(ck) == ["final", "step-3", "step-4"]
    assert load_state(ck / "final")["step"] == 4
    assert os.path.samefile(ck / "final" / STATE_FILE, ck / "step-4" / STATE_FILE)  # hard links
