"""Shared fixtures: a small generated data set and a fitted weight-free model, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two cores: keep BLAS from oversubscribing when pytest and numpy both parallelise.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, few scans, 224 px: enough for end-to-end tests in seconds."""
    from trainer.synth import CLASS_NAMES, SynthConfig, synthesize

    root = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(
        seed=7,
        classes=tuple(CLASS_NAMES[:1]),
        n_train=6,
        n_validation=4,
        n_test_good=3,
        n_test_per_defect=2,
        width_px=224,
        height_px=224,
        workers=1,
    )
    synthesize(root, cfg)
    return root


@pytest.fixture(scope="session")
def tiny_model(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weight-free model fitted on the first class of `tiny_dataset` (1 UFF epoch)."""
    from trainer.pipeline import train_classes
    from trainer.synth import CLASS_NAMES

    out = tmp_path_factory.mktemp("models")
    train_classes(tiny_dataset, out, [CLASS_NAMES[0]], False, "m3dm-free", None, False, 0, uff_epochs=1)
    return out / CLASS_NAMES[0]


@pytest.fixture(scope="session")
def fleet_bundle(tiny_dataset: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One signed m3dm-free bundle of `tiny_model` for every fleet test (station, collector, deploy).

    Returns {"bundle": dir, "tar": path, "keys": signing-key dir (bundle_signing.pub), "bundle_id", "version",
    "class_name", "data": the data-set root, "model": the model folder}. Treat it as read-only: copy before
    changing anything.
    """
    from trainer.bundle import keygen
    from trainer.bundle_build import build_model_bundle
    from trainer.pipeline import export_models
    from trainer.synth import CLASS_NAMES

    if not (tiny_model / "onnx").is_dir():
        export_models(tiny_model, None, engine=False)
    root = tmp_path_factory.mktemp("fleet-bundle")
    keygen(root / "keys")
    summary = build_model_bundle(
        tiny_model, root / "keys", root / "bundles" / "v1", "1.0.0", 1, 30, None, None, tiny_dataset
    )
    return {
        "bundle": Path(summary["path"]),
        "tar": Path(summary["tar"]),
        "keys": root / "keys",
        "bundle_id": summary["bundle_id"],
        "version": "1.0.0",
        "class_name": CLASS_NAMES[0],
        "data": tiny_dataset,
        "model": tiny_model,
    }
