"""User-given names never become paths out of SR1_HOME, and checkpoint states never run code.

``--split ../../x`` and ``train --resume ../../x`` used to write a parquet file outside the home
and load ``config.yaml`` and a pickled ``trainer_state.pt`` (``weights_only=False``) from a
folder outside it. Now every such name goes through :func:`sr1.paths.safe_name` (a ConfigError:
one ``error:`` line, exit 2) and every trainer state is read with ``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sr1 import paths
from sr1.cli.main import main
from sr1.errors import ConfigError, Sr1Error
from sr1.train.checkpoint import STATE_FILE, load_state, rng_state, set_rng_state
from tests.train.helpers import QUESTIONS, build_tiny_index, tiny_cfg

torch.set_num_threads(1)


class _Payload:
    """Unpickling this creates ``marker``: what a crafted ``trainer_state.pt`` could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _crafted_state(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 1, "rng": _Payload(marker)}, path)


def _outside_files(root: Path, home: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and home not in p.parents}


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def _qa_source(root: Path) -> Path:
    src = root / "src"
    (src / "nq").mkdir(parents=True)
    rows = "".join(
        json.dumps({"id": i, "question": q, "golden_answers": g}) + "\n" for i, q, g in QUESTIONS
    )
    for split in ("train", "dev"):
        (src / "nq" / f"{split}.jsonl").write_text(rows)
    return src


