"""Pure RL math: masked statistics, advantage estimators, policy/value/KL losses, entropy.

Every function takes the loss mask as a required argument. Shapes: ``B`` trajectories,
``R`` padded response length, ``V`` vocabulary. ``mask[b, t] == 1`` iff response token t of
trajectory b was sampled by the policy; 0 for tokens the environment inserted
(``<information>`` blocks, invalid-action notices) and for padding. Masks are 0/1 tensors.

Multi-turn choices (deliberate; Search-R1's fork differs):

- GAE and REINFORCE++ returns run over the *policy tokens only*: a mask-0 position is
  skipped, so the value of the last token before an ``<information>`` block bootstraps from
  the value at the first policy token after it, and the outcome reward at the end reaches
  every earlier turn. Rewards placed on mask-0 positions are ignored; advantages and
  returns there are exactly 0. (Search-R1 runs GAE over every response position, using
  critic values at retrieved tokens; verl's REINFORCE++ resets the return at mask-0
  positions, which would cut earlier turns off from the outcome reward.) The discount
  ``gamma`` counts policy tokens only.
- GRPO/RLOO advantages are exactly 0 for groups whose rewards are all equal and for
  singleton groups (nothing to compare against).
- Log-ratios are clamped to [-20, 20] before ``exp`` so no position can produce inf/NaN
  gradients, which keeps the gradient at mask-0 positions exactly zero.
- Mask-0 positions are *selected out* (``torch.where``), never multiplied by 0: a NaN/inf
  there (a ``-inf`` reference log-prob of an inserted token, garbage in padding) changes
  neither a loss nor its gradient. Losses select their inputs before any arithmetic, so the
  backward pass never forms ``0 * nan`` either.

Losses return ``(scalar, metrics)`` with namespaced float metrics (``actor/pg_clipfrac``).
Aggregation over tokens/sequences lives in :func:`agg_loss` only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sr1.config import AlgorithmConfig
from sr1.registry import Registry

Tensor = torch.Tensor
_LOG_RATIO_CLAMP = 20.0


# -- masked statistics ---------------------------------------------------------------------------
def masked_fill_zero(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` where ``mask`` is 1, exactly 0 elsewhere (NaN/inf there included); same shape.

    Selection, not ``x * mask``: ``nan * 0`` is NaN, and the gradient to mask-0 entries is
    exactly 0 (no ``0 * nan`` in the backward pass)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is 1. ``x``, ``mask``: same shape; ``dim`` None = all.

    Values at mask-0 entries are ignored, even NaN/inf (see :func:`masked_fill_zero`)."""
    xm = masked_fill_zero(x, mask)
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over mask-1 entries; 0 where the mask is all zero (never NaN)."""
    m = mask.to(x.dtype)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all mask-1 entries (scalar)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * n / (n - 1).clamp(min=1.0)
    return var


Reduce = Callable[[Tensor], Tensor]
"""Sums a tensor over every data-parallel rank (all-reduce SUM); what makes batch statistics
global when each rank holds a part of the batch. None means this process holds the whole batch."""


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    reduce: Reduce | None = None,
) -> Tensor:
    """Normalise ``x`` (any shape) to zero mean, unit variance over mask-1 entries.

    Mask-0 entries come back exactly 0. ``shift_mean=False`` keeps the original mean.
    ``reduce`` (data parallelism): mean and variance are over the mask-1 entries of every
    rank's ``x``, as if one process held the whole batch (verl whitens on the driver).
    """
    if reduce is None:
        mean = masked_mean(x, mask)
        var = masked_var(x, mask)
    else:
        m = mask.to(x.dtype)
        s = reduce(torch.stack([masked_sum(x, mask), m.sum()]))  # (2,) global Σx, n
        n = s[1].clamp(min=1.0)
        mean = s[0] / n
        sq = reduce(masked_sum((x - mean) ** 2, mask).reshape(1))[0]
        var = sq / n * n / (n - 1).clamp(min=1.0)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return masked_fill_zero(out, mask)


# -- aggregation (the one place token-mean vs sequence-mean is decided) ---------------------------
class AggDenom(float):
    """Mini-batch normalisers for :func:`agg_loss`, as made by :func:`agg_denominator`.

    A ``float`` equal to the normaliser of the mode it was made for, so it goes wherever a float
    ``denom`` goes, that also carries the normaliser of every mode: ``tokens`` (policy tokens;
    token-mean), ``seqs`` (sequences with a policy token; seq-mean-*) and ``norm`` (the constant
    of seq-mean-token-sum-norm). :func:`agg_loss` takes the one for the mode it aggregates
    with, so a loss with its own mode (GSPO's ``seq-mean-token-mean`` under
    ``loss_agg=token-mean``) still gets a mini-batch normaliser that fits it.
    """

    __slots__ = ("tokens", "seqs", "norm", "kind")

    def __new__(
        cls, value: float, *, tokens: float, seqs: float, norm: float, kind: str = "tokens"
    ) -> AggDenom:
        self = super().__new__(cls, value)
        self.tokens, self.seqs, self.norm = float(tokens), float(seqs), float(norm)
        self.kind = kind  # which count the value is: tokens, seqs or norm
        return self

    def __getnewargs_ex__(self) -> tuple[tuple[float], dict[str, Any]]:  # pickle, copy
        kw = {"tokens": self.tokens, "seqs": self.seqs, "norm": self.norm, "kind": self.kind}
        return (float(self),), kw

    def with_counts(self, tokens: float, seqs: float) -> AggDenom:
        """The same normaliser kind with other token/sequence counts (summed over ranks)."""
        counts = {"tokens": float(tokens), "seqs": float(seqs), "norm": self.norm}
        return AggDenom(counts[self.kind], kind=self.kind, **{k: counts[k] for k in counts})

    def for_mode(self, mode: str) -> float:
        """The normaliser ``mode`` uses (a registered name or alias)."""
        return float(getattr(self, _DENOM_KIND[_canonical_agg(mode)]))


LOSS_AGG_MODES: Registry[Callable[[Tensor, Tensor, float | None], Tensor]] = Registry(
    "loss aggregation mode"
)
# which AggDenom field each mode divides by
_DENOM_KIND = {
    "token-mean": "tokens",
    "seq-mean-token-sum": "seqs",
    "seq-mean-token-mean": "seqs",
    "seq-mean-token-sum-norm": "norm",
}


def _canonical_agg(mode: str) -> str:
    fn = LOSS_AGG_MODES.get(mode)  # loud on unknown modes
    return next(name for name in _DENOM_KIND if LOSS_AGG_MODES.get(name) is fn)


@LOSS_AGG_MODES.register("token-mean")
def _agg_token_mean(loss_mat: Tensor, mask: Tensor, denom: float | None) -> Tensor:
    total = masked_sum(loss_mat, mask)
    d = mask.to(loss_mat.dtype).sum().clamp(min=1.0) if denom is None else max(denom, 1.0)
    return total / d


def _seq_agg(per_seq: Tensor, mask: Tensor, denom: float | None) -> Tensor:
    has = mask.sum(-1) > 0  # (B,) sequences with any policy token
    d = has.sum().to(per_seq.dtype).clamp(min=1.0) if denom is None else max(denom, 1.0)
    return masked_fill_zero(per_seq, has).sum() / d


@LOSS_AGG_MODES.register("seq-mean-token-sum")
def _agg_seq_mean_token_sum(loss_mat: Tensor, mask: Tensor, denom: float | None) -> Tensor:
    return _seq_agg(masked_sum(loss_mat, mask, -1), mask, denom)


@LOSS_AGG_MODES.register("seq-mean-token-mean")
def _agg_seq_mean_token_mean(loss_mat: Tensor, mask: Tensor, denom: float | None) -> Tensor:
    return _seq_agg(masked_mean(loss_mat, mask, -1), mask, denom)


@LOSS_AGG_MODES.register("seq-mean-token-sum-norm")
def _agg_seq_mean_token_sum_norm(loss_mat: Tensor, mask: Tensor, denom: float | None) -> Tensor:
    # Dr. GRPO / verl: sum over sequences of the token sums, / a constant (not the batch size)
    norm = float(mask.shape[-1]) if denom is None else denom
    if norm <= 0:
        raise ValueError(f"seq-mean-token-sum-norm needs a positive normaliser, got {norm}")
    return masked_sum(loss_mat, mask) / norm


def agg_loss(
    loss_mat: Tensor, mask: Tensor, mode: str, denom: float | AggDenom | None = None
) -> Tensor:
    """Reduce a per-token loss ``(B, R)`` to a scalar; ``mask`` ``(B, R)``.

    Modes: ``token-mean`` (Σ loss·mask / Σ mask; DAPO/GSPO style), ``seq-mean-token-sum``,
    ``seq-mean-token-mean`` (sequences without policy tokens do not count), and
    ``seq-mean-token-sum-norm`` (Dr. GRPO; verl's mode of that name): Σ over sequences of each
    sequence's token sum, divided by a *constant* normaliser ``denom`` (verl's
    ``loss_scale_factor``), not by the number of tokens or sequences; ``denom=None`` means the
    padded length ``R = mask.shape[-1]`` (verl's default). Pass a fixed value (e.g. the maximum
    response length) for a normaliser that stays the same over training.

    For the other modes ``denom`` replaces the local normaliser (tokens for token-mean,
    sequences for seq-mean-*) with the mini-batch total from :func:`agg_denominator`, so
    micro-batch losses *sum* to the mini-batch loss under gradient accumulation. An
    :class:`AggDenom` supplies the normaliser for ``mode`` whatever mode it was made for.
    """
    if isinstance(denom, AggDenom):
        denom = denom.for_mode(mode)
    return LOSS_AGG_MODES.get(mode)(loss_mat, mask, denom)


def agg_denominator(mask: Tensor, mode: str, norm: float | None = None) -> AggDenom:
    """The normalisers :func:`agg_loss` uses for the (mini-batch) ``mask`` ``(B, R)``.

    The value (a float) is the one for ``mode``; the others ride along (see :class:`AggDenom`).
    ``norm`` is seq-mean-token-sum-norm's constant; None = ``R``, the padded length of ``mask``.
    """
    counts = {
        "tokens": float(mask.sum()),
        "seqs": float((mask.sum(-1) > 0).sum()),
        "norm": float(mask.shape[-1]) if norm is None else float(norm),
    }
    kind = _DENOM_KIND[_canonical_agg(mode)]
    return AggDenom(counts[kind], kind=kind, **counts)


# -- rewards on tokens -------------------------------------------------------------------------
def place_outcome_reward(scores: Tensor, mask: Tensor) -> Tensor:
    """Token-level rewards ``(B, R)`` with each outcome score ``(B,)`` on the trajectory's last
    policy token (the last mask-1 position). Trajectories with no policy token get none."""
    B, R = mask.shape
    pos = torch.arange(R, device=mask.device).expand(B, R)
    last = torch.where(mask.bool(), pos, -1).max(-1).values  # (B,)
    out = torch.zeros(B, R, dtype=scores.dtype, device=scores.device)
    has = last >= 0
    out[has.nonzero().squeeze(-1), last[has]] = scores[has]
    return out


# -- advantage estimators ----------------------------------------------------------------------
def compute_gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE over policy tokens only. All inputs ``(B, R)``; returns ``(advantages, returns)``,
    both ``(B, R)`` and exactly 0 at mask-0 positions (not whitened).

    The recursion skips mask-0 positions: ``next_value`` and the running GAE are carried
    across inserted tokens unchanged, and the value after the last policy token is 0.
    """
    B, R = mask.shape
    m = mask.bool()
    adv = torch.zeros_like(values)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    running = torch.zeros_like(next_value)
    for t in reversed(range(R)):
        mt = m[:, t]  # (B,)
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        gae = delta + gamma * lam * running
        next_value = torch.where(mt, values[:, t], next_value)
        running = torch.where(mt, gae, running)
        adv[:, t] = masked_fill_zero(gae, mt)
    returns = masked_fill_zero(adv + values, m)
    return adv, returns


