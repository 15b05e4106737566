"""One RL update on the real tiny Qwen2, from hand-built trajectories (no rollout needed)."""

from __future__ import annotations

import pytest
import torch

from sr1.algos import core
from sr1.errors import ConfigError, NotFoundError, Sr1Error
from sr1.train.batch import batched_logprobs, collate, padded_tokens, response_forward
from sr1.train.trainer import RLTrainer

from .helpers import assert_heads_agree, hand_trajectories, tiny_cfg

torch.set_num_threads(1)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _unchanged(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    after = dict(module.named_parameters())
    return [n for n, p in before.items() if torch.equal(p, after[n].detach())]


@pytest.mark.parametrize("algo", ["grpo", "ppo", "rloo", "reinforce_pp"])
def test_every_trainable_parameter_changes(tiny_qwen2, algo):
    tr = RLTrainer(tiny_cfg(algo, "trainer.mini_batch_size=8", "trainer.micro_batch_size=4"),
                   model_path=tiny_qwen2)  # fmt: skip
    before = _snapshot(tr.policy)
    critic_before = _snapshot(tr.critic) if tr.critic is not None else {}
    m = tr.step_on(hand_trajectories(tr.tokenizer, n_prompts=2))
    assert not _unchanged(before, tr.policy), algo
    if algo == "ppo":
        assert not _unchanged(critic_before, tr.critic)
        assert "critic/vf_loss" in m
    for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/entropy", "actor/grad_norm",
                "actor/kl", "actor/kl_loss", "actor/lr", "reward/mean", "length/masked_share",
                "search/frac_1"):  # fmt: skip
        assert key in m, key
    assert 0 < m["length/masked_share"] < 1 and m["search/frac_1"] == 1.0
    assert tr.global_step == 1 and tr.updates == 1


def test_old_logprobs_match_an_unpadded_forward(tiny_qwen2):
    """Left/right padding and micro-batching do not change a trajectory's log-probs."""
    tr = RLTrainer(tiny_cfg("grpo", "algorithm.kl_coef=0"), model_path=tiny_qwen2)
    trajs = hand_trajectories(tr.tokenizer, n_prompts=3)
    lp, ent = batched_logprobs(tr.policy, collate(trajs, tr.pad_id), 4, with_entropy=True)
    for b in (0, 3):
        t = trajs[b]
        ids = torch.tensor([t.prompt_ids + t.response_ids])
        with torch.no_grad():
            logits = tr.policy(ids).logits[0, len(t.prompt_ids) - 1 : -1].float()
        want = torch.log_softmax(logits, -1).gather(-1, ids[0, len(t.prompt_ids) :, None])
        m = torch.tensor(t.loss_mask, dtype=torch.bool)  # the head runs at policy tokens only
        assert m.any() and not m.all()
        torch.testing.assert_close(
            lp[b, : len(t.response_ids)][m], want.squeeze(-1)[m], atol=1e-4, rtol=1e-4
        )
        assert torch.all(lp[b, : len(t.response_ids)][~m] == 0)
        assert torch.all(lp[b, len(t.response_ids) :] == 0)
        assert ent is not None and torch.all(ent[b, : len(t.response_ids)][m] > 0)


@pytest.mark.parametrize("use_mask", [True, False])
def test_policy_token_head_equals_the_full_head(tiny_qwen2, use_mask):
    """logits_at="policy" (the head projects only tokens the loss sees) gives the full head's
    log-probs, entropies and gradients at those tokens; with observations unmasked (the
    ablation) that is every response token."""
    tr = RLTrainer(tiny_cfg("grpo", "algorithm.kl_coef=0"), model_path=tiny_qwen2)
    b = collate(hand_trajectories(tr.tokenizer), tr.pad_id, use_mask=use_mask)
    sel = b.response_mask > 0
    assert (
        sel.sum() < b.response_valid.sum()
        if use_mask
        else bool(torch.all(sel == (b.response_valid > 0)))
    )
    assert_heads_agree(tr.policy, b, {"logits_at": "policy"}, {"logits_at": "all"})
    with pytest.raises(ValueError, match="logits_at='every'.*policy"):
        response_forward(tr.policy, b, logits_at="every")


