"""trainer.cpu_malloc_cache (sr1.train.allocator): with glibc told to keep freed memory, a
large tensor is carved from the heap (where freed blocks stay for reuse) instead of getting
an mmap of its own (unmapped on free, faulted in again next time). Each case runs in a fresh
process (the settings are for the life of a process). What it buys and costs is measured by
benchmarks/rl_step.py (README)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sr1.train import allocator

PROBE = """
import json, sys
import torch
from sr1.train import allocator
on = allocator.apply(sys.argv[1], "cpu")
x = torch.empty(64 * 2**20, dtype=torch.uint8)  # 64 MiB: past any dynamic mmap threshold
p = x.data_ptr()
where = None
for line in open("/proc/self/maps"):
    lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
    if lo <= p < hi:
        where = line.split()[5] if len(line.split()) > 5 else "anonymous mmap"
print(json.dumps({"on": on, "where": where}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc: Linux")
def test_large_blocks_come_from_the_heap_only_when_asked() -> None:
    assert _probe("always") == {"on": True, "where": "[heap]"}
    assert _probe("auto") == {"on": True, "where": "[heap]"}  # training on CPU
    assert _probe("never") == {"on": False, "where": "anonymous mmap"}


def test_only_cpu_training_gets_it_unless_asked() -> None:
    assert allocator.apply("never", "cpu") is False
    assert allocator.apply("auto", "cuda") is False
