"""``model.dtype: auto`` on CPU follows this CPU's bf16 capabilities, and says which ran."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sr1 import models
from sr1.errors import Sr1Error


@pytest.fixture()
def detect(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real detection (tests/conftest.py pins SR1_CPU_BF16=0 for everything else)."""
    monkeypatch.delenv(models.CPU_BF16_ENV, raising=False)


def test_auto_on_cpu_is_bf16_exactly_when_the_cpu_has_amx_or_avx512_bf16(detect: None) -> None:
    flags = models.cpu_flags()
    assert set(models.CPU_BF16_FLAGS) <= set(flags)
    native = bool(flags["amx_bf16"] or flags["avx512_bf16"])
    assert models.cpu_bf16_native() is native
    assert models.pick_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    # weights an optimiser updates stay fp32 on CPU; bf16 compute is trainer.mixed_precision
    assert models.pick_dtype("auto", "cpu", training=True) == torch.float32
    rep = models.dtype_report("auto", "cpu")
    assert rep["resolved"] == ("bfloat16" if native else "float32")
    assert rep["cpu_bf16_native"] is native and rep["override"] is None
    assert rep["cpu_flags"]["avx512_bf16"] is flags["avx512_bf16"]
    assert models.dtype_report("auto", "cpu", training=True)["resolved"] == "float32"


def test_override_and_explicit_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(models.CPU_BF16_ENV, "1")
    assert models.pick_dtype("auto", "cpu") == torch.bfloat16
    assert models.dtype_report("auto", "cpu")["override"] == "1"
    monkeypatch.setenv(models.CPU_BF16_ENV, "0")
    assert models.pick_dtype("auto", "cpu") == torch.float32
    assert models.pick_dtype("bfloat16", "cpu") == torch.bfloat16  # explicit: as given
    assert models.pick_dtype("float32", "cpu") == torch.float32
    assert models.pick_dtype("bfloat16", "cpu", training=True) == torch.bfloat16
    with pytest.raises(Sr1Error, match="valid: auto, float32, bfloat16, float16"):
        models.pick_dtype("int4", "cpu")


def test_engines_generate_in_bf16_where_training_keeps_fp32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``model.dtype: auto`` on a CPU that runs bf16 natively: an engine that loads its own
    weights (eval, vLLM, an engine process) runs bf16 while sr1 train/sft keep fp32 weights;
    what it ran is recorded (:func:`engine_dtype_report`), a served engine's is not known."""
    from sr1.config import resolve_config
    from sr1.rollout.placement import engine_dtype_report

    monkeypatch.setenv(models.CPU_BF16_ENV, "1")
    cfg = resolve_config(None, ["model.dtype=auto", "model.device=cpu"])
    assert engine_dtype_report(cfg)["resolved"] == "bfloat16"
    assert models.dtype_report("auto", "cpu", training=True)["resolved"] == "float32"
    pinned = resolve_config(None, ["model.dtype=float32", "model.device=cpu"])
    assert engine_dtype_report(pinned)["resolved"] == "float32"
    served = resolve_config(None, ["rollout.engine_url=http://127.0.0.1:9"])
    assert engine_dtype_report(served)["resolved"] is None
    monkeypatch.setenv(models.CPU_BF16_ENV, "0")
    assert engine_dtype_report(cfg)["resolved"] == "float32"


def test_proc_cpuinfo_flags_are_parsed(tmp_path: Path) -> None:
    p = tmp_path / "cpuinfo"
    p.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert models._proc_cpuinfo_flags(str(p)) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert models._proc_cpuinfo_flags(str(tmp_path / "missing")) == set()


def test_mixed_precision_auto_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``trainer.mixed_precision: auto`` is bf16 autocast only where the CPU runs bf16 natively
    (emulated bf16 ran a training step 24x slower than fp32 on an AVX2 EPYC); on an
    accelerator it stays Accelerate's."""
    monkeypatch.setenv(models.CPU_BF16_ENV, "1")
    assert models.resolve_mixed_precision("auto", "cpu") == "bf16"
    with models.autocast("auto", "cpu"):
        assert torch.is_autocast_enabled("cpu")
    monkeypatch.setenv(models.CPU_BF16_ENV, "0")
    assert models.resolve_mixed_precision("auto", "cpu") == "no"
    with models.autocast("auto", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    assert models.resolve_mixed_precision("auto", "cuda:0") == "auto"
    assert models.resolve_mixed_precision("no", "cpu") == "no"
    monkeypatch.setattr(models, "_WARNED_EMULATED_BF16", [])
    with pytest.warns(UserWarning, match="emulated"):
        assert models.resolve_mixed_precision("bf16", "cpu") == "bf16"  # explicit: honoured
    with pytest.raises(Sr1Error, match="auto, no, bf16"):
        models.resolve_mixed_precision("fp8", "cpu")
