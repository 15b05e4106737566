"""Models (real tokenizer, tiny and SmolLM2 checkpoints) and the CLI's error contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sr1 import models
from sr1.cli.main import app, main
from sr1.errors import NotFoundError

TAGS = "<think> hmm </think>\n<search> capital of France </search>\n\n<information>Doc 1(Title: Paris) x</information>\n\n<answer> Paris </answer>"


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "smollm2"])
def test_local_models_load_and_roundtrip_tags(fixture: str, request: pytest.FixtureRequest) -> None:
    import torch

    path = request.getfixturevalue(fixture)
    tok = models.load_tokenizer(path)
    ids = tok(TAGS, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == TAGS
    model = models.load_model(path, device="cpu")
    assert model.dtype == torch.float32
    with torch.no_grad():
        out = model(torch.tensor([ids[:16]]))
    assert out.logits.shape[:2] == (1, 16)
    assert tok.chat_template, "both local models ship a chat template"


def test_tiny_qwen2_uses_real_qwen_tokenizer(tiny_qwen2: str) -> None:
    tok = models.load_tokenizer(tiny_qwen2)
    assert len(tok) == 151669
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    # the documented pitfall: </search> is split across tokens
    assert tok.tokenize(" </search>\n\n") == ["Ġ</", "search", ">ĊĊ"]
    cfg = json.loads((Path(tiny_qwen2) / "config.json").read_text())
    assert cfg["hidden_size"] // cfg["num_attention_heads"] >= 32  # vLLM CPU attention needs it


def test_fetch_via_cli_and_list(sr1_home: Path) -> None:
    r = CliRunner().invoke(app, ["model", "fetch", "tiny-qwen2", "--json"])
    assert r.exit_code == 0, r.output
    path = Path(json.loads(r.stdout)["path"])
    assert (path / "config.json").is_file() and path.parent == sr1_home / "models"
    assert models.resolve("tiny-qwen2") == str(path)
    r = CliRunner().invoke(app, ["model", "list", "--json"])
    rows = {m["name"]: m for m in json.loads(r.stdout)}
    assert rows["tiny-qwen2"]["present"] and rows["qwen2.5-7b"]["location"] == "Qwen/Qwen2.5-7B"


def test_resolution_rules(sr1_home: Path, tmp_path: Path) -> None:
    assert models.resolve("qwen2.5-3b") == "Qwen/Qwen2.5-3B"
    assert models.resolve("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    with pytest.raises(NotFoundError, match="no config.json"):
        models.resolve(str(tmp_path))


def test_local_alias_is_fetched_on_first_use(sr1_home: Path, capsys) -> None:
    """What `sr1 eval --model tiny-qwen2` (and train, sft, rollout) do on a fresh SR1_HOME."""
    d = sr1_home / "models" / "tiny-qwen2"
    assert not d.exists()
    assert models.resolve("tiny-qwen2") == str(d)
    assert "fetching tiny-qwen2" in capsys.readouterr().err
    assert (d / "config.json").is_file() and (d / "sr1_model.json").is_file()
    mtime = (d / "config.json").stat().st_mtime_ns
    model = models.load_model("tiny-qwen2", device="cpu")  # the second use finds it
    assert model.config.hidden_size == models.TINY_QWEN2["hidden_size"]
    assert (d / "config.json").stat().st_mtime_ns == mtime
    assert "fetching" not in capsys.readouterr().err
    assert models.model_fingerprint("tiny-qwen2")["alias"] == "tiny-qwen2"


def test_fetch_tolerates_a_concurrent_fetch(sr1_home: Path, monkeypatch) -> None:
    """Two DDP ranks may fetch the same alias at once: the loser finds the winner's copy."""
    out = sr1_home / "models" / "tiny-qwen2"

    def racing_fetch(tmp: Path) -> None:
        out.mkdir(parents=True)  # the other rank finishes first ...
        (out / "config.json").write_text("{}", encoding="utf-8")
        (tmp / "config.json").write_text("{}", encoding="utf-8")  # ... then this one

    monkeypatch.setitem(models._FETCHERS, "tiny-qwen2", racing_fetch)
    assert models.fetch("tiny-qwen2") == out
    assert [p.name for p in out.parent.iterdir()] == ["tiny-qwen2"]  # no temp dir left


def test_cli_errors_are_one_line_with_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "fetch", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "error: unknown model 'no-such-model'" in err and "Traceback" not in err
    assert "tiny-qwen2" in err
    assert main(["runs", "show", "nope"]) == 2
    assert "unknown run id" in capsys.readouterr().err


def test_help_lists_command_groups() -> None:
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0
    for group in ("model", "runs"):
        assert group in r.output