# -- the one helper ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    ["", "..", "../../x", "a/b", "/etc/passwd", "a\\b", ".hidden", "a..b", "x\x00y", "x\ny",
     "x" * 129],
)  # fmt: skip
def test_safe_name_refuses_anything_that_is_not_one_plain_name(bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid split"):
        paths.safe_name("split", bad)


@pytest.mark.parametrize("good", ["dev", "train", "test_2", "grpo-20261201-101010-ab12", "v1.5"])
def test_safe_name_accepts_plain_names(good: str) -> None:
    assert paths.safe_name("split", good) == good


def test_within_home_follows_symlinks(sr1_home: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    link = paths.runs_dir() / "linked"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="outside SR1_HOME"):
        paths.run_dir("linked")
    assert paths.run_dir("fine") == sr1_home.resolve() / "runs" / "fine"


# -- the CLI: refused with exit 2, nothing written outside the home ------------------------------
@pytest.mark.parametrize("split", ["../../x", "../../../x", "../../../../x"])
def test_prepare_split_cannot_escape_home(
    split: str, sr1_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _qa_source(tmp_path)
    # what the traversal would read: <src>/nq/<split>.jsonl, whichever level it lands on
    for d in (tmp_path, src, tmp_path.parent):
        (d / "x.jsonl").write_text(json.dumps({"id": 1, "question": "q?", "golden_answers": ["a"]}))
    before = _outside_files(tmp_path.parent, sr1_home)
    assert main(["data", "prepare", "nq", "--source-dir", str(src), "--split", split]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "invalid split" in line and split in line
    assert _outside_files(tmp_path.parent, sr1_home) == before
    assert not list(tmp_path.parent.rglob("x.parquet"))
    for d in (tmp_path, src, tmp_path.parent):
        (d / "x.jsonl").unlink()


def test_prepare_with_a_plain_split_still_works(sr1_home: Path, tmp_path: Path) -> None:
    src = _qa_source(tmp_path)
    assert main(["data", "prepare", "nq", "--source-dir", str(src), "--split", "dev"]) == 0
    assert (sr1_home / "data" / "nq" / "dev.parquet").is_file()


def test_train_resume_cannot_escape_home(
    sr1_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from sr1.config import to_dict

    # runs/../../x is <tmp_path>/x: a run folder outside the home with a code-running state
    outside = tmp_path / "x"
    outside.mkdir()
    (outside / "config.yaml").write_text(yaml.safe_dump(to_dict(tiny_cfg())))
    marker = tmp_path / "pwned"
    _crafted_state(outside / "checkpoints" / "step-1" / STATE_FILE, marker)
    before = _outside_files(tmp_path, sr1_home)
    assert main(["train", "--resume", "../../x"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "invalid run id" in line and "../../x" in line
    assert not marker.exists()
    assert _outside_files(tmp_path, sr1_home) == before


@pytest.mark.parametrize("flag", ["--run", "--resume"])
def test_eval_run_ids_cannot_escape_home(
    flag: str, sr1_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", "--dataset", "nq", flag, "../../x"]
    assert main(args) == 2
    _one_error_line(capsys.readouterr().err)


def test_eval_split_cannot_escape_home(
    tiny_qwen2: str, sr1_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _qa_source(tmp_path)
    (tmp_path / "x.jsonl").write_text(
        json.dumps({"id": 1, "question": "q?", "golden_answers": ["a"]})
    )
    args = ["eval", "--dataset", "nq", "--model", tiny_qwen2, "--method", "direct"]
    assert main([*args, "--source-dir", str(src), "--split", "../../x"]) == 2
    assert "invalid split" in _one_error_line(capsys.readouterr().err)
    assert not list(tmp_path.parent.rglob("x.parquet"))


# -- checkpoint states: weights_only, with an allow-list ------------------------------------------
def test_rng_state_is_weights_only_loadable_and_roundtrips(tmp_path: Path) -> None:
    np.random.seed(5)
    torch.manual_seed(5)
    torch.save({"rng": rng_state(), "step": 3}, tmp_path / STATE_FILE)
    want = (np.random.rand(3), torch.rand(3))
    np.random.seed(99)
    torch.manual_seed(99)
    st = torch.load(tmp_path / STATE_FILE, weights_only=True)  # no allow-list needed
    set_rng_state(st["rng"])
    got = (np.random.rand(3), torch.rand(3))
    assert np.array_equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_states_with_a_numpy_rng_array_still_load(tmp_path: Path) -> None:
    """Checkpoints written before the key became a list hold numpy's own state tuple."""
    import random

    np.random.seed(7)
    legacy = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    torch.save({"rng": legacy, "step": 2}, tmp_path / STATE_FILE)
    want = np.random.rand(2)
    st = load_state(tmp_path)
    set_rng_state(st["rng"])
    assert np.array_equal(np.random.rand(2), want) and st["step"] == 2


def test_crafted_state_is_refused_without_running_it(tmp_path: Path) -> None:
    _crafted_state(tmp_path / "ckpt" / STATE_FILE, tmp_path / "pwned")
    with pytest.raises(Sr1Error, match="refusing to load"):
        load_state(tmp_path / "ckpt")
    assert not (tmp_path / "pwned").exists()
    # the payload is live: the old weights_only=False load would have run it
    torch.load(tmp_path / "ckpt" / STATE_FILE, weights_only=False)
    assert (tmp_path / "pwned").exists()


def test_crafted_state_in_a_real_run_is_refused_on_resume(
    tiny_qwen2: str, sr1_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sr1.train.trainer import train

    src = _qa_source(tmp_path)
    index = build_tiny_index(tmp_path)
    cfg = tiny_cfg(
        "grpo",
        f"retrieval.index={index}",
        "trainer.save_every=1",
        "data.train_datasets=[nq]",
        f"data.source_dir={src}",
    )
    res = train(cfg, "grpo", tiny_qwen2, max_steps=1, progress=False)
    ckpt = sr1_home / "runs" / res["run_id"] / "checkpoints" / "step-1"
    assert load_state(ckpt)["step"] == 1  # what sr1 writes loads under weights_only
    marker = tmp_path / "pwned"
    _crafted_state(ckpt / STATE_FILE, marker)
    assert main(["train", "--resume", res["run_id"], "--max-steps", "2"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "refusing to load" in line and STATE_FILE in line
    assert not marker.exists()
