"""Trajectories -> padded training tensors, and per-token log-probs/entropies/values of a model.

Layout: prompts are left-padded to ``P`` and responses right-padded to ``R``, so every row's
response starts at column ``P`` of ``input_ids`` ``(B, P + R)``. The logits that predict
response token ``t`` sit at column ``P - 1 + t``; all per-token tensors are ``(B, R)``.
Position ids count real tokens only, so left padding does not shift positions.

The loss mask comes from ``Trajectory.loss_mask`` as the rollout built it (1 sampled, 0
inserted); padding is 0. Nothing here re-tokenises text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from sr1.algos.core import entropy_from_logits, logprobs_from_logits
from sr1.rollout.types import Trajectory
from sr1.train.head import chunk_rows, fusable, fused_head

Tensor = torch.Tensor


@dataclass
class TrainBatch:
    """Padded tensors for B trajectories. ``P`` prompt columns, ``R`` response columns."""

    input_ids: Tensor  # (B, P + R) long
    attention_mask: Tensor  # (B, P + R) long, 0 on padding
    position_ids: Tensor  # (B, P + R) long
    response_mask: Tensor  # (B, R) float: 1 where the loss applies
    response_valid: Tensor  # (B, R) float: 1 on every real response token (sampled or inserted)
    rollout_logprobs: Tensor  # (B, R) float: the engine's log-probs (0 where not sampled)
    scores: Tensor  # (B,) float outcome rewards
    index: Tensor  # (B,) long group ids (same prompt = same id)
    prompt_len: int  # P
    # filled by the trainer before updates, all (B, R):
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None

    @property
    def response_attn(self) -> Tensor:
        """``(B, R)`` 1 on every real response token (alias of ``response_valid``)."""
        return self.response_valid

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: Tensor | Sequence[int]) -> TrainBatch:
        """The sub-batch of the given row indices (same P and R)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        return self._map(lambda x: x[idx])

    def to(self, device: torch.device | str) -> TrainBatch:
        return self._map(lambda x: x.to(device))

    def _map(self, fn: Any) -> TrainBatch:
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = fn(v) if isinstance(v, torch.Tensor) else v
        return TrainBatch(**kw)


def collate(trajs: Sequence[Trajectory], pad_id: int, use_mask: bool = True) -> TrainBatch:
    """Pad trajectories into a :class:`TrainBatch`.

    ``use_mask=False`` (the paper's no-mask ablation) trains on inserted tokens too.
    """
    if not trajs:
        raise ValueError("collate needs at least one trajectory")
    B = len(trajs)
    P = max(len(t.prompt_ids) for t in trajs)
    R = max(1, max(len(t.response_ids) for t in trajs))
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros(B, P + R, dtype=torch.long)
    mask = torch.zeros(B, R)
    valid = torch.zeros(B, R)
    lps = torch.zeros(B, R)
    for b, t in enumerate(trajs):
        if not (len(t.response_ids) == len(t.loss_mask) == len(t.logprobs)):
            raise ValueError(
                f"trajectory {t.id}: response_ids, loss_mask and logprobs differ in length"
            )
        p, r = len(t.prompt_ids), len(t.response_ids)
        ids[b, P - p : P] = torch.tensor(t.prompt_ids, dtype=torch.long)
        attn[b, P - p : P + r] = 1
        if r:
            ids[b, P : P + r] = torch.tensor(t.response_ids, dtype=torch.long)
            m = torch.tensor(t.loss_mask, dtype=torch.float32)
            mask[b, :r] = m if use_mask else 1.0
            valid[b, :r] = 1.0
            lps[b, :r] = torch.tensor(t.logprobs, dtype=torch.float32)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return TrainBatch(
        input_ids=ids,
        attention_mask=attn,
        position_ids=pos,
        response_mask=mask,
        response_valid=valid,
        rollout_logprobs=lps,
        scores=torch.tensor([float(t.reward) for t in trajs]),
        index=torch.tensor([int(t.group) for t in trajs], dtype=torch.long),
        prompt_len=P,
    )


