"""`train` end to end on tiny-qwen2: real HF-engine rollouts, a real BM25 index, real stores.

The random tiny model never emits tags, so rewards are 0 and the updates come from the KL
and entropy terms; that is enough to check the plumbing, resume and interruption exactly.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from sr1.models import load_tokenizer
from sr1.tracking.run import RunInterrupted
from sr1.tracking.store import Store
from sr1.train import trainer as trainer_mod
from sr1.train.trainer import train

from .helpers import build_tiny_index, rows, tiny_cfg

torch.set_num_threads(1)


@pytest.fixture
def setup(tiny_qwen2, tmp_path):
    index = build_tiny_index(tmp_path)
    cfg = tiny_cfg("grpo", f"retrieval.index={index}", "trainer.save_every=1")
    return cfg, rows(load_tokenizer(tiny_qwen2))


def _weights(ckpt: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(ckpt, "model.safetensors"))


def test_train_logs_checkpoints_and_resumes_identically(tiny_qwen2, setup):
    from transformers import AutoModelForCausalLM

    from sr1.tracking.store import Store

    cfg, data = setup
    full = train(cfg, "grpo", tiny_qwen2, max_steps=2, progress=False, rows=data)
    assert [s["step"] for s in full["steps"]] == [1, 2] and not full["interrupted"]
    m = full["steps"][-1]
    for key in ("reward/mean", "reward/em", "reward/format_valid", "search/mean", "search/frac_0",
                "search/frac_1", "length/gen_tokens_mean", "length/masked_share", "actor/kl",
                "actor/pg_clipfrac", "actor/entropy", "actor/grad_norm", "actor/lr", "time/gen_s",
                "time/retrieval_s", "time/train_s", "perf/gen_tokens_per_s"):  # fmt: skip
        assert key in m, key
    assert m["search/frac_0"] + m["search/frac_1"] == pytest.approx(1.0)
    logged = {(r["step"], r["key"]) for r in Store().step_metrics(full["run_id"])}
    assert (2, "reward/mean") in logged and (1, "actor/kl") in logged
    # the final checkpoint is a plain HF model + tokenizer, and training changed it
    assert full["checkpoint"].endswith("final")
    assert AutoModelForCausalLM.from_pretrained(full["checkpoint"]) is not None
    assert load_tokenizer(full["checkpoint"]).eos_token == load_tokenizer(tiny_qwen2).eos_token
    final = _weights(full["checkpoint"])
    assert not torch.equal(final["model.norm.weight"], _weights(tiny_qwen2)["model.norm.weight"])

    # stop after step 1, resume: step 2 is the uninterrupted run's step 2, bit for bit
    part = train(cfg, "grpo", tiny_qwen2, max_steps=1, progress=False, rows=data)
    resumed = train(cfg, "", "", resume=part["run_id"], max_steps=2, progress=False, rows=data)
    assert resumed["run_id"] == part["run_id"] and resumed["start_step"] == 1
    assert [s["step"] for s in resumed["steps"]] == [2]
    a, b = full["steps"][1], resumed["steps"][0]
    for k in ("reward/mean", "length/response_mean", "actor/kl", "actor/pg_loss", "actor/entropy"):
        assert a[k] == b[k], k
    wb = _weights(resumed["checkpoint"])
    assert final.keys() == wb.keys()
    for k in final:
        assert torch.equal(final[k], wb[k]), k


def test_sigint_saves_and_stops(tiny_qwen2, setup, monkeypatch):
    cfg, data = setup
    real = trainer_mod.RLTrainer.step_on
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs as a background job

    def step_then_interrupt(self, trajs):
        out = real(self, trajs)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 1
        return out

    monkeypatch.setattr(trainer_mod.RLTrainer, "step_on", step_then_interrupt)
    with pytest.raises(RunInterrupted) as info:
        train(cfg, "grpo", tiny_qwen2, max_steps=5, progress=False, rows=data)
    e = info.value
    assert e.exit_code == 130 and e.step == 1 and e.checkpoint.endswith("step-1")
    assert f"sr1 train --resume {e.run_id}" in str(e)
    res = e.result
    assert res["interrupted"] and [s["step"] for s in res["steps"]] == [1]
    assert res["checkpoint"].endswith("step-1")
    assert Store().get_run(e.run_id)["status"] == "interrupted"
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
