"""Parity with verl's ``verl/trainer/ppo/core_algos.py`` where a cross-check found sr1 differing.

The verl expectations are derived here by hand or by a plain-Python re-derivation of verl's
formula (not by importing verl): GSPO's own clip range and aggregation, the [-10, 10] bound on
``low_var_kl`` (k3), mask-0 positions selected out (a NaN there changes nothing), verl's KL
estimator names and the ``seq-mean-token-sum-norm`` aggregation.
"""

from __future__ import annotations

import math

import pytest
import torch

from sr1.algos import core
from sr1.config import AlgorithmConfig
from sr1.errors import NotFoundError

MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


# -- GSPO ------------------------------------------------------------------------------------------
def _gspo_repro():
    """Row 0: four policy tokens, A = +1; row 1: one policy token then padding, A = -1. The
    old policy is 0.1 below the current one everywhere, so each sequence ratio is e^0.1."""
    lp = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-1.0, 0.0, 0.0, 0.0]])
    old = lp - 0.1
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    adv = torch.tensor([[1.0], [-1.0]]) * mask
    return lp, old, adv, mask


def verl_gspo(lp, old, adv, mask, clip_low, clip_high):
    """verl's compute_policy_loss_gspo, re-derived per sequence in plain Python: ratio =
    exp(mean policy-token log-ratio) (log clamped at 10 above), PPO-clipped, and always
    aggregated seq-mean-token-mean (verl ignores loss_agg_mode for GSPO)."""
    per_seq = []
    for b in range(mask.shape[0]):
        pos = [t for t in range(mask.shape[1]) if mask[b, t] == 1]
        if not pos:
            continue
        s = sum(lp[b, t].item() - old[b, t].item() for t in pos) / len(pos)
        r = math.exp(min(s, 10.0))
        losses = []
        for t in pos:
            a = adv[b, t].item()
            losses.append(max(-a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high)))
        per_seq.append(sum(losses) / (len(pos) + 1e-8))
    return sum(per_seq) / len(per_seq)


def test_gspo_registry_uses_gspo_clip_and_aggregation_by_default():
    lp, old, adv, mask = _gspo_repro()
    loss, _ = core.policy_loss("gspo", lp, old, adv, mask, AlgorithmConfig())
    # verl with GSPO's clip range (paper / verl GSPO recipes: clip_ratio_low=3e-4,
    # clip_ratio_high=4e-4): row 0 is clipped to -(1 + 4e-4), row 1 (A < 0, ratio above the
    # range) is not: (e^0.1 - 1.0004) / 2 = 0.0523855. sr1 before the fix: -0.6631 (PPO's 0.2
    # clip, cfg.loss_agg=token-mean: (-4 e^0.1 + e^0.1) / 5).
    want = (math.exp(0.1) - (1 + 4e-4)) / 2
    assert want == pytest.approx(verl_gspo(lp, old, adv, mask, 3e-4, 4e-4), abs=1e-7)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert loss.item() == pytest.approx(0.0523855, abs=1e-6)


def test_gspo_registry_matches_verl_default_clip():
    lp, old, adv, mask = _gspo_repro()
    # verl's default actor config (clip_ratio_low = clip_ratio_high = 0.2): neither row clips,
    # seq-mean-token-mean gives (-e^0.1 + e^0.1) / 2 = 0.0. sr1 before the fix: -0.6631.
    cfg = AlgorithmConfig(clip_ratio_high=0.2)  # explicit clip range 0.2 / 0.2
    loss, _ = core.policy_loss("gspo", lp, old, adv, mask, cfg)
    assert verl_gspo(lp, old, adv, mask, 0.2, 0.2) == pytest.approx(0.0, abs=1e-7)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_gspo_settings_precedence():
    d = AlgorithmConfig()
    assert core.gspo_settings(d) == (3e-4, 4e-4, "seq-mean-token-mean")
    assert core.gspo_settings(AlgorithmConfig(clip_ratio=0.1)) == (0.1, None, "seq-mean-token-mean")
    assert core.gspo_settings(AlgorithmConfig(clip_ratio_high=5e-4)) == (
        d.clip_ratio,
        5e-4,
        "seq-mean-token-mean",
    )
    assert core.gspo_settings(AlgorithmConfig(loss_agg="seq-mean-token-sum"))[2] == (
        "seq-mean-token-sum"
    )
    # the vanilla loss keeps following cfg exactly
    lp, old, adv, mask = _gspo_repro()
    van, _ = core.policy_loss("vanilla", lp, old, adv, mask, d)
    want, _ = core.ppo_clip_loss(lp, old, adv, mask, d.clip_ratio, None, None, "token-mean")
    assert van.item() == pytest.approx(want.item(), abs=1e-7)


def test_gspo_explicit_loss_agg_is_respected():
    lp, old, adv, mask = _gspo_repro()
    cfg = AlgorithmConfig(loss_agg="seq-mean-token-sum")
    loss, _ = core.policy_loss("gspo", lp, old, adv, mask, cfg)
    # GSPO clip, per-sequence token sums: (4 * -(1 + 4e-4) + e^0.1) / 2
    assert loss.item() == pytest.approx((-4 * (1 + 4e-4) + math.exp(0.1)) / 2, abs=1e-6)


