"""The official architecture (ViT-B/8 + Point-MAE, random weights) end to end: train -> export -> bundle ->
eval, so the network path a real `m3dm` model takes is exercised in CI and not only `m3dm-free`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from core.model import VARIANTS


@pytest.mark.slow
def test_m3dm_random_train_export_bundle_eval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core import config
    from trainer.bundle import keygen
    from trainer.bundle_build import build_model_bundle, verify_model_bundle
    from trainer.evaluate import evaluate_bundle, evaluate_models
    from trainer.pipeline import train_classes
    from trainer.synth import CLASS_NAMES, SynthConfig, synthesize

    # Official networks and dims (768 + 1152); fewer, smaller point groups keep it inside the CI budget.
    small = dataclasses.replace(config.PRESETS["m3dm-random"], num_groups=128, group_size=32)
    monkeypatch.setitem(config.PRESETS, "m3dm-random", small)
    cls = CLASS_NAMES[0]
    cfg = SynthConfig(
        seed=3,
        classes=(cls,),
        n_train=2,
        n_validation=4,  # cross-fitted DLF needs >= 2 held-out normals per fold
        n_test_good=1,
        n_test_per_defect=1,
        width_px=224,
        height_px=224,
        workers=1,
    )
    synthesize(tmp_path / "data", cfg)
    train_classes(tmp_path / "data", tmp_path / "m", [cls], False, "m3dm-random", None, True, 0, uff_epochs=1)
    model = tmp_path / "m" / cls
    keygen(tmp_path / "keys")
    # not exported yet: bundle build exports (ViT, Point-MAE and UFF graphs, parity-checked) first
    summary = build_model_bundle(
        model, tmp_path / "keys", tmp_path / "b", "0.1.0", 1, 30, None, None, tmp_path / "data"
    )
    assert sorted((model / "onnx").glob("*.onnx")) == [
        model / "onnx" / f"{n}.onnx" for n in ("point", "rgb", "uff")
    ]
    assert summary["golden"] >= 2 and len(summary["golden_cross_check"]) == summary["golden"]
    report = verify_model_bundle(Path(summary["path"]), tmp_path / "keys", None)
    assert report["ok"], report
    torch_path = evaluate_models(tmp_path / "data", model, tmp_path / "rt", None)
    station = evaluate_bundle(tmp_path / "data", Path(summary["tar"]), tmp_path / "keys", tmp_path / "rs")
    assert station["bundle"]["random_weights"] is True and "RANDOM WEIGHTS" in station["markdown"]
    for variant in VARIANTS:
        a, b = torch_path["classes"][cls][variant], station["classes"][cls][variant]
        assert a["i_auroc"] == pytest.approx(b["i_auroc"], abs=1e-6), variant
