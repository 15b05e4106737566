"""Core RL math: vectorised functions against naive per-sequence loops, masking, registries."""

from __future__ import annotations

import math

import pytest
import torch

from sr1.algos import core
from sr1.config import AlgorithmConfig
from sr1.errors import NotFoundError

SEEDS = [0, 1, 2, 3, 4]
MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def _random_mask(g: torch.Generator, B: int, R: int) -> torch.Tensor:
    """Masks shaped like Search-R1 responses: policy spans, inserted spans, right padding."""
    mask = torch.zeros(B, R)
    for b in range(B):
        length = int(torch.randint(0, R + 1, (1,), generator=g))
        t = 0
        while t < length:
            span = int(torch.randint(1, 5, (1,), generator=g))
            bit = float(torch.rand(1, generator=g) < 0.6)
            mask[b, t : min(t + span, length)] = bit
            t += span
    return mask


def _batch(seed: int, B: int = 6, R: int = 12):
    g = torch.Generator().manual_seed(seed)
    mask = _random_mask(g, B, R)
    rewards = torch.randn(B, R, generator=g)
    values = torch.randn(B, R, generator=g)
    return g, mask, rewards, values


# -- naive references (per sequence, plain Python over the policy tokens) ------------------------
def _policy_positions(mask_row: torch.Tensor) -> list[int]:
    return [t for t in range(mask_row.numel()) if mask_row[t] == 1]


def naive_gae(rewards, values, mask, gamma, lam):
    adv = torch.zeros_like(values)
    for b in range(mask.shape[0]):
        pos = _policy_positions(mask[b])
        last = 0.0
        for i in reversed(range(len(pos))):
            t = pos[i]
            nv = values[b, pos[i + 1]].item() if i + 1 < len(pos) else 0.0
            delta = rewards[b, t].item() + gamma * nv - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def naive_returns(rewards, mask, gamma):
    out = torch.zeros_like(rewards)
    for b in range(mask.shape[0]):
        run = 0.0
        for t in reversed(_policy_positions(mask[b])):
            run = rewards[b, t].item() + gamma * run
            out[b, t] = run
    return out


def naive_group_adv(scores, index, mask, kind, norm_by_std=True, eps=1e-6):
    out = torch.zeros_like(mask)
    for b in range(len(scores)):
        members = [j for j in range(len(scores)) if index[j] == index[b]]
        rs = [scores[j].item() for j in members]
        if len(rs) < 2 or max(rs) == min(rs):
            a = 0.0
        elif kind == "grpo":
            mean = sum(rs) / len(rs)
            std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (len(rs) - 1))
            a = (scores[b].item() - mean) / ((std + eps) if norm_by_std else 1.0)
        else:  # rloo
            others = [scores[j].item() for j in members if j != b]
            a = scores[b].item() - sum(others) / len(others)
        out[b] = a * mask[b]
    return out


def naive_token_mean(loss, mask):
    num = sum(loss[b, t].item() for b in range(mask.shape[0]) for t in _policy_positions(mask[b]))
    return num / max(1, int(mask.sum()))


def naive_seq_mean(loss, mask, token_sum: bool):
    per = []
    for b in range(mask.shape[0]):
        pos = _policy_positions(mask[b])
        if not pos:
            continue
        s = sum(loss[b, t].item() for t in pos)
        per.append(s if token_sum else s / len(pos))
    return sum(per) / max(1, len(per))


# -- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.5)])
def test_gae_matches_loop(seed, gamma, lam):
    _, mask, rewards, values = _batch(seed)
    adv, ret = core.compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, ref_ret, atol=1e-5, rtol=1e-5)
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


def test_gae_bootstraps_across_inserted_tokens():
    # policy tokens at 0,1 then an information block (2..4), then policy tokens 5,6
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0]], dtype=torch.float32)
    values = torch.tensor([[0.1, 0.2, 9.0, 9.0, 9.0, 0.3, 0.4, 9.0]])
    rewards = core.place_outcome_reward(torch.tensor([1.0]), mask)
    assert rewards[0, 6] == 1.0 and rewards.sum() == 1.0
    adv, ret = core.compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # gamma = lam = 1: every policy token's return is the outcome, values at inserted tokens unused
    torch.testing.assert_close(ret[0, [0, 1, 5, 6]], torch.ones(4))
    torch.testing.assert_close(adv[0, [0, 1, 5, 6]], 1.0 - values[0, [0, 1, 5, 6]])
    # lam = 0: token 1's delta bootstraps from the value at token 5 (first policy token after)
    adv0, _ = core.compute_gae(rewards, values, mask, gamma=1.0, lam=0.0)
    assert adv0[0, 1].item() == pytest.approx(0.3 - 0.2)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_loop(seed, gamma):
    _, mask, rewards, _ = _batch(seed)
    ret = core.discounted_returns(rewards, mask, gamma)
    torch.testing.assert_close(ret, naive_returns(rewards, mask, gamma), atol=1e-5, rtol=1e-5)
    adv = core.reinforce_pp_advantage(rewards, mask, gamma)
    vals = [ret[b, t].item() for b in range(mask.shape[0]) for t in _policy_positions(mask[b])]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            want = (ret[b, t].item() - mean) / std if mask[b, t] else 0.0
            assert adv[b, t].item() == pytest.approx(want, abs=1e-4)


