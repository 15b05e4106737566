"""Accelerate/DDP with 2 CPU processes (gloo): parameters stay identical across ranks after
updates on different data, and differ from the initial weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


@pytest.mark.slow
def test_two_gloo_ranks_end_with_identical_parameters(tiny_qwen2: str, tmp_path: Path) -> None:
    worker = Path(__file__).with_name("ddp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[2]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", str(worker), tiny_qwen2, str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank-{r}.pt") for r in (0, 1))
    assert r0["ids"] != r1["ids"]  # the ranks trained on different trajectories
    init = load_file(os.path.join(tiny_qwen2, "model.safetensors"))
    changed = 0
    for name, p0 in r0["params"].items():
        torch.testing.assert_close(p0, r1["params"][name], atol=0, rtol=0, msg=name)
        key = name if name in init else name.removeprefix("module.")
        changed += int(key in init and not torch.equal(p0, init[key]))
    assert changed > 0
