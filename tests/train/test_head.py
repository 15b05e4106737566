"""The chunked output head (sr1.train.head) against the whole logits: values and gradients."""

from __future__ import annotations

import pytest
import torch

from sr1.algos import core
from sr1.config import resolve_config
from sr1.errors import ConfigError
from sr1.train.batch import collate, response_forward
from sr1.train.head import chunk_rows, head_logprobs
from sr1.train.trainer import RLTrainer

from .helpers import assert_heads_agree, hand_trajectories, tiny_cfg

torch.set_num_threads(1)


def _whole(h, w, y, ent_grad=True):
    """The plain path: whole logits, log_softmax at the labels, softmax entropy."""
    z = torch.nn.functional.linear(h, w).float()
    lp = z.gather(-1, y[:, None]).squeeze(-1) - z.logsumexp(-1)
    ent = core.entropy_from_logits(z)
    return lp, ent if ent_grad else ent.detach()


def _grads(fn, h, w, y, g_lp, g_ent, autocast=False):
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        lp, ent = fn(h, w, y)
    (lp * g_lp + ent * g_ent).sum().backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def _inputs(n=37, hid=16, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, hid, generator=g),
        torch.randn(vocab, hid, generator=g),
        torch.randint(0, vocab, (n,), generator=g),
        torch.randn(n, generator=g),
        torch.randn(n, generator=g),
    )


@pytest.mark.parametrize("rows", [1, 5, 37, 1000])
@pytest.mark.parametrize("ent_grad", [True, False])
def test_chunks_give_the_whole_logits_values_and_gradients(rows, ent_grad):
    h, w, y, g_lp, g_ent = _inputs()
    want = _grads(lambda h, w, y: _whole(h, w, y, ent_grad), h, w, y, g_lp, g_ent)
    got = _grads(
        lambda h, w, y: head_logprobs(h, w, y, rows, with_entropy=True, entropy_grad=ent_grad),
        h, w, y, g_lp, g_ent,
    )  # fmt: skip
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_entropy_without_grad_is_a_constant_and_log_probs_alone_work():
    h, w, y, *_ = _inputs()
    h.requires_grad_()
    lp, ent = head_logprobs(h, w, y, 4, with_entropy=True, entropy_grad=False)
    assert lp.requires_grad and not ent.requires_grad
    lp2, none = head_logprobs(h, w, y, 4)
    assert none is None
    torch.testing.assert_close(lp, lp2, atol=0, rtol=0)
    with torch.no_grad():
        lp3, _ = head_logprobs(h, w, y, 4)
    assert not lp3.requires_grad
    torch.testing.assert_close(lp3, lp.detach(), atol=0, rtol=0)


def test_bf16_autocast_runs_the_matmul_in_bf16_as_the_plain_head():
    """Under autocast the head matmul is bf16 in both paths (softmax fp32): log-probs and
    entropies agree to fp32 rounding; the gradients agree to bf16 precision (the logits'
    gradient is rounded to bf16 after summing its terms in a different order, and the weight
    hidden gradient sums bf16-rounded vocabulary-slice products in fp32 where the plain path
    rounds one)."""
    h, w, y, g_lp, g_ent = _inputs(n=64, hid=32, vocab=300)
    want = _grads(_whole, h, w, y, g_lp, g_ent, autocast=True)
    got = _grads(
        lambda h, w, y: head_logprobs(h, w, y, 7, with_entropy=True), h, w, y, g_lp, g_ent, True
    )
    fp32 = _grads(_whole, h, w, y, g_lp, g_ent)
    assert (want[0] - fp32[0]).abs().max() > 1e-4  # autocast did change the plain path
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)
    for mine, plain in zip(got[2:], want[2:], strict=True):
        assert (mine - plain).abs().max() <= 2**-7 * plain.abs().max()
        assert (mine - plain).norm() <= 2**-8 * plain.norm()
    assert got[2].dtype == got[3].dtype == torch.float32


def test_no_rows_and_bad_rows():
    h, w, _, _, _ = _inputs()
    h0 = h[:0].clone().requires_grad_()
    lp, ent = head_logprobs(h0, w, torch.zeros(0, dtype=torch.long), 3, with_entropy=True)
    assert lp.shape == ent.shape == (0,)
    lp.sum().backward()
    assert h0.grad is not None and h0.grad.shape == (0, 16)
    with pytest.raises(ValueError, match="rows must be >= 1"):
        head_logprobs(h, w, torch.zeros(37, dtype=torch.long), 0)