def test_inserted_tokens_cannot_change_the_update(tiny_qwen2):
    """Advantages/old log-probs at inserted (mask-0) positions have no effect on gradients."""
    cfg = tiny_cfg("grpo", "trainer.mini_batch_size=8", "trainer.reuse_old_logprobs=false")
    tr = RLTrainer(cfg, model_path=tiny_qwen2)
    b1 = tr.prepare_batch(hand_trajectories(tr.tokenizer))
    b2 = tr.prepare_batch(hand_trajectories(tr.tokenizer))
    inserted = (b2.response_mask == 0) & (b2.response_valid == 1)
    assert inserted.any()
    b2.advantages = torch.where(inserted, torch.randn_like(b2.advantages) * 100, b2.advantages)
    b2.old_logprobs = torch.where(inserted, b2.old_logprobs - 5, b2.old_logprobs)
    grads = []
    for b in (b1, b2):
        tr.optimizer.zero_grad()
        lp, _ = response_forward(tr.policy, b)
        loss, _ = core.policy_loss(
            "vanilla", lp, b.old_logprobs, b.advantages, b.response_mask, cfg.algorithm
        )
        loss.backward()
        grads.append(
            {n: p.grad.clone() for n, p in tr.policy.named_parameters() if p.grad is not None}
        )
    assert grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=0, rtol=0)


def test_lora_trains_adapters_and_checkpoint_is_plain_hf(tiny_qwen2, tmp_path):
    from transformers import AutoModelForCausalLM

    tr = RLTrainer(
        tiny_cfg("rloo", "trainer.lora_rank=4", "trainer.mini_batch_size=8"), model_path=tiny_qwen2
    )
    assert tr.ref is None  # the reference is the base with the adapter switched off
    lora_b = {n: p.detach().clone() for n, p in tr.policy.named_parameters() if "lora_B" in n}
    assert lora_b
    m = tr.step_on(hand_trajectories(tr.tokenizer))
    assert m["actor/kl"] == pytest.approx(0.0, abs=1e-6)  # adapter starts at zero: policy == ref
    assert not _unchanged(lora_b, tr.policy)
    out = tr.save(tmp_path / "ck", {"step": 1})
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(ids).logits, tr.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )
    assert (out / "adapter").is_dir() and (out / "trainer_state.pt").is_file()


def test_group_algorithm_needs_samples(tiny_qwen2):
    with pytest.raises(ConfigError, match="n_samples"):
        RLTrainer(tiny_cfg("grpo", "rollout.n_samples=1"), model_path=tiny_qwen2)


def test_unknown_names_list_valid(tiny_qwen2):
    with pytest.raises(NotFoundError, match="grpo, ppo, reinforce_pp, rloo"):
        RLTrainer(tiny_cfg("dpo"), model_path=tiny_qwen2)
    with pytest.raises(NotFoundError, match="k1, k2, k3"):
        RLTrainer(tiny_cfg("grpo", "algorithm.kl_estimator=k9"), model_path=tiny_qwen2)


def test_reused_old_logprobs_give_the_same_update(tiny_qwen2):
    """One on-policy update: old log-probs from the update's own forward equal a separate pass."""
    after = []
    for reuse in ("true", "false"):
        tr = RLTrainer(
            tiny_cfg("grpo", "trainer.mini_batch_size=8", f"trainer.reuse_old_logprobs={reuse}"),
            model_path=tiny_qwen2,
        )
        tr.step_on(hand_trajectories(tr.tokenizer, n_prompts=2))
        after.append(_snapshot(tr.policy))
    for n in after[0]:
        torch.testing.assert_close(after[0][n], after[1][n], atol=2e-5, rtol=1e-3)


def test_freeze_layers_trains_only_the_upper_layers(tiny_qwen2):
    tr = RLTrainer(
        tiny_cfg("grpo", "trainer.mini_batch_size=8", "trainer.freeze_layers=1"),
        model_path=tiny_qwen2,
    )
    names = {n for n, p in tr.policy.named_parameters() if p.requires_grad}
    assert names and all("layers.1." in n or n.startswith("model.norm") for n in names)
    before = _snapshot(tr.policy)
    tr.step_on(hand_trajectories(tr.tokenizer, n_prompts=2))
    assert not _unchanged(before, tr.policy)
    with pytest.raises(Sr1Error, match="freezes every layer"):
        RLTrainer(tiny_cfg("grpo", "trainer.freeze_layers=2"), model_path=tiny_qwen2)