def test_outcome_reward_reaches_earlier_turns():
    mask = torch.tensor([[1, 1, 0, 0, 1, 0, 0]], dtype=torch.float32)
    r = core.place_outcome_reward(torch.tensor([2.0]), mask)
    ret = core.discounted_returns(r, mask, gamma=1.0)
    assert ret[0].tolist() == [2.0, 2.0, 0.0, 0.0, 2.0, 0.0, 0.0]


def _groups(g, B, n_groups):
    index = torch.randint(0, n_groups, (B,), generator=g)
    scores = torch.randint(0, 3, (B,), generator=g).float() / 2  # ties are common, like EM
    return index, scores


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_loop(seed, norm_by_std):
    g, mask, _, _ = _batch(seed, B=16)
    index, scores = _groups(g, 16, 4)
    adv = core.grpo_advantage(scores, index, mask, norm_by_std=norm_by_std)
    ref = naive_group_adv(scores, index, mask, "grpo", norm_by_std)
    torch.testing.assert_close(adv, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_rloo_matches_loop(seed):
    g, mask, _, _ = _batch(seed, B=16)
    index, scores = _groups(g, 16, 4)
    adv = core.rloo_advantage(scores, index, mask)
    torch.testing.assert_close(
        adv, naive_group_adv(scores, index, mask, "rloo"), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 0.7, -3.3])
def test_group_advantages_zero_for_equal_rewards(value):
    mask = torch.ones(10, 5)
    index = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    scores = torch.full((10,), value)
    scores[8:] = torch.tensor([0.0, 1.0])  # group 2 differs: nonzero
    for norm in (True, False):
        adv = core.grpo_advantage(scores, index, mask, norm_by_std=norm)
        assert torch.all(adv[:8] == 0), adv
        assert torch.all(adv[8:] != 0)
    assert torch.all(core.rloo_advantage(scores, index, mask)[:8] == 0)
    assert torch.all(core.reinforce_pp_baseline_advantage(scores, index, mask)[:8] == 0)


def test_grpo_singleton_groups_get_zero():
    adv = core.grpo_advantage(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), torch.ones(2, 3))
    assert torch.all(adv == 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_agg_modes_match_loop(seed):
    _, mask, loss, _ = _batch(seed)
    assert core.agg_loss(loss, mask, "token-mean").item() == pytest.approx(
        naive_token_mean(loss, mask), abs=1e-5
    )
    assert core.agg_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(
        naive_seq_mean(loss, mask, True), abs=1e-5
    )
    assert core.agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(
        naive_seq_mean(loss, mask, False), abs=1e-5
    )
    total = naive_token_mean(loss, mask) * max(1, int(mask.sum()))  # sum over policy tokens
    assert core.agg_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(
        total / mask.shape[-1], abs=1e-5
    )


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_sum_to_minibatch_loss(mode):
    _, mask, loss, _ = _batch(7, B=8)
    whole = core.agg_loss(loss, mask, mode)
    d = core.agg_denominator(mask, mode)
    parts = sum(core.agg_loss(loss[i : i + 3], mask[i : i + 3], mode, d) for i in range(0, 8, 3))
    assert parts.item() == pytest.approx(whole.item(), abs=1e-5)


def test_masked_whiten_stats():
    _, mask, x, _ = _batch(3, B=8, R=20)
    w = core.masked_whiten(x, mask)
    assert torch.all(w[mask == 0] == 0)
    assert core.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert core.masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-3)
    assert core.masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # empty mask: 0, not NaN


def naive_ppo(lp, old, adv, mask, cl, ch, c):
    vals = []
    for b in range(mask.shape[0]):
        for t in _policy_positions(mask[b]):
            r = math.exp(lp[b, t].item() - old[b, t].item())
            a = adv[b, t].item()
            loss = max(-a * r, -a * min(max(r, 1 - cl), 1 + ch))
            if c is not None and a < 0:
                loss = min(loss, -a * c)
            vals.append(loss)
    return sum(vals) / max(1, len(vals))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ch,c", [(None, None), (0.28, None), (None, 3.0), (0.28, 3.0)])
def test_ppo_loss_matches_loop(seed, ch, c):
    g, mask, adv, _ = _batch(seed)
    lp = -torch.rand(mask.shape, generator=g) * 3
    old = lp + 0.5 * torch.randn(mask.shape, generator=g)  # ratios well outside the clip range
    loss, m = core.ppo_clip_loss(lp, old, adv, mask, 0.2, ch, c)
    want = naive_ppo(lp, old, adv, mask, 0.2, 0.2 if ch is None else ch, c)
    assert loss.item() == pytest.approx(want, abs=1e-5)
    assert 0.0 < m["actor/pg_clipfrac"] < 1.0
    assert ("actor/pg_clipfrac_lower" in m) == (c is not None)