def _span(batch: TrainBatch) -> tuple[int, int]:
    """The columns ``[first, last)`` a forward over this (micro-)batch runs: all but those that
    are padding in every row (the column that predicts response token 0 always kept)."""
    attn = batch.attention_mask
    used = attn.any(0)  # (T,)
    first = int(used.nonzero()[0]) if used.any() else 0
    first = min(first, batch.prompt_len - 1)
    last = int(used.nonzero()[-1]) + 1 if used.any() else attn.shape[1]
    return first, min(max(last, batch.prompt_len + 1), attn.shape[1])


def padded_tokens(batch: TrainBatch) -> int:
    """Token positions a forward over this (micro-)batch computes (rows x trimmed columns), of
    which ``attention_mask.sum()`` are real: the compute that padding costs shows as their gap."""
    first, last = _span(batch)
    return len(batch) * (last - first)


def _trim(batch: TrainBatch) -> tuple[Tensor, Tensor, Tensor, int]:
    """Drop columns that are padding in every row of this (micro-)batch; returns the new
    input_ids/attention_mask/position_ids and how many leading columns were dropped."""
    first, last = _span(batch)
    sl = slice(first, last)
    attn = batch.attention_mask
    return batch.input_ids[:, sl], attn[:, sl], batch.position_ids[:, sl], first


