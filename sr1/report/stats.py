"""Uncertainty for eval numbers: seeded bootstrap intervals and paired tests between two runs.

All functions are pure numpy over per-example scores (0/1 EM, or F1 in [0, 1]) and take an
explicit ``seed`` so a report is reproducible bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float] | None:
    """Percentile bootstrap (1 - alpha) interval of the mean; None for an empty sample."""
    x = np.asarray(values, dtype=np.float64)  # (N,)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))  # (B, N)
    means = x[idx].mean(axis=1)  # (B,)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci_of_average(
    groups: Sequence[Sequence[float]], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float] | None:
    """Interval of the unweighted mean of per-group means (the paper's Avg over datasets).

    Each group (dataset) is resampled independently, then the group means are averaged.
    """
    arrays = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not arrays:
        return None
    rng = np.random.default_rng(seed)
    acc = np.zeros(n_boot)  # (B,)
    for x in arrays:
        idx = rng.integers(0, x.size, size=(n_boot, x.size))  # (B, N_g)
        acc += x[idx].mean(axis=1)
    acc /= len(arrays)
    lo, hi = np.quantile(acc, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_test(
    a: Sequence[float],
    b: Sequence[float],
    n_boot: int = 1000,
    n_perm: int = 10000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Compare two runs on the same examples (``a[i]`` and ``b[i]`` score example i).

    Returns ``n``, ``mean_a``, ``mean_b``, ``diff`` (b - a), ``ci`` (paired bootstrap interval
    of the diff), ``p_value`` (two-sided paired permutation test: randomly swap each pair,
    i.e. flip the sign of each per-example difference), ``b_better`` / ``a_better`` (examples
    where one scores higher) and ``ties``.
    """
    xa = np.asarray(a, dtype=np.float64)  # (N,)
    xb = np.asarray(b, dtype=np.float64)  # (N,)
    if xa.shape != xb.shape:
        raise ValueError(f"paired samples differ in length: {xa.size} vs {xb.size}")
    n = int(xa.size)
    if n == 0:
        return {
            "n": 0,
            "mean_a": None,
            "mean_b": None,
            "diff": None,
            "ci": None,
            "p_value": None,
            "b_better": 0,
            "a_better": 0,
            "ties": 0,
        }
    d = xb - xa  # (N,)
    obs = float(d.mean())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # (B, N)
    boot = d[idx].mean(axis=1)  # (B,)
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    if np.all(d == 0):
        p = 1.0
    else:
        hits = 0
        chunk = max(1, min(n_perm, 2_000_000 // n))
        done = 0
        while done < n_perm:
            m = min(chunk, n_perm - done)
            signs = rng.integers(0, 2, size=(m, n)) * 2 - 1  # (m, N) in {-1, +1}
            perm = (signs * d).mean(axis=1)  # (m,)
            hits += int(np.sum(np.abs(perm) >= abs(obs) - 1e-12))
            done += m
        p = (hits + 1) / (n_perm + 1)
    return {
        "n": n,
        "mean_a": float(xa.mean()),
        "mean_b": float(xb.mean()),
        "diff": obs,
        "ci": [float(lo), float(hi)],
        "p_value": float(p),
        "b_better": int(np.sum(d > 0)),
        "a_better": int(np.sum(d < 0)),
        "ties": int(np.sum(d == 0)),
    }