def _group_stats(scores: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-trajectory (group mean, unbiased group std, group size, group is constant), ``(B,)``."""
    _, inv, counts = torch.unique(index, return_inverse=True, return_counts=True)
    G = counts.numel()
    s = scores.to(torch.float64)
    sums = torch.zeros(G, dtype=s.dtype, device=s.device).index_add_(0, inv, s)
    mean = sums / counts
    sq = torch.zeros_like(sums).index_add_(0, inv, (s - mean[inv]) ** 2)
    std = torch.sqrt(sq / (counts - 1).clamp(min=1))
    gmax = torch.full_like(sums, -torch.inf).scatter_reduce(0, inv, s, "amax")
    gmin = torch.full_like(sums, torch.inf).scatter_reduce(0, inv, s, "amin")
    const = gmax == gmin
    return mean[inv], std[inv], counts[inv].to(s.dtype), const[inv]


def grpo_advantage(
    scores: Tensor, index: Tensor, mask: Tensor, norm_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO group-normalised outcome advantage ``(B, R)``: ``(r - mean_g) / (std_g + eps)``
    (or ``r - mean_g`` without std scaling) broadcast over policy tokens.

    ``scores`` ``(B,)`` outcome rewards; ``index`` ``(B,)`` group ids (same prompt = same id);
    ``mask`` ``(B, R)``. Groups with all-equal rewards (and singletons) get exactly 0.
    """
    mean, std, _, const = _group_stats(scores, index)
    a = scores.to(torch.float64) - mean
    if norm_by_std:
        a = a / (std + eps)
    a = torch.where(const, torch.zeros_like(a), a).to(scores.dtype)  # (B,)
    return a[:, None] * mask.to(scores.dtype)


def rloo_advantage(scores: Tensor, index: Tensor, mask: Tensor) -> Tensor:
    """RLOO: ``r_i - mean_{j != i in group} r_j`` broadcast over policy tokens, ``(B, R)``.

    ``scores`` ``(B,)``, ``index`` ``(B,)`` group ids, ``mask`` ``(B, R)``. Singleton and
    constant groups get exactly 0.
    """
    mean, _, n, const = _group_stats(scores, index)
    s = scores.to(torch.float64)
    baseline = (mean * n - s) / (n - 1).clamp(min=1)
    a = torch.where(const | (n < 2), torch.zeros_like(s), s - baseline).to(scores.dtype)
    return a[:, None] * mask.to(scores.dtype)


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go over policy tokens only, ``(B, R)``; mask-0 positions are skipped (their
    rewards ignored, the running return carried across them) and come back 0."""
    B, R = mask.shape
    m = mask.bool()
    out = torch.zeros_like(token_rewards)
    running = torch.zeros(B, dtype=token_rewards.dtype, device=token_rewards.device)
    for t in reversed(range(R)):
        mt = m[:, t]  # (B,)
        running = torch.where(mt, token_rewards[:, t] + gamma * running, running)
        out[:, t] = masked_fill_zero(running, mt)
    return out


def reinforce_pp_advantage(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """REINFORCE++: discounted returns over policy tokens, whitened over the whole batch.

    ``token_rewards`` ``(B, R)`` (outcome on the last policy token, optionally minus a
    per-token KL penalty), ``mask`` ``(B, R)``. Returns advantages ``(B, R)``.
    """
    return masked_whiten(discounted_returns(token_rewards, mask, gamma), mask)


def reinforce_pp_baseline_advantage(
    scores: Tensor, index: Tensor, mask: Tensor, reduce: Reduce | None = None
) -> Tensor:
    """REINFORCE++ with a group-mean baseline: ``r - mean_g`` broadcast over policy tokens,
    then whitened over the batch (every rank's, with ``reduce``). ``scores`` ``(B,)``,
    ``index`` ``(B,)``, ``mask`` ``(B, R)``."""
    a = grpo_advantage(scores, index, mask, norm_by_std=False)
    return masked_whiten(a, mask, reduce=reduce)


AdvEstimator = Callable[..., tuple[Tensor, Tensor]]
ADV_ESTIMATORS: Registry[AdvEstimator] = Registry("advantage estimator")


def _require(x: Tensor | None, what: str, name: str) -> Tensor:
    if x is None:
        raise ValueError(f"advantage estimator {name!r} needs {what}")
    return x


@ADV_ESTIMATORS.register("gae")
def _est_gae(
    token_rewards: Tensor,
    mask: Tensor,
    *,
    index: Tensor | None,
    values: Tensor | None,
    cfg: AlgorithmConfig,
    reduce: Reduce | None = None,
) -> tuple[Tensor, Tensor]:
    adv, ret = compute_gae(
        token_rewards, _require(values, "values (a critic)", "gae"), mask, cfg.gamma, cfg.lam
    )
    return masked_whiten(adv, mask, reduce=reduce), ret


@ADV_ESTIMATORS.register("grpo")
def _est_grpo(
    token_rewards: Tensor,
    mask: Tensor,
    *,
    index: Tensor | None,
    values: Tensor | None,
    cfg: AlgorithmConfig,
    reduce: Reduce | None = None,
) -> tuple[Tensor, Tensor]:
    scores = masked_sum(token_rewards, mask, -1)
    adv = grpo_advantage(scores, _require(index, "group index", "grpo"), mask, cfg.norm_adv_by_std)
    return adv, adv


@ADV_ESTIMATORS.register("rloo")
def _est_rloo(
    token_rewards: Tensor,
    mask: Tensor,
    *,
    index: Tensor | None,
    values: Tensor | None,
    cfg: AlgorithmConfig,
    reduce: Reduce | None = None,
) -> tuple[Tensor, Tensor]:
    scores = masked_sum(token_rewards, mask, -1)
    adv = rloo_advantage(scores, _require(index, "group index", "rloo"), mask)
    return adv, adv


@ADV_ESTIMATORS.register("reinforce_pp")
def _est_reinforce_pp(
    token_rewards: Tensor,
    mask: Tensor,
    *,
    index: Tensor | None,
    values: Tensor | None,
    cfg: AlgorithmConfig,
    reduce: Reduce | None = None,
) -> tuple[Tensor, Tensor]:
    ret = discounted_returns(token_rewards, mask, cfg.gamma)
    return masked_whiten(ret, mask, reduce=reduce), ret


@ADV_ESTIMATORS.register("reinforce_pp_baseline")
def _est_reinforce_pp_baseline(
    token_rewards: Tensor,
    mask: Tensor,
    *,
    index: Tensor | None,
    values: Tensor | None,
    cfg: AlgorithmConfig,
    reduce: Reduce | None = None,
) -> tuple[Tensor, Tensor]:
    scores = masked_sum(token_rewards, mask, -1)
    adv = reinforce_pp_baseline_advantage(
        scores, _require(index, "group index", "reinforce_pp_baseline"), mask, reduce
    )
    return adv, adv


def compute_advantages(
    name: str,
    token_rewards: Tensor,
    mask: Tensor,
    cfg: AlgorithmConfig,
    index: Tensor | None = None,
    values: Tensor | None = None,
    reduce: Reduce | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the named estimator: ``(advantages, returns)``, both ``(B, R)``, 0 at mask-0.

    ``reduce`` makes batch-level statistics (the whitening of gae and reinforce_pp) span every
    data-parallel rank; group estimators need none (a group never straddles ranks)."""
    return ADV_ESTIMATORS.get(name)(
        token_rewards, mask, index=index, values=values, cfg=cfg, reduce=reduce
    )


# -- log-probs, entropy, KL ----------------------------------------------------------------------
def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-prob of ``labels`` ``(...)`` under ``logits`` ``(..., V)`` -> ``(...)``, in fp32.

    ``gather - logsumexp`` avoids materialising a second ``(..., V)`` tensor."""
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last dim: ``(..., V) -> (...)``, in fp32."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


KL_ESTIMATORS: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("KL estimator")
_K3_CLAMP = 10.0  # verl's bound on the low_var_kl value


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``log p - log q`` per token ``(B, R)``: unbiased for KL(p||q), high variance, can be < 0."""
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``0.5 (log p - log q)^2`` per token ``(B, R)``: biased, low variance, >= 0."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``q/p - log(q/p) - 1`` per token ``(B, R)`` (Schulman's low-variance unbiased estimator,
    always >= 0). The log-ratio is clamped to [-20, 20] so ``exp`` stays finite, and the value
    to [0, 10] as verl's ``low_var_kl`` does (a token past the bound gets no KL gradient)."""
    log_ratio = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-_K3_CLAMP, _K3_CLAMP)


