"""Bootstrap intervals and the paired permutation test: determinism and known answers."""

from __future__ import annotations

import numpy as np
import pytest

from sr1.report.stats import bootstrap_ci, bootstrap_ci_of_average, paired_test


def test_bootstrap_ci_is_seeded_and_matches_the_normal_approximation() -> None:
    x = [1.0] * 200 + [0.0] * 200  # mean 0.5, n 400: normal 95% half-width 1.96*0.025 = 0.049
    lo, hi = bootstrap_ci(x, n_boot=4000, seed=3)
    assert bootstrap_ci(x, n_boot=4000, seed=3) == (lo, hi)
    assert bootstrap_ci(x, n_boot=4000, seed=4) != (lo, hi)
    assert lo == pytest.approx(0.451, abs=0.01) and hi == pytest.approx(0.549, abs=0.01)
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert bootstrap_ci([]) is None


def test_ci_of_average_is_narrower_than_its_parts() -> None:
    rng = np.random.default_rng(0)
    g1 = (rng.random(300) < 0.3).astype(float)
    g2 = (rng.random(300) < 0.7).astype(float)
    lo, hi = bootstrap_ci_of_average([g1, g2], n_boot=2000)
    assert lo < (g1.mean() + g2.mean()) / 2 < hi
    l1, h1 = bootstrap_ci(g1, n_boot=2000)
    assert hi - lo < h1 - l1


def test_paired_test_detects_a_real_difference_and_not_a_null_one() -> None:
    rng = np.random.default_rng(1)
    a = (rng.random(500) < 0.4).astype(float)
    b = a.copy()
    flip = rng.choice(500, 60, replace=False)
    b[flip] = 1.0  # b gains on up to 60 examples
    t = paired_test(a, b, n_boot=1000, n_perm=2000)
    assert t["diff"] == pytest.approx(b.mean() - a.mean())
    assert t["p_value"] < 0.001 and t["ci"][0] > 0
    assert t["a_better"] == 0 and t["b_better"] == int((b > a).sum())
    same = paired_test(a, a)
    assert same["p_value"] == 1.0 and same["diff"] == 0.0 and same["ties"] == 500
    noise = paired_test(a, rng.permutation(a), n_perm=2000)
    assert noise["p_value"] > 0.05
    with pytest.raises(ValueError, match="differ in length"):
        paired_test([1.0], [1.0, 0.0])
    assert paired_test([], [])["n"] == 0
