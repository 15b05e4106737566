"""The output head's log-probs and entropies a chunk of rows at a time, never the whole logits.

``head_logprobs(hidden (N, H), weight (V, H), labels (N,))`` equals projecting all N rows to
``(N, V)`` logits and taking ``log_softmax`` at the labels (and the softmax entropy), but holds
the logits of ``rows`` positions at a time: forward keeps only ``hidden`` and two numbers per
row (log-sum-exp, entropy), and backward projects again (one more head matmul), a slice of the
vocabulary for all rows at a time (as many logits as a forward chunk), to form
``dL/dz = g_lp (onehot - p) - g_ent p (log p + H)`` and the ``hidden``/``weight`` gradients
(each weight row written once).
The idea of Liger's fused linear cross-entropy and of "cut cross-entropy", for the two
quantities an RL loss needs, whose gradients arrive from a loss computed later.

Why: the logits are the largest tensors of an update (``N x 49152`` fp32 for SmolLM2, ``N x
151936`` for Qwen2.5; several copies live at once in the plain path: bf16 output, fp32 copy,
softmax, their gradients). On an accelerator chunking bounds that memory. On CPU a chunk below
glibc's 32 MiB mmap threshold comes from the heap and is reused, where a whole-logits tensor is
mapped and unmapped on every use: ~0.5 M page faults (2 GB) per quickstart update.

``chunk_rows`` turns ``trainer.logits_chunk_mib`` into rows; ``fused_head`` makes an HF model's
``lm_head`` return ``(N, 2)`` [log-prob, entropy] at the selected positions inside the model's
own forward, so DDP/FSDP see the head's parameters used as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeGuard

import torch

Tensor = torch.Tensor


def auto_chunk_mib(device: torch.device) -> int:
    """``trainer.logits_chunk_mib: 0``: 16 MiB on CPU (under glibc's 32 MiB mmap threshold,
    DEFAULT_MMAP_THRESHOLD_MAX, so chunks are reused heap memory), 1 GiB on an accelerator."""
    return 16 if device.type == "cpu" else 1024


def chunk_rows(chunk_mib: int, vocab: int, device: torch.device) -> int | None:
    """Rows per chunk for ``chunk_mib`` MiB of fp32 logits over ``vocab`` columns: ``0`` = auto
    (:func:`auto_chunk_mib`), ``-1`` = no chunking (None)."""
    if chunk_mib < 0:
        return None
    mib = chunk_mib or auto_chunk_mib(device)
    return max(1, (mib << 20) // (4 * vocab))


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's where it is on (as ``F.linear`` would),
    else the inputs' common dtype."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _ChunkedHead(torch.autograd.Function):
    """See :func:`head_logprobs`; ``entropy`` is a constant of the graph unless ``ent_grad``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        rows: int,
        dtype: torch.dtype,
        with_entropy: bool,
        ent_grad: bool,
    ) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(lp)
        ent = torch.zeros_like(lp)
        w = weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, rows):
                z = (hidden[s : s + rows].to(dtype) @ w.T).float()  # (n_c, V)
                lse[s : s + rows] = m = torch.logsumexp(z, -1)
                lp[s : s + rows] = z.gather(-1, labels[s : s + rows, None]).squeeze(-1) - m
                if with_entropy:
                    z.sub_(m[:, None])  # z - lse = log p
                    ent[s : s + rows] = -(z.exp() * z).sum(-1)
        ctx.save_for_backward(hidden, weight, labels, lse, ent)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        ctx.rows, ctx.dtype, ctx.ent_grad = rows, dtype, with_entropy and ent_grad
        if not ctx.ent_grad:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx: Any, g_lp: Tensor | None, g_ent: Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_ent = g_ent if ctx.ent_grad else None
        none = (None,) * 5  # labels, rows, dtype, with_entropy, ent_grad
        if (g_lp is None and g_ent is None) or not (want_h or want_w):
            return (None, None, *none)
        dtype, n, vocab = ctx.dtype, hidden.shape[0], weight.shape[0]
        # vocabulary slices of all rows, as many logits as a forward chunk: each slice's weight
        # gradient is written once (no (V, H) temporary per chunk), the hidden one accumulated
        cols = max(1, ctx.rows * vocab // max(n, 1))
        h = hidden.to(dtype)
        grad_h = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        grad_w = torch.empty_like(weight) if want_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            for v0 in range(0, vocab, cols):
                w = weight[v0 : v0 + cols].to(dtype)  # (c, H)
                z = (h @ w.T).float()  # (N, c): these columns' logits again
                z.sub_(lse[:, None])  # log p
                if g_ent is not None:  # dH/dz = -p (z - E_p[z]) = -p (log p + H)
                    p = z.exp()
                    gz = z.add_(ent[:, None]).mul_(p).mul_(-g_ent[:, None])
                    if g_lp is not None:
                        gz.addcmul_(p, g_lp[:, None], value=-1.0)
                else:
                    assert g_lp is not None
                    gz = z.exp_().mul_(-g_lp[:, None])  # z's buffer: -p g
                if g_lp is not None:  # dlp/dz = onehot - p: the rows whose label is here
                    r = ((labels >= v0) & (labels < v0 + w.shape[0])).nonzero().squeeze(1)
                    gz.index_put_((r, labels[r] - v0), g_lp[r], accumulate=True)
                gd = gz.to(dtype)
                if want_h:
                    if dtype == torch.float32:
                        grad_h.addmm_(gd, w)
                    else:
                        grad_h += gd @ w
                if grad_w is not None:
                    grad_w[v0 : v0 + cols] = gd.T @ h
        return (grad_h.to(hidden.dtype) if want_h else None, grad_w, *none)


def head_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    rows: int,
    with_entropy: bool = False,
    entropy_grad: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``(N,)`` of ``labels`` ``(N,)`` under the logits ``hidden (N, H) @ weight (V,
    H).T``, and their softmax entropies ``(N,)`` (else None), both fp32, computed ``rows``
    logits rows at a time (see the module docstring). The matmul runs in autocast's dtype where
    autocast is on (as ``F.linear``), the softmax in fp32. ``entropy_grad=False``: the entropy
    is a metric, no gradient flows from it."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    dtype = _compute_dtype(hidden, weight)
    lp, ent = _ChunkedHead.apply(
        hidden, weight, labels, rows, dtype, with_entropy, entropy_grad and torch.is_grad_enabled()
    )
    return lp, (ent if with_entropy else None)


def fusable(head: torch.nn.Module | None) -> TypeGuard[torch.nn.Linear]:
    """Whether :func:`fused_head` can stand in for ``head``: a bias-free ``nn.Linear`` running
    ``nn.Linear``'s own forward (an HF ``lm_head``; FSDP2's subclass of it included). A
    LoRA-wrapped, quantised (its own forward) or biased head keeps the plain path."""
    return (
        isinstance(head, torch.nn.Linear)
        and type(head).forward is torch.nn.Linear.forward
        and head.bias is None
    )


@contextlib.contextmanager
def fused_head(
    head: torch.nn.Linear,
    cols: slice,
    sel: Tensor,
    labels: Tensor,
    rows: int,
    with_entropy: bool,
    entropy_grad: bool,
) -> Iterator[list[Tensor]]:
    """While active, ``head`` (input ``(B, T, H)``) returns ``(N, 2)``: the log-prob of
    ``labels`` ``(N,)`` and the entropy at the ``sel`` ``(B, n)`` positions within columns
    ``cols`` (N = ``sel.sum()``), by :func:`head_logprobs`, inside the model's forward (under
    FSDP the weight is the gathered one there). Yields a list that receives the returned
    tensor, so the caller can check the model passed it through unchanged."""
    seen: list[Tensor] = []

    def forward(x: Tensor) -> Tensor:
        lp, ent = head_logprobs(
            x[:, cols][sel], head.weight, labels, rows, with_entropy, entropy_grad
        )
        out = torch.stack([lp, ent if ent is not None else torch.zeros_like(lp)], dim=-1)
        seen.append(out)
        return out

    had = head.__dict__.get("forward")
    head.forward = forward  # an instance attribute: nn.Module.__call__ (and its hooks) runs it
    try:
        yield seen
    finally:
        if had is None:
            del head.forward
        else:
            head.forward = had
