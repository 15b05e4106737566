"""Prefix KV reuse for the HF engine: keep each row's keys/values between generate calls.

The multi-turn loop calls ``engine.generate`` once per turn with ``prompt + response so far``
for every active trajectory; between turns it only *appends* (the last sampled token, an
observation or a notice, mask 0). Without reuse every turn re-prefills the whole context.
:class:`PrefixKVCache` keeps, for every row a generate call finished, the per-layer key and
value tensors of the tokens it covers (``prompt + sampled[:-1]``: the last sampled token was
never fed back), trimmed to the real tokens (no padding). The next call looks each context
up; a context that strictly extends a cached sequence prefills only its new suffix.

Batching rows with different cached and suffix lengths (:func:`batch_cache`): each row's
cached KV is right-aligned in ``C = max cached`` columns, the suffixes are left-padded to
``S = max suffix`` columns after them, so one row reads
``[pad | cached KV | pad | suffix]``. The 2-D attention mask is 0 on both pads (the
causal mask is on column order, which is the token order of every row), and position ids
are the real positions (``cached_len + j``), so the result is the same computation as a full
prefill up to float rounding (the tests check tokens and log-probs against re-prefill).

Only plain full-attention ``DynamicCache`` layers (``DynamicLayer``) are handled; the engine
turns reuse off for any other cache (sliding window, linear attention, quantised).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Entries are indexed by (length, last _TAIL ids): a lookup hashes a few ids per candidate
# length instead of the whole context; a hit is then verified on the full prefix.
_TAIL = 8


@dataclass
class RowKV:
    """The KV of one sequence: ``keys[l]``/``values[l]`` are (H, len(ids), D) for layer l."""

    ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return len(self.ids)


class PrefixKVCache:
    """Cached rows keyed by the token ids they cover; :meth:`lookup` finds the longest one a
    context strictly extends (at least one token left to feed, whose logits are needed)."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[int, tuple[int, ...]], list[RowKV]] = {}
        self._lengths: set[int] = set()
        self.tag: object = None  # what the entries were computed with (weights, device, dtype)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_key.values())

    @property
    def tokens(self) -> int:
        """Tokens whose KV is held (all layers)."""
        return sum(e.length for v in self._by_key.values() for e in v)

    def clear(self) -> None:
        self._by_key.clear()
        self._lengths.clear()

    def put(self, entry: RowKV) -> None:
        if entry.length == 0:
            return
        key = (entry.length, tuple(entry.ids[-_TAIL:]))
        same = self._by_key.setdefault(key, [])
        if any(e.ids == entry.ids for e in same):  # identical rows (greedy copies): keep one
            return
        same.append(entry)
        self._lengths.add(entry.length)

    def lookup(self, context: Sequence[int]) -> RowKV | None:
        """The longest cached sequence that is a proper prefix of ``context``, or None."""
        ctx = list(context)
        for n in sorted((n for n in self._lengths if n < len(ctx)), reverse=True):
            for e in self._by_key.get((n, tuple(ctx[max(0, n - _TAIL) : n])), ()):
                if e.ids == ctx[:n]:
                    return e
        return None


def supports_reuse(past: object) -> bool:
    """Whether ``past`` is a cache whose per-row KV this module can cut out and rebuild."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(past, "layers", None)
    return (
        type(past) is DynamicCache
        and bool(layers)
        and all(type(layer) is DynamicLayer for layer in layers)
    )


def extract_row(past: object, slot: int, real: torch.Tensor, ids: list[int]) -> RowKV:
    """Copy batch row ``slot`` of ``past`` at the columns where ``real`` (T,) is 1: the KV of
    ``ids`` (``len(ids) == real.sum()``), without padding, detached from the batch tensors."""
    cols = real.nonzero().squeeze(-1)  # (n,)
    n = int(cols.numel())
    if n != len(ids):
        raise ValueError(f"{n} real cache columns for {len(ids)} ids")
    T = int(real.shape[0])
    contiguous = n == 0 or int(cols[0]) + n == T  # the usual case: only left padding
    keys, values = [], []
    for layer in past.layers:  # type: ignore[attr-defined]
        k, v = layer.keys[slot], layer.values[slot]  # (H, T, D)
        if contiguous:
            keys.append(k[:, T - n :, :].clone())
            values.append(v[:, T - n :, :].clone())
        else:
            keys.append(k.index_select(1, cols))
            values.append(v.index_select(1, cols))
    return RowKV(list(ids), keys, values)


def batch_cache(
    entries: Sequence[RowKV | None], device: torch.device
) -> tuple[object | None, torch.Tensor]:
    """A ``DynamicCache`` of ``len(entries)`` rows, row i's KV right-aligned in
    ``C = max length`` columns (zeros before it), and its (B, C) attention mask (1 on the
    cached columns). ``(None, (B, 0) mask)`` when no row has a cache."""
    from transformers.cache_utils import DynamicCache

    B = len(entries)
    C = max((e.length for e in entries if e is not None), default=0)
    mask = torch.zeros((B, C), dtype=torch.long, device=device)
    if C == 0:
        return None, mask
    first = next(e for e in entries if e is not None)
    layers = []
    for li in range(len(first.keys)):
        H, _, D = first.keys[li].shape
        K = first.keys[li].new_zeros((B, H, C, D))
        V = first.values[li].new_zeros((B, first.values[li].shape[0], C, first.values[li].shape[2]))
        for i, e in enumerate(entries):
            if e is not None:
                K[i, :, C - e.length :, :] = e.keys[li]
                V[i, :, C - e.length :, :] = e.values[li]
        layers.append((K.to(device), V.to(device)))
    for i, e in enumerate(entries):
        if e is not None:
            mask[i, C - e.length :] = 1
    return DynamicCache(ddp_cache_data=layers), mask