def test_gspo_micro_batches_sum_under_token_mean_config():
    """The trainer computes one mini-batch denominator for cfg.loss_agg (token-mean) and hands
    it to every term; GSPO aggregates seq-mean-token-mean, so it needs the sequence count."""
    g = torch.Generator().manual_seed(0)
    B, R = 8, 6
    mask = (torch.rand(B, R, generator=g) < 0.7).float()
    mask[:, 0] = 1
    lp = -torch.rand(B, R, generator=g) * 2
    old = lp + 0.01 * torch.randn(B, R, generator=g)
    adv = torch.randn(B, 1, generator=g) * mask
    cfg = AlgorithmConfig()  # loss_agg token-mean
    whole, _ = core.policy_loss("gspo", lp, old, adv, mask, cfg)
    assert whole.item() == pytest.approx(verl_gspo(lp, old, adv, mask, 3e-4, 4e-4), abs=1e-6)
    d = core.agg_denominator(mask, cfg.loss_agg)
    assert float(d) == mask.sum().item()  # still the token count where a float is expected
    parts = sum(
        core.policy_loss(
            "gspo", lp[i : i + 3], old[i : i + 3], adv[i : i + 3], mask[i : i + 3], cfg, d
        )[0]
        for i in range(0, B, 3)
    )
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


# -- k3 / low_var_kl bound -------------------------------------------------------------------------
def test_k3_is_clamped_like_verl_low_var_kl():
    lp = torch.tensor([-5.0, -1.0, -1.0])
    ref = torch.tensor([-1.0, -14.0, -2.0])
    # unclamped: e^4 - 4 - 1 = 49.598, e^-13 + 13 - 1 = 12.000002 (sr1 before the fix);
    # verl clamps low_var_kl to [-10, 10]; the third is in range: e^-1 + 1 - 1 = 0.3679
    want = [
        min(math.exp(r - p) - (r - p) - 1, 10.0)
        for p, r in zip(lp.tolist(), ref.tolist(), strict=True)
    ]
    assert want[:2] == [10.0, 10.0]
    for name in ("k3", "low_var_kl"):
        torch.testing.assert_close(core.KL_ESTIMATORS.get(name)(lp, ref), torch.tensor(want))
    # past the bound the KL term has no gradient (torch.clamp, as in verl)
    x = lp.clone().requires_grad_(True)
    core.kl_k3(x, ref).sum().backward()
    assert x.grad[0] == 0 and x.grad[1] == 0 and x.grad[2] != 0


# -- mask-0 positions are selected out -------------------------------------------------------------
BAD = [float("nan"), float("inf"), float("-inf")]


def _nan_batch():
    g = torch.Generator().manual_seed(3)
    B, R = 4, 7
    mask = torch.ones(B, R)
    mask[0, 2:4] = 0  # an <information> block
    mask[1, 5:] = 0  # padding
    mask[3, :] = 0  # no policy token at all
    lp = -torch.rand(B, R, generator=g) * 2
    old = lp + 0.2 * torch.randn(B, R, generator=g)
    ref = lp + 0.2 * torch.randn(B, R, generator=g)
    adv = torch.randn(B, R, generator=g)
    return mask, lp, old, ref, adv


def _poison(x: torch.Tensor, mask: torch.Tensor, bad: float) -> torch.Tensor:
    y = x.clone()
    y[0, 2] = bad
    y[1, 6] = bad
    y[3, 0] = bad
    assert torch.all(mask[y != y] == 0) and mask[0, 2] == 0 and mask[1, 6] == 0
    return y


@pytest.mark.parametrize("bad", BAD)
def test_masked_stats_ignore_nonfinite_at_mask0(bad):
    mask, x, _, _, _ = _nan_batch()
    xb = _poison(x, mask, bad)
    for f in (core.masked_sum, core.masked_mean):
        assert f(xb, mask).item() == pytest.approx(f(x, mask).item(), abs=1e-6)
        torch.testing.assert_close(f(xb, mask, -1), f(x, mask, -1))
    assert core.masked_var(xb, mask).item() == pytest.approx(core.masked_var(x, mask).item())
    torch.testing.assert_close(core.masked_whiten(xb, mask), core.masked_whiten(x, mask))
    for mode in MODES:
        got = core.agg_loss(xb, mask, mode)
        assert torch.isfinite(got), mode
        assert got.item() == pytest.approx(core.agg_loss(x, mask, mode).item(), abs=1e-6), mode