def test_bf16_autocast_trains_with_fp32_weights_and_logprobs(tiny_qwen2):
    """trainer.mixed_precision=bf16: the forward runs in bfloat16 (log-probs move by bf16
    rounding), weights and log-probs stay fp32, and every trainable parameter still moves."""
    tr = RLTrainer(
        tiny_cfg("grpo", "trainer.mini_batch_size=8", "trainer.mixed_precision=bf16"),
        model_path=tiny_qwen2,
    )
    trajs = hand_trajectories(tr.tokenizer, n_prompts=2)
    batch = collate(trajs, tr.pad_id)
    fp32, _ = batched_logprobs(tr.policy, batch, 4)
    with tr.autocast():
        bf16, _ = batched_logprobs(tr.policy, batch, 4)
    assert bf16.dtype == torch.float32
    diff = (bf16 - fp32).abs()[batch.response_valid.bool()]
    assert 0 < diff.max() < 0.1, diff.max()
    before = _snapshot(tr.policy)
    m = tr.step_on(trajs)
    assert not _unchanged(before, tr.policy)
    assert all(p.dtype == torch.float32 for p in tr.policy.parameters())
    assert torch.isfinite(torch.tensor(m["actor/grad_norm"]))


def test_unknown_mixed_precision_is_a_config_error(tiny_qwen2):
    with pytest.raises(Sr1Error, match="mixed_precision='fp8'.*auto, no, bf16"):
        RLTrainer(tiny_cfg("grpo", "trainer.mixed_precision=fp8"), model_path=tiny_qwen2)


def test_entropy_is_a_metric_without_a_graph_unless_it_is_in_the_loss(tiny_qwen2):
    """entropy_grad=False gives the same entropies with no autograd graph (so the (B, R, V)
    softmax is not kept for backward); with entropy_coef > 0 the bonus changes the update."""
    tr = RLTrainer(tiny_cfg("grpo", "algorithm.kl_coef=0"), model_path=tiny_qwen2)
    b = collate(hand_trajectories(tr.tokenizer), tr.pad_id)
    lp, ent_metric = response_forward(tr.policy, b, with_entropy=True, entropy_grad=False)
    _, ent_loss = response_forward(tr.policy, b, with_entropy=True, entropy_grad=True)
    assert ent_metric is not None and ent_loss is not None
    assert lp.requires_grad and ent_loss.requires_grad and not ent_metric.requires_grad
    torch.testing.assert_close(ent_metric, ent_loss.detach(), atol=0, rtol=0)

    def grads(coef: float) -> dict[str, torch.Tensor]:
        t = RLTrainer(
            tiny_cfg("grpo", "algorithm.kl_coef=0", f"algorithm.entropy_coef={coef}"),
            model_path=tiny_qwen2,
        )
        batch = t.prepare_batch(hand_trajectories(t.tokenizer))
        loss, m = t._micro_loss(batch, denom=float(batch.response_mask.sum()))
        assert m["actor/entropy"] > 0
        loss.backward()
        return {n: p.grad.clone() for n, p in t.policy.named_parameters() if p.grad is not None}

    g0, g1 = grads(0.0), grads(0.5)
    assert g0.keys() == g1.keys()
    assert any(not torch.allclose(g0[n], g1[n]) for n in g0)


def _inert_groups(tok, groups: tuple[int, ...]):
    trajs = hand_trajectories(tok, n_prompts=4, n_samples=2)
    for t in trajs:
        if t.group in groups:  # both samples score alike: GRPO advantage exactly 0
            t.reward = 1.0
    return trajs


