"""Config precedence (defaults < YAML < --set), type coercion, and loud unknown-key errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sr1.config import ExperimentConfig, help_table, parse_set, resolve_config, to_dict
from sr1.errors import ConfigError


def test_defaults_yaml_set_precedence(tmp_path: Path) -> None:
    y = tmp_path / "exp.yaml"
    y.write_text("trainer:\n  lr: 2.0e-5\n  max_steps: 7\nrollout:\n  max_turns: 3\n")
    cfg = resolve_config(y, ["trainer.lr=3e-5", "algorithm.name=ppo"])
    assert cfg.trainer.lr == pytest.approx(3e-5)  # --set beats YAML
    assert cfg.trainer.max_steps == 7  # YAML beats default
    assert cfg.rollout.max_turns == 3
    assert cfg.algorithm.name == "ppo"
    assert cfg.rollout.topk if hasattr(cfg.rollout, "topk") else True
    assert cfg.retrieval.topk == ExperimentConfig().retrieval.topk  # untouched default


def test_flag_updates_between_yaml_and_set(tmp_path: Path) -> None:
    y = tmp_path / "exp.yaml"
    y.write_text("rollout:\n  engine: vllm\n  max_turns: 4\n")
    cfg = resolve_config(y, ["rollout.max_turns=1"], rollout={"engine": "hf", "max_turns": 2})
    assert cfg.rollout.engine == "hf"  # CLI flag beats YAML
    assert cfg.rollout.max_turns == 1  # --set beats CLI flag


def test_unknown_keys_name_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'lrr'.*valid keys: .*\blr\b"):
        resolve_config(None, ["trainer.lrr=1"])
    y = tmp_path / "bad.yaml"
    y.write_text("trainr:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'trainr'.*trainer"):
        resolve_config(y)


def test_type_errors_and_coercion() -> None:
    with pytest.raises(ConfigError, match="expected an integer"):
        resolve_config(None, ["trainer.max_steps=abc"])
    with pytest.raises(ConfigError, match="expected true/false"):
        resolve_config(None, ["algorithm.use_mask=maybe"])
    cfg = resolve_config(
        None, ["data.train_datasets=nq,triviaqa", "eval.limit=none", "algorithm.use_mask=false"]
    )
    assert cfg.data.train_datasets == ["nq", "triviaqa"]
    assert cfg.eval.limit is None
    assert cfg.algorithm.use_mask is False


def test_no_and_off_are_words_not_booleans(tmp_path: Path) -> None:
    """YAML 1.1 reads no/off/yes/on as booleans; the config reads them as YAML 1.2 does, so
    ``trainer.mixed_precision=no`` (a documented value) is "no", from --set and from a file,
    while boolean fields still take them."""
    sets = ["trainer.mixed_precision=no", "trainer.skip_inert_rows=off", "algorithm.use_mask=on"]
    cfg = resolve_config(None, sets)
    assert cfg.trainer.mixed_precision == "no"
    assert cfg.trainer.skip_inert_rows is False and cfg.algorithm.use_mask is True
    y = tmp_path / "exp.yaml"
    y.write_text("trainer:\n  mixed_precision: no\n  skip_inert_rows: no\n")
    cfg = resolve_config(y)
    assert cfg.trainer.mixed_precision == "no" and cfg.trainer.skip_inert_rows is False
    assert parse_set(["a.b=true", "a.c=False", "a.d=no"]) == {
        "a": {"b": True, "c": False, "d": "no"}
    }
    # everything else reads as PyYAML's safe loader reads it
    import yaml

    from sr1.config import _yaml_load

    for text in ("1e-5", "1.0e-5", "null", "~", "0755", "0o755", "0x1f", "1:30", ".inf", "-3",
                 "2026-12-07", "[1, a]", "{a: 1}", "'no'", "x: &a 1\ny: *a"):  # fmt: skip
        assert _yaml_load(text) == yaml.safe_load(text), text


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    y = tmp_path / "broken.yaml"
    y.write_text("trainer:\n  lr: 1\n  bad: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: invalid YAML"):
        resolve_config(y)
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["trainer.lr"])


def test_config_is_frozen_and_documented() -> None:
    cfg = ExperimentConfig()
    with pytest.raises(AttributeError):
        cfg.trainer.lr = 1.0  # type: ignore[misc]
    rows = help_table()
    assert all(h for _, _, h in rows), [k for k, _, h in rows if not h]
    assert to_dict(cfg)["trainer"]["lr"] == cfg.trainer.lr


def test_shipped_experiment_yamls_resolve() -> None:
    exp = Path(__file__).resolve().parents[2] / "experiments"
    files = sorted(exp.glob("*.yaml"))
    assert files, "experiments/ should ship YAML configs"
    for f in files:
        resolve_config(f)