def _losses(lp, old, ref, adv, mask, mode):
    cfg = AlgorithmConfig(loss_agg=mode, dual_clip_c=3.0, clip_ratio_high=0.28)
    out = {}
    for name in ("vanilla", "gspo"):
        out[name] = core.policy_loss(name, lp, old, adv, mask, cfg)[0]
    out["kl"] = core.kl_loss(lp, ref, mask, "k3", mode)[0]
    out["entropy"] = core.entropy_bonus(-lp, mask, mode)[0]
    out["value"] = core.value_loss(lp, old, adv, mask, 0.5, mode)[0]
    return out


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["logprobs", "old", "ref", "adv"])
def test_losses_and_grads_ignore_nonfinite_at_mask0(bad, mode, where):
    mask, lp, old, ref, adv = _nan_batch()
    clean = {k: v.detach() for k, v in _losses(lp, old, ref, adv, mask, mode).items()}
    inputs = {"logprobs": lp, "old": old, "ref": ref, "adv": adv}
    inputs[where] = _poison(inputs[where], mask, bad)
    for name in clean:
        x = inputs["logprobs"].clone().requires_grad_(True)
        loss = _losses(x, inputs["old"], inputs["ref"], inputs["adv"], mask, mode)[name]
        assert torch.isfinite(loss), name
        assert loss.item() == pytest.approx(clean[name].item(), abs=1e-6), name
        loss.backward()
        assert torch.isfinite(x.grad).all(), name
        assert torch.all(x.grad[mask == 0] == 0), name
        x0 = lp.clone().requires_grad_(True)
        _losses(x0, old, ref, adv, mask, mode)[name].backward()
        torch.testing.assert_close(x.grad, x0.grad)


@pytest.mark.parametrize("bad", BAD)
def test_advantages_ignore_nonfinite_at_mask0(bad):
    mask, _, _, _, _ = _nan_batch()
    g = torch.Generator().manual_seed(5)
    values = torch.randn(mask.shape, generator=g)
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0])
    tr = core.place_outcome_reward(scores, mask)
    index = torch.tensor([0, 0, 1, 1])
    cfg = AlgorithmConfig(gamma=0.9, lam=0.8)
    kl = core.kl_penalty(values, _poison(values, mask, bad), mask, "k3")
    assert torch.isfinite(kl).all() and torch.all(kl[mask == 0] == 0)
    for name in core.ADV_ESTIMATORS.names():
        want = core.compute_advantages(name, tr, mask, cfg, index=index, values=values)
        got = core.compute_advantages(
            name,
            _poison(tr, mask, bad),
            mask,
            cfg,
            index=index,
            values=_poison(values, mask, bad),
        )
        for w, x in zip(want, got, strict=True):
            torch.testing.assert_close(x, w, msg=name)


# -- verl's names ------------------------------------------------------------------------------------
@pytest.mark.parametrize("alias,name", [("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")])
def test_verl_kl_names_are_aliases(alias, name):
    assert core.KL_ESTIMATORS.get(alias) is core.KL_ESTIMATORS.get(name)
    mask, lp, _, ref, _ = _nan_batch()
    a, _ = core.kl_loss(lp, ref, mask, alias)
    b, _ = core.kl_loss(lp, ref, mask, name)
    assert a.item() == b.item()


@pytest.mark.parametrize("name", ["abs", "k3+", "low_var_kl+", "full"])
def test_verl_kl_names_sr1_lacks_stay_loud(name):
    with pytest.raises(NotFoundError) as e:
        core.KL_ESTIMATORS.get(name)
    for valid in ("k1", "k2", "k3", "kl", "mse", "low_var_kl"):
        assert valid in str(e.value)


def test_seq_mean_token_sum_norm_matches_verl():
    g = torch.Generator().manual_seed(1)
    B, R = 5, 9
    mask = (torch.rand(B, R, generator=g) < 0.6).float()
    mask[2] = 0  # a sequence with no policy token contributes 0
    loss = torch.randn(B, R, generator=g)
    # verl: sum over sequences of sum(loss * mask) / loss_scale_factor (default R)
    total = sum(loss[b, t].item() for b in range(B) for t in range(R) if mask[b, t] == 1)
    mode = "seq-mean-token-sum-norm"
    assert core.agg_loss(loss, mask, mode).item() == pytest.approx(total / R, abs=1e-5)
    assert core.agg_loss(loss, mask, mode, 4096).item() == pytest.approx(total / 4096, abs=1e-7)
    d = core.agg_denominator(mask, mode, norm=4096)
    assert float(d) == 4096.0 and d.tokens == mask.sum().item()
    assert float(core.agg_denominator(mask, mode)) == R
    with pytest.raises(ValueError, match="positive"):
        core.agg_loss(loss, mask, mode, 0.0)


def test_agg_denominator_works_for_every_mode():
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    want = {"token-mean": 3.0, "seq-mean-token-sum": 2.0, "seq-mean-token-mean": 2.0}
    want["seq-mean-token-sum-norm"] = 3.0
    for made_for in MODES:
        d = core.agg_denominator(mask, made_for)
        assert float(d) == want[made_for]
        for mode in MODES:
            assert d.for_mode(mode) == want[mode]
    with pytest.raises(NotFoundError, match="seq-mean-token-sum-norm"):
        core.agg_denominator(mask, "seq-sum")