LOGITS_AT = ("policy", "all")


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The output projection (``lm_head``) of an HF causal LM, seen through DDP/peft
    wrappers; None when the model has none that can be hooked."""
    inner = getattr(model, "module", model)  # DDP
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, torch.nn.Module) else None


@contextlib.contextmanager
def _head_on(head: torch.nn.Module, cols: slice, sel: Tensor) -> Iterator[None]:
    """While active, ``head`` projects only the hidden states at ``sel`` ``(B, n)`` within
    columns ``cols``: its input ``(B, T, H)`` becomes ``(N, H)`` and the model's logits
    ``(N, V)``, N = ``sel.sum()``. A forward pre-hook inside the model's own forward, so it
    holds under DDP and FSDP (parameters are gathered by the root's hooks as usual)."""

    def pick(_mod: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][:, cols][sel], *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def response_forward(
    model: torch.nn.Module,
    batch: TrainBatch,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    logits_at: str = "policy",
    logits_chunk_mib: int = 0,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``(B, R)`` of the response tokens under ``model`` (with grad if enabled) and
    optionally their entropies ``(B, R)``.

    ``logits_at="policy"`` (the default) runs the output head only at the positions the loss
    sees (``response_mask`` 1: sampled tokens; every response token when observations are not
    masked): the ``(B, T, V)`` logits of prompt and inserted tokens are never computed, and
    those positions are 0 here. ``"all"`` projects every column (the reference path; values
    equal at the selected positions) and fills every valid response position. Past a row's
    response both give 0.

    ``entropy_grad=False`` computes the entropies without autograd (a metric only): the
    softmax over the vocabulary, as large as the logits, is then not kept for backward.

    ``logits_chunk_mib`` (``trainer.logits_chunk_mib``; with ``"policy"`` and a plain bias-free
    head): the head computes the log-probs and entropies that many MiB of fp32 logits at a time
    (:mod:`sr1.train.head`), the ``(N, V)`` logits never whole; 0 = auto, -1 = whole logits.
    Equal to the whole-logits path up to float rounding."""
    if logits_at not in LOGITS_AT:
        raise ValueError(f"logits_at={logits_at!r} is not one of {LOGITS_AT}")
    ids, attn, pos, first = _trim(batch)
    P, R = batch.prompt_len - first, batch.response_len
    n = min(R, ids.shape[1] - P)  # response columns present after trimming
    labels = ids[:, P : P + n]  # (B, n)
    cols = slice(P - 1, P - 1 + n)  # the columns whose logits predict the response
    head = output_head(model) if logits_at == "policy" else None
    sel = batch.response_mask[:, :n].to(ids.device) > 0  # (B, n)
    lp = torch.zeros(len(batch), R, dtype=torch.float32, device=ids.device)
    ent = lp.new_zeros(len(batch), R) if with_entropy else None
    at = (*sel.nonzero(as_tuple=True),)  # the selected (row, column) positions
    if fusable(head) and (rows := chunk_rows(logits_chunk_mib, head.out_features, ids.device)):
        with fused_head(head, cols, sel, labels[sel], rows, with_entropy, entropy_grad) as seen:
            out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
        # the model must return the head's output as it is (DDP's output hook may copy it)
        if not seen or not (out.logits is seen[-1] or _same(out.logits, seen[-1])):
            raise RuntimeError(
                f"{type(getattr(model, 'module', model)).__name__} changed its head's output "
                "after the head; set trainer.logits_chunk_mib=-1 for this model"
            )
        lp = lp.index_put(at, out.logits[:, 0])
        if ent is not None:
            e = out.logits[:, 1]  # a constant of the graph unless entropy_grad (head.py)
            ent = ent.index_put(at, e if entropy_grad and torch.is_grad_enabled() else e.detach())
        return lp, ent
    if head is not None:
        with _head_on(head, cols, sel):
            out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
        logits = out.logits  # (N, V)
        if logits.dim() != 2 or logits.shape[0] != int(sel.sum()):
            raise RuntimeError(
                f"{type(getattr(model, 'module', model)).__name__} reshaped its head's output "
                f"(logits {tuple(logits.shape)}); pass logits_at='all' for this model"
            )
        lp = lp.index_put(at, logprobs_from_logits(logits, labels[sel]))
        if ent is not None:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                e = entropy_from_logits(logits)
            ent = ent.index_put(at, e)
        return lp, ent
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
    logits = out.logits[:, cols]  # (B, n, V)
    lp = torch.cat([logprobs_from_logits(logits, labels), lp[:, n:]], dim=1)  # (B, R)
    if ent is not None:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            e = entropy_from_logits(logits)
        ent = torch.cat([e, ent[:, n:]], dim=1)
    return lp * batch.response_valid, (ent * batch.response_valid if ent is not None else None)


response_logprobs = response_forward


def value_forward(critic: torch.nn.Module, batch: TrainBatch) -> Tensor:
    """Critic values ``(B, R)``: the value of the state just before each response token."""
    ids, attn, pos, first = _trim(batch)
    v = critic(input_ids=ids, attention_mask=attn, position_ids=pos)  # (B, T')
    P, R = batch.prompt_len - first, batch.response_len
    n = min(R, ids.shape[1] - P)
    v = v[:, P - 1 : P - 1 + n].float()
    return torch.cat([v, v.new_zeros(len(batch), R - n)], dim=1) * batch.response_valid


MicroBatches = int | Sequence[Tensor]


def _micro(batch: TrainBatch, micro: MicroBatches) -> Sequence[Tensor]:
    """Row-index groups: ``micro`` itself, or rows in length order in chunks of ``micro``."""
    if isinstance(micro, int):
        return length_order(batch, torch.arange(len(batch))).split(micro)
    return micro


@torch.no_grad()
def batched_logprobs(
    model: torch.nn.Module,
    batch: TrainBatch,
    micro: MicroBatches,
    with_entropy: bool = False,
    logits_chunk_mib: int = 0,
) -> tuple[Tensor, Tensor | None]:
    """:func:`response_forward` without grad, micro-batched; ``(B, R)`` results on CPU.

    ``micro``: rows per micro-batch (in length order), or the row-index groups to run
    (:func:`micro_batches`); every row must be in exactly one group."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    lp_all = torch.zeros(len(batch), batch.response_len)
    ent_all = torch.zeros(len(batch), batch.response_len) if with_entropy else None
    for rows in _micro(batch, micro):
        lp, ent = response_forward(
            model,
            batch.select(rows).to(dev),
            with_entropy,
            entropy_grad=False,
            logits_chunk_mib=logits_chunk_mib,
        )
        lp_all[rows] = lp.float().cpu()
        if ent_all is not None and ent is not None:
            ent_all[rows] = ent.float().cpu()
    model.train(was)
    return lp_all, ent_all


def length_order(batch: TrainBatch, idx: Tensor) -> Tensor:
    """``idx`` (row indices of ``batch``) longest sequence first (prompt + response tokens,
    ties in the given order), so consecutive micro-batches hold rows of similar length and
    :func:`_trim` cuts most of their padding. For micro-batches whose losses are summed under
    one normaliser or whose outputs are put back by row index: the result is then the same up
    to float summation order."""
    lengths = batch.attention_mask[idx].sum(-1)
    return idx[torch.argsort(lengths, descending=True, stable=True)]


@torch.no_grad()
def batched_values(critic: torch.nn.Module, batch: TrainBatch, micro: MicroBatches) -> Tensor:
    """:func:`value_forward` without grad, micro-batched as in :func:`batched_logprobs`;
    ``(B, R)`` on CPU."""
    was = critic.training
    critic.eval()
    dev = next(critic.parameters()).device
    out = torch.zeros(len(batch), batch.response_len)
    for rows in _micro(batch, micro):
        out[rows] = value_forward(critic, batch.select(rows).to(dev)).float().cpu()
    critic.train(was)
    return out


def micro_batches(
    batch: TrainBatch,
    idx: Tensor,
    max_rows: int,
    max_tokens: int = 0,
    n_groups: int | None = None,
) -> list[Tensor]:
    """Split rows ``idx`` of ``batch`` into micro-batches, each a run of :func:`length_order`.

    ``max_tokens`` 0: chunks of ``max_rows``. ``max_tokens`` > 0 (token-budget micro-batches,
    like verl's dynamic batch size): every group holds at most ``max_rows`` rows and at most
    ``max_tokens`` token positions as its forward computes them (rows x the columns left after
    :func:`_trim`: the longest prompt plus the longest response of the group; a single row
    longer than the budget runs alone); of the splits that satisfy both, the one with the
    fewest groups, and of those the least padding (an exact dynamic programme over the
    ordered rows). ``n_groups`` asks for exactly that many groups instead of the fewest (ranks
    that must run the same number of forwards; at least the fewest, at most ``len(idx)``).

    Every row is in exactly one group; losses summed under one normaliser, or outputs put
    back by row index, are the same up to float summation order whatever the split."""
    if max_rows < 1 or max_tokens < 0:
        raise ValueError(f"max_rows must be >= 1 and max_tokens >= 0, got {max_rows}, {max_tokens}")
    order = length_order(batch, idx)
    if len(order) == 0:
        return []
    if max_tokens == 0:
        return list(order.split(max_rows))
    P = batch.prompt_len
    plen = batch.attention_mask[order, :P].sum(-1).tolist()
    rlen = batch.response_valid[order].sum(-1).long().tolist()
    n = len(order)

    def groups_ending_at(j: int) -> Iterator[tuple[int, int]]:
        """(start, padded tokens) of every allowed group ``[start, j)``."""
        wp = wr = 0
        for i in range(j - 1, max(-1, j - 1 - max_rows), -1):
            wp, wr = max(wp, int(plen[i]), 1), max(wr, int(rlen[i]), 1)
            cost = (j - i) * (wp + wr)
            if cost > max_tokens and j - i > 1:
                return  # a wider group only costs more
            yield i, cost

    if n_groups is None:
        # the fewest groups: greedy from the end, each group as long as allowed (a sub-run of
        # an allowed group is allowed, so no split has fewer)
        n_groups, j = 0, n
        while j > 0:
            j = min(i for i, _ in groups_ending_at(j))
            n_groups += 1
    # of the splits into exactly n_groups groups, the least padding
    k_max = min(n_groups, n)
    table = [[float("inf")] * (n + 1) for _ in range(k_max + 1)]
    prev = [[0] * (n + 1) for _ in range(k_max + 1)]
    table[0][0] = 0.0
    for j in range(1, n + 1):
        for i, cost in groups_ending_at(j):
            for k in range(1, k_max + 1):
                c = table[k - 1][i] + cost
                if c < table[k][j]:
                    table[k][j], prev[k][j] = c, i
    if table[k_max][n] == float("inf"):
        raise ValueError(f"cannot split {n} rows into {k_max} micro-batches of <= {max_rows} rows")
    cuts, j, k = [], n, k_max
    while j > 0:
        cuts.append(j)
        j, k = prev[k][j], k - 1
    bounds = [0, *reversed(cuts)]
    return [order[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