def test_clip_higher_is_asymmetric():
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    lp = torch.log(torch.tensor([[1.25, 1.25]]))  # ratio 1.25
    adv = torch.ones(1, 2)
    _, sym = core.ppo_clip_loss(lp, old, adv, mask, 0.2, None)
    _, hi = core.ppo_clip_loss(lp, old, adv, mask, 0.2, 0.28)
    assert sym["actor/pg_clipfrac"] == 1.0 and hi["actor/pg_clipfrac"] == 0.0


def test_value_loss_matches_loop():
    g, mask, ret, old = _batch(11)
    v = old + torch.randn(mask.shape, generator=g)
    loss, m = core.value_loss(v, old, ret, mask, clip=0.5)
    vals = []
    for b in range(mask.shape[0]):
        for t in _policy_positions(mask[b]):
            vc = old[b, t].item() + max(-0.5, min(0.5, v[b, t].item() - old[b, t].item()))
            vals.append(
                0.5 * max((v[b, t].item() - ret[b, t].item()) ** 2, (vc - ret[b, t].item()) ** 2)
            )
    assert loss.item() == pytest.approx(sum(vals) / len(vals), abs=1e-5)
    assert set(m) == {"critic/vf_loss", "critic/vf_clipfrac", "critic/vpred_mean"}


def test_kl_estimators():
    g = torch.Generator().manual_seed(0)
    # samples from p; KL(p||q) for two categoricals, estimated from log-probs of the samples
    # k3's variance advantage holds when the policy is near the reference (as in RL fine-tuning)
    z = torch.randn(8, generator=g)
    p = torch.softmax(z, -1)
    q = torch.softmax(z + 0.3 * torch.randn(8, generator=g), -1)
    true_kl = (p * (p.log() - q.log())).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[x], q.log()[x]
    k1 = core.KL_ESTIMATORS.get("k1")(lp, lq)
    k3 = core.KL_ESTIMATORS.get("k3")(lp, lq)
    assert k1.mean().item() == pytest.approx(true_kl, rel=0.05)
    assert k3.mean().item() == pytest.approx(true_kl, rel=0.05)
    assert torch.all(k3 >= 0) and torch.all(core.KL_ESTIMATORS.get("k2")(lp, lq) >= 0)
    assert k3.var().item() < k1.var().item()  # the low-variance estimator
    same = core.kl_k3(lp[:10], lp[:10])
    assert torch.all(same == 0)


def test_entropy_and_logprobs_from_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 50, generator=g)
    labels = torch.randint(0, 50, (3, 4), generator=g)
    ref_lp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(core.logprobs_from_logits(logits, labels), ref_lp)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(core.entropy_from_logits(logits), -(p * p.log()).sum(-1))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss_name", ["vanilla", "gspo"])
def test_gradient_at_retrieved_positions_is_exactly_zero(seed, mode, loss_name):
    g, mask, adv, _ = _batch(seed, B=4, R=10)
    mask[0, :3] = 1  # at least one policy token
    V = 30
    logits = (3 * torch.randn(4, 10, V, generator=g)).requires_grad_(True)
    labels = torch.randint(0, V, (4, 10), generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    old = logp.detach() + 0.3 * torch.randn(4, 10, generator=g)
    ref = logp.detach() + 0.3 * torch.randn(4, 10, generator=g)
    cfg = AlgorithmConfig(loss_agg=mode, dual_clip_c=3.0, clip_ratio_high=0.28)
    pg, _ = core.policy_loss(loss_name, logp, old, adv, mask, cfg)
    kl, _ = core.kl_loss(logp, ref, mask, "k3", mode)
    ent, _ = core.entropy_bonus(core.entropy_from_logits(logits), mask, mode)
    (pg + 0.1 * kl - 0.01 * ent).backward()
    grad = logits.grad
    assert torch.all(grad[mask == 0] == 0)  # exactly, not approximately
    assert torch.any(grad[mask == 1] != 0)


def test_advantage_registry_dispatch():
    g, mask, _, values = _batch(5, B=8)
    index = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    mask[:, 0] = 1
    tr = core.place_outcome_reward(scores, mask)
    cfg = AlgorithmConfig()
    for name in core.ADV_ESTIMATORS.names():
        adv, ret = core.compute_advantages(name, tr, mask, cfg, index=index, values=values)
        assert adv.shape == mask.shape and ret.shape == mask.shape
        assert torch.all(adv[mask == 0] == 0), name
        assert torch.isfinite(adv).all()
    with pytest.raises(ValueError, match="values"):
        core.compute_advantages("gae", tr, mask, cfg, index=index)


@pytest.mark.parametrize(
    "registry,valid",
    [
        (core.ADV_ESTIMATORS, ["gae", "grpo", "reinforce_pp", "rloo"]),
        (core.POLICY_LOSSES, ["gspo", "vanilla"]),
        (core.KL_ESTIMATORS, ["k1", "k2", "k3", "kl", "low_var_kl", "mse"]),
        (core.LOSS_AGG_MODES, MODES),
    ],
)
def test_registry_errors_list_valid_names(registry, valid):
    with pytest.raises(NotFoundError) as e:
        registry.get("nope")
    msg = str(e.value)
    assert "'nope'" in msg
    for name in valid:
        assert name in msg
