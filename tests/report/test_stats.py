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


def test_paired_test_on_binary_scores_is_the_exact_sign_test() -> None:
    """0/1 EM on 40 questions: B gains 9, loses 2, 29 ties. Flipping the sign of each paired
    difference makes the number of +1s among the 11 non-zero ones Binomial(11, 1/2), so the
    permutation p-value estimates the exact two-sided sign (McNemar) test:
    P(|X - 5.5| >= 3.5) = 2 * (C(11,0) + C(11,1) + C(11,2)) / 2**11 = 2 * 67 / 2048."""
    a = [0.0] * 9 + [1.0] * 2 + [1.0] * 15 + [0.0] * 14  # (40,)
    b = [1.0] * 9 + [0.0] * 2 + [1.0] * 15 + [0.0] * 14  # (40,)
    t = paired_test(a, b, n_boot=2000, n_perm=40000, seed=0)
    assert t["n"] == 40 and t["b_better"] == 9 and t["a_better"] == 2 and t["ties"] == 29
    assert t["mean_a"] == pytest.approx(17 / 40) and t["mean_b"] == pytest.approx(24 / 40)
    assert t["diff"] == pytest.approx(7 / 40)
    exact = 2 * (1 + 11 + 55) / 2**11  # 0.0654296875
    assert t["p_value"] == pytest.approx(exact, abs=0.006)  # Monte Carlo sd ~0.0012
    try:
        from scipy.stats import binomtest
    except ImportError:
        pass
    else:
        assert binomtest(9, 11, 0.5).pvalue == pytest.approx(exact)
    # paired bootstrap of the mean difference: normal width 2 * 1.96 * sd(d) / sqrt(n) = 0.306
    lo, hi = t["ci"]
    sd = ((11 / 40 - (7 / 40) ** 2) * 40 / 39) ** 0.5
    assert lo < 7 / 40 < hi and hi - lo == pytest.approx(2 * 1.96 * sd / 40**0.5, abs=0.03)