# verl's names for the same estimators (verl's "abs", "full" and "+" variants are not here)
KL_ESTIMATORS.add("kl", kl_k1)
KL_ESTIMATORS.add("mse", kl_k2)
KL_ESTIMATORS.add("low_var_kl", kl_k3)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate ``(B, R)``, 0 at mask-0 positions (whatever the inputs there)."""
    lp, ref = (masked_fill_zero(x, mask) for x in (logprobs, ref_logprobs))
    return masked_fill_zero(KL_ESTIMATORS.get(estimator)(lp, ref), mask)


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    estimator: str = "k3",
    loss_agg: str = "token-mean",
    denom: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """KL-to-reference as a loss term. ``(B, R)`` inputs -> (scalar, ``actor/kl_loss``)."""
    lp, ref = (masked_fill_zero(x, mask) for x in (logprobs, ref_logprobs))  # (B, R)
    kl = KL_ESTIMATORS.get(estimator)(lp, ref)
    loss = agg_loss(kl, mask, loss_agg, denom)
    return loss, {"actor/kl_loss": float(masked_mean(kl.detach(), mask))}


# -- policy losses -----------------------------------------------------------------------------
def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip_c: float | None = None,
    loss_agg: str = "token-mean",
    denom: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate on ``(B, R)`` tensors -> (scalar loss, metrics).

    ``clip_high`` (clip-higher, DAPO) defaults to ``clip_low``. ``dual_clip_c`` (> 1) bounds
    the loss of negative-advantage tokens at ``-c * A`` (dual-clip PPO).
    """
    clip_high = clip_low if clip_high is None else clip_high
    logprobs, old_logprobs, advantages = (
        masked_fill_zero(x, mask) for x in (logprobs, old_logprobs, advantages)
    )  # (B, R) each; nothing at a mask-0 position reaches the loss or its gradient
    log_ratio = (logprobs - old_logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(loss1, loss2)
    metrics = {
        "actor/pg_clipfrac": float(masked_mean((loss2 > loss1).float(), mask)),
        "actor/ppo_kl": float(masked_mean(-log_ratio.detach(), mask)),
    }
    if dual_clip_c is not None:
        if dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
        loss3 = -advantages * dual_clip_c
        lower = torch.minimum(clipped, loss3)
        neg = advantages < 0
        metrics["actor/pg_clipfrac_lower"] = float(
            masked_mean(((clipped > loss3) & neg).float(), mask)
        )
        clipped = torch.where(neg, lower, clipped)
    loss = agg_loss(clipped, mask, loss_agg, denom)
    metrics["actor/pg_loss"] = float(loss.detach())
    return loss, metrics


# GSPO's own settings (the GSPO paper, sec. 5.1; verl's GSPO recipes): sequence-level ratios sit
# very close to 1, so PPO's 0.2 would almost never clip
GSPO_CLIP_LOW = 3e-4
GSPO_CLIP_HIGH = 4e-4
GSPO_LOSS_AGG = "seq-mean-token-mean"


def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = GSPO_CLIP_LOW,
    clip_high: float | None = GSPO_CLIP_HIGH,
    loss_agg: str = GSPO_LOSS_AGG,
    denom: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GSPO: the importance ratio is the sequence's geometric-mean token ratio (over policy
    tokens), with the gradient still flowing per token. ``(B, R)`` inputs -> (loss, metrics).

    ``clip_high`` None = ``clip_low``. Through :func:`policy_loss` the clip range and the
    aggregation come from :func:`gspo_settings`."""
    clip_high = clip_low if clip_high is None else clip_high
    logprobs, old_logprobs, advantages = (
        masked_fill_zero(x, mask) for x in (logprobs, old_logprobs, advantages)
    )  # (B, R) each
    log_ratio = logprobs - old_logprobs
    seq_log_ratio = masked_mean(log_ratio, mask, -1)  # (B,)
    tok_log_ratio = seq_log_ratio.detach()[:, None] + logprobs - logprobs.detach()  # (B, R)
    ratio = torch.exp(tok_log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(loss1, loss2)
    loss = agg_loss(clipped, mask, loss_agg, denom)
    return loss, {
        "actor/pg_loss": float(loss.detach()),
        "actor/pg_clipfrac": float(masked_mean((loss2 > loss1).float(), mask)),
        "actor/ppo_kl": float(masked_mean(-log_ratio.detach(), mask)),
    }


PolicyLoss = Callable[..., tuple[Tensor, dict[str, float]]]
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


@POLICY_LOSSES.register("vanilla")
def _pl_vanilla(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    cfg: AlgorithmConfig,
    denom: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    return ppo_clip_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_low=cfg.clip_ratio,
        clip_high=cfg.clip_ratio_high,
        dual_clip_c=cfg.dual_clip_c,
        loss_agg=cfg.loss_agg,
        denom=denom,
    )


_CFG_DEFAULTS = AlgorithmConfig()


def gspo_settings(cfg: AlgorithmConfig) -> tuple[float, float | None, str]:
    """``(clip_low, clip_high, loss_agg)`` the ``gspo`` policy loss uses under ``cfg``.

    The shared PPO settings at their defaults mean "not set for GSPO", so GSPO keeps its own
    (``GSPO_CLIP_LOW``/``GSPO_CLIP_HIGH`` = 3e-4/4e-4, ``GSPO_LOSS_AGG`` =
    seq-mean-token-mean):

    - the clip range is ``cfg``'s (``clip_ratio``, ``clip_ratio_high``; None = symmetric) as a
      pair once either was changed: ``clip_ratio`` differs from its default or
      ``clip_ratio_high`` is set. Setting ``clip_ratio`` to its default value itself cannot be
      told apart from not setting it; set ``clip_ratio_high`` too (``clip_ratio_high=0.2``
      gives verl's default GSPO range 0.2/0.2).
    - the aggregation is ``cfg.loss_agg`` unless it is the default (token-mean).

    The KL and entropy terms always aggregate with ``cfg.loss_agg``;
    :func:`agg_denominator`'s :class:`AggDenom` gives each term its own mini-batch normaliser.
    """
    d = _CFG_DEFAULTS
    if cfg.clip_ratio != d.clip_ratio or cfg.clip_ratio_high is not None:
        clip_low, clip_high = cfg.clip_ratio, cfg.clip_ratio_high
    else:
        clip_low, clip_high = GSPO_CLIP_LOW, GSPO_CLIP_HIGH
    loss_agg = cfg.loss_agg if cfg.loss_agg != d.loss_agg else GSPO_LOSS_AGG
    return clip_low, clip_high, loss_agg


@POLICY_LOSSES.register("gspo")
def _pl_gspo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    cfg: AlgorithmConfig,
    denom: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    clip_low, clip_high, loss_agg = gspo_settings(cfg)
    return gspo_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        loss_agg=loss_agg,
        denom=denom,
    )


# policy losses whose gradient is exactly zero where the advantage is zero (both are
# -A * f(ratio)); the trainer leaves such trajectories out of the update only for these
ZERO_AT_ZERO_ADVANTAGE = frozenset({"vanilla", "gspo"})


def inert_rows(advantages: Tensor, mask: Tensor) -> Tensor:
    """``(B,)`` bool: rows whose advantage is exactly 0 at every policy token.

    advantages, mask: ``(B, R)``. Under a policy loss in :data:`ZERO_AT_ZERO_ADVANTAGE`, with
    no KL, entropy or value term, such a row contributes exactly nothing to the gradient (it
    still counts in the loss normaliser)."""
    return ~((advantages != 0) & (mask > 0)).any(-1)


def policy_loss(
    name: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: AlgorithmConfig,
    denom: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Run the named policy loss on ``(B, R)`` tensors -> (scalar, metrics)."""
    return POLICY_LOSSES.get(name)(logprobs, old_logprobs, advantages, mask, cfg=cfg, denom=denom)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float,
    loss_agg: str = "token-mean",
    denom: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss ``0.5 max((v - R)^2, (v_clip - R)^2)``, ``v_clip`` within ``clip``
    of the rollout-time values. ``(B, R)`` inputs -> (scalar, ``critic/*`` metrics)."""
    values, old_values, returns = (masked_fill_zero(x, mask) for x in (values, old_values, returns))
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    l1 = (values - returns) ** 2
    l2 = (v_clipped - returns) ** 2
    loss = agg_loss(0.5 * torch.maximum(l1, l2), mask, loss_agg, denom)
    return loss, {
        "critic/vf_loss": float(loss.detach()),
        "critic/vf_clipfrac": float(masked_mean((l2 > l1).float(), mask)),
        "critic/vpred_mean": float(masked_mean(values.detach(), mask)),
    }


def entropy_bonus(
    entropy: Tensor, mask: Tensor, loss_agg: str = "token-mean", denom: float | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Aggregated entropy ``(B, R) -> scalar`` (to be *subtracted*, scaled, from the loss)."""
    entropy = masked_fill_zero(entropy, mask)
    ent = agg_loss(entropy, mask, loss_agg, denom)
    return ent, {"actor/entropy": float(masked_mean(entropy.detach(), mask))}


# Metrics that add up over micro-batches and ranks: the losses (a micro-batch's *share* of its
# mini-batch loss; the normaliser is the mini-batch's, over every rank) and the update's token
# counts (positions computed, padding included, and real tokens: these do depend on how the
# mini-batch was cut, which is what they measure). Every other per-micro-batch metric is a mean
# over the micro-batch's policy tokens.
SUMMED_METRICS = frozenset(
    {"actor/pg_loss", "critic/vf_loss", "perf/update_padded_tokens", "perf/update_real_tokens"}
)


def combine_metrics(items: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """One update's metrics from its micro-batches' ``(metrics, policy tokens)`` pairs (from
    every rank): :data:`SUMMED_METRICS` summed, the rest weighted by tokens, so the losses and
    means do not depend on how the mini-batch was cut into micro-batches or ranks (the padded
    token count does, by design). A key whose items have no tokens at all is a plain mean."""
    keys = {k for m, _ in items for k in m}
    out: dict[str, float] = {}
    for k in keys:
        have = [(m[k], w) for m, w in items if k in m]
        if k in SUMMED_METRICS:
            out[k] = float(sum(v for v, _ in have))
            continue
        tw = sum(w for _, w in have)
        out[k] = float(
            sum(v * w for v, w in have) / tw if tw > 0 else sum(v for v, _ in have) / len(have)
        )
    return out


def metric_means(items: list[dict[str, float]]) -> dict[str, Any]:
    """Average a list of metric dicts key by key (micro-batch metrics -> step metrics)."""
    keys = {k for d in items for k in d}
    return {k: sum(d[k] for d in items if k in d) / sum(1 for d in items if k in d) for k in keys}