def test_chunk_rows_from_mib():
    cpu, acc = torch.device("cpu"), torch.device("cuda")
    assert chunk_rows(0, 151936, cpu) == (16 << 20) // (4 * 151936) == 27  # auto on CPU
    assert chunk_rows(0, 151936, acc) == (1024 << 20) // (4 * 151936)
    assert chunk_rows(64, 49152, cpu) == 341
    assert chunk_rows(1, 10**7, cpu) == 1
    assert chunk_rows(-1, 49152, cpu) is None
    with pytest.raises(ConfigError, match="logits_chunk_mib"):
        resolve_config(None, ["trainer.logits_chunk_mib=-2"])


@pytest.mark.parametrize("need", ["hidden", "weight"])
def test_only_the_gradients_asked_for(need):
    """A frozen head (the quickstart's tied, frozen embeddings) or frozen hidden states: the
    other gradient is still the whole logits' one, and none is made for the frozen input."""
    h, w, y, g_lp, g_ent = _inputs()
    want = _grads(_whole, h, w, y, g_lp, g_ent)
    h = h.clone().requires_grad_(need == "hidden")
    w = w.clone().requires_grad_(need == "weight")
    lp, ent = head_logprobs(h, w, y, 5, with_entropy=True)
    (lp * g_lp + ent * g_ent).sum().backward()
    got, other = (h.grad, w.grad) if need == "hidden" else (w.grad, h.grad)
    assert other is None
    torch.testing.assert_close(got, want[2] if need == "hidden" else want[3], atol=1e-5, rtol=1e-5)


def test_entropy_alone_and_bf16_weights():
    """A loss of the entropy only (no log-prob gradient arrives), and bf16 weights without
    autocast (the matmul in bf16, the softmax in fp32)."""
    h, w, y, _, g_ent = _inputs()
    zero = torch.zeros_like(g_ent)
    want = _grads(_whole, h, w, y, zero, g_ent)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    _, ent = head_logprobs(hh, ww, y, 5, with_entropy=True)
    (ent * g_ent).sum().backward()
    torch.testing.assert_close(hh.grad, want[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ww.grad, want[3], atol=1e-5, rtol=1e-5)
    hb, wb = h.bfloat16(), w.bfloat16()
    g_lp = torch.randn(37, generator=torch.Generator().manual_seed(3))
    plain = _grads(_whole, hb, wb, y, g_lp, g_ent)
    mine = _grads(lambda h, w, y: head_logprobs(h, w, y, 5, with_entropy=True), hb, wb, y,
                  g_lp, g_ent)  # fmt: skip
    assert mine[2].dtype == mine[3].dtype == torch.bfloat16
    torch.testing.assert_close(mine[0], plain[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(mine[2:], plain[2:], strict=True):
        assert (a.float() - b.float()).norm() <= 2**-7 * b.float().norm()


@pytest.mark.parametrize("chunk", [0, 1, -1])
def test_response_forward_chunked_equals_the_whole_head(tiny_qwen2, chunk, monkeypatch):
    """Through the real tiny Qwen2 (vocab 151936: auto = 27 rows a chunk, 1 MiB = 1 row): the
    chunked head gives logits_at="all"'s log-probs, entropies and parameter gradients."""
    import sr1.train.head as head_mod

    calls = []
    real = head_mod.head_logprobs

    def spy(hidden, weight, labels, rows, *a, **kw):
        calls.append((hidden.shape[0], rows))
        return real(hidden, weight, labels, rows, *a, **kw)

    monkeypatch.setattr(head_mod, "head_logprobs", spy)
    tr = RLTrainer(tiny_cfg("grpo", "algorithm.kl_coef=0"), model_path=tiny_qwen2)
    b = collate(hand_trajectories(tr.tokenizer), tr.pad_id)
    sel = b.response_mask > 0
    assert sel.sum() > 27  # several chunks under auto
    assert_heads_agree(tr.policy, b, {"logits_chunk_mib": chunk}, {"logits_at": "all"})
    # the chunked head ran (once, over every selected token, in the rows asked for) or not
    want_rows = {0: 27, 1: 1}.get(chunk)
    assert calls == ([(int(sel.sum()), want_rows)] if want_rows else [])
    assert "forward" not in vars(tr.policy.get_output_embeddings())  # the head is itself again


def test_a_model_that_changes_the_heads_output_is_refused(tiny_qwen2):
    """A model that post-processes the head's output (softcapping, scaling) would turn the
    chunked head's log-probs into nonsense: refused, with the setting that avoids it."""
    tr = RLTrainer(tiny_cfg("grpo", "algorithm.kl_coef=0"), model_path=tiny_qwen2)
    b = collate(hand_trajectories(tr.tokenizer), tr.pad_id)
    head = tr.policy.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _a, out: 30 * torch.tanh(out / 30))  # softcap
    try:
        with pytest.raises(RuntimeError, match="logits_chunk_mib=-1"):
            response_forward(tr.policy, b)
        lp, _ = response_forward(tr.policy, b, logits_chunk_mib=-1)  # the plain head works
        assert torch.isfinite(lp).all()
    finally:
        handle.remove()
