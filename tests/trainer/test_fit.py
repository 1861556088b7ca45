"""fit_class on generated scans: a diverging fit leaves no model behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import FitConfig, UFFConfig, get_preset
from core.features import FeatureRunners
from trainer.errors import TrainingError
from trainer.fit import fit_class


def test_a_diverging_uff_fails_the_fit_and_saves_no_model(tiny_dataset: Path, tmp_path: Path) -> None:
    class_name = sorted(p.name for p in tiny_dataset.iterdir() if (p / "train").is_dir())[0]
    # A learning rate of 1e12 makes the real InfoNCE loss NaN within a few steps (no patched loss).
    cfg = FitConfig(
        preset=get_preset("m3dm-free"), uff=UFFConfig(lr=1e12, epochs=2, warmup_epochs=0, min_steps=0)
    )
    out = tmp_path / class_name
    with pytest.raises(TrainingError, match=r"UFF training diverged: loss is nan at epoch \d+/2, step \d+/2"):
        fit_class(tiny_dataset, class_name, cfg, FeatureRunners(), out)
    assert not (out / "model.json").exists() and not (out / "uff.safetensors").exists()