@pytest.mark.parametrize("inert", [(0, 2), (0, 1, 2, 3)])
def test_skipping_inert_rows_gives_the_same_update(tiny_qwen2, inert):
    """Zero-advantage trajectories left out of the update (trainer.skip_inert_rows) change
    nothing: the normaliser still counts their tokens and the optimiser still steps (Adam
    moves weights on zero gradients too once it has momentum, so two steps are taken)."""
    sets = ("trainer.mini_batch_size=8", "trainer.micro_batch_size=2",
            "algorithm.kl_coef=0", "algorithm.entropy_coef=0")  # fmt: skip
    after, fracs = [], []
    for skip in ("true", "false"):
        tr = RLTrainer(tiny_cfg("grpo", *sets, f"trainer.skip_inert_rows={skip}"),
                       model_path=tiny_qwen2)  # fmt: skip
        assert tr.skip_inert == (skip == "true")
        tr.step_on(hand_trajectories(tr.tokenizer, n_prompts=4, n_samples=2))
        m = tr.step_on(_inert_groups(tr.tokenizer, inert))
        after.append(_snapshot(tr.policy))
        fracs.append(m["perf/update_rows_frac"])
    live = 8 - 2 * len(inert)
    assert fracs == [max(live, 1) / 8, 1.0]
    for n in after[0]:
        torch.testing.assert_close(after[0][n], after[1][n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "sets",
    [
        ("algorithm.kl_coef=0.05", "algorithm.entropy_coef=0"),
        ("algorithm.kl_coef=0", "algorithm.entropy_coef=0.01"),
    ],
)
def test_inert_rows_are_computed_when_another_term_sees_them(tiny_qwen2, sets):
    """A KL or entropy term has a gradient at zero advantage: nothing is skipped."""
    tr = RLTrainer(tiny_cfg("grpo", "trainer.mini_batch_size=8", *sets), model_path=tiny_qwen2)
    assert not tr.skip_inert
    m = tr.step_on(_inert_groups(tr.tokenizer, (0, 1)))
    assert m["perf/update_rows_frac"] == 1.0


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_micro_batching_in_length_order_gives_the_same_update(tiny_qwen2, algo):
    """Micro-batches of 2 rows in length order, or under a token budget (old, reference and
    value passes and the update), give one 8-row micro-batch's update and metrics: the split
    only sums differently. In fp32 and with adam_eps 1e-6: Adam's first step is
    lr * g / (|g| + eps), so where a gradient is ~1e-8 a summation-order difference moves it by
    a good part of lr (5% seen), and bf16 autocast rounds the products of a different split
    differently."""
    out = []
    for sets in (["trainer.micro_batch_size=8"], ["trainer.micro_batch_size=2"],
                 ["trainer.micro_batch_size=8", "trainer.micro_batch_tokens=160"]):  # fmt: skip
        tr = RLTrainer(
            tiny_cfg(algo, "trainer.mini_batch_size=8", *sets, "trainer.mixed_precision=no",
                     "trainer.adam_eps=1e-6", "trainer.reuse_old_logprobs=false",
                     "algorithm.kl_coef=0.05"),
            model_path=tiny_qwen2,
        )  # fmt: skip
        m = tr.step_on(hand_trajectories(tr.tokenizer, n_prompts=4, n_samples=2))
        out.append((_snapshot(tr.policy), m))
    (a, ma), (b, mb), (c, mc) = out
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-5, rtol=1e-3)  # 1% of an Adam step
        torch.testing.assert_close(a[n], c[n], atol=1e-5, rtol=1e-3)
    for k in ("actor/pg_loss", "actor/kl", "actor/entropy", "actor/grad_norm"):
        assert mb[k] == pytest.approx(ma[k], rel=1e-4, abs=1e-6), k
        assert mc[k] == pytest.approx(ma[k], rel=1e-4, abs=1e-6), k
    # the budget's split: several micro-batches, each within 160 positions, less padding
    trajs = hand_trajectories(tr.tokenizer, n_prompts=4, n_samples=2)
    groups = tr.micro_split(collate(trajs, tr.pad_id), torch.arange(8))
    assert len(groups) > 1
    for g in groups:
        assert len(g) == 1 or padded_tokens(collate([trajs[i] for i in g], tr.pad_id)) <= 160
    assert mc["perf/update_padded_tokens"] < ma["perf/update_padded_tokens"]
    # padding's cost: the positions the forwards computed hold every real token; 2-row
    # micro-batches in length order compute fewer than one 8-row one padded to the longest
    trajs = hand_trajectories(tr.tokenizer, n_prompts=4, n_samples=2)
    real = sum(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    longest = max(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    assert ma["perf/update_padded_tokens"] == 8 * longest
    for m in (ma, mb):
        assert m["perf/update_padded_tokens"] * (1 - m["perf/update_pad_frac"]) == (
            pytest.approx(real)
        )
    assert real < mb["perf/update_padded_tokens"] < ma["perf/update_padded_tokens"]


def test_engine_dtype_is_bf16_for_own_weights_and_the_policys_for_inprocess_hf(
    tiny_qwen2, monkeypatch
):
    """``model.dtype: auto`` on a bf16-native CPU (forced by SR1_CPU_BF16=1): the policy trains
    fp32; an engine that loads its own weights (vLLM, an engine process) runs bf16, the
    in-process HF engine runs the policy module itself (fp32). What a train run records."""
    from sr1 import models

    monkeypatch.setenv(models.CPU_BF16_ENV, "1")
    for sets, want in (
        (["rollout.engine=hf", "rollout.placement=inprocess"], "float32"),
        (["rollout.engine=vllm", "rollout.placement=process"], "bfloat16"),
        (["rollout.engine=vllm", "rollout.placement=inprocess"], "bfloat16"),
        (["rollout.engine_url=http://127.0.0.1:9"], None),
    ):
        tr = RLTrainer(tiny_cfg("grpo", "model.dtype=auto", *sets), model_path=tiny_qwen2)
        assert tr.dtype == torch.float32, sets
        assert tr.engine_dtype() == want, sets
