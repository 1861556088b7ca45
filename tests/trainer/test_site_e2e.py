"""m3dm-site end to end on tiny generated scans: `train` learns the class's rgb encoder first, bundle build
exports it to ONNX (parity-checked) and ships it, and the station path (ONNX Runtime, encoded banks) scores
the test split exactly as the trainer's torch evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.model import VARIANTS


@pytest.mark.slow
def test_m3dm_site_train_export_bundle_eval(tmp_path: Path) -> None:
    from trainer.bundle import keygen
    from trainer.bundle_build import build_model_bundle, verify_model_bundle
    from trainer.evaluate import evaluate_bundle, evaluate_models
    from trainer.pipeline import train_classes
    from trainer.site.train import SITE_WEIGHTS, SiteConfig
    from trainer.synth import CLASS_NAMES, SynthConfig, synthesize

    cls = CLASS_NAMES[0]
    cfg = SynthConfig(
        seed=4,
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
    site = SiteConfig(steps=2, batch_images=2, crop_px=32, warmup_steps=1)
    summary = train_classes(
        tmp_path / "data", tmp_path / "m", [cls], False, "m3dm-site", None, False, 0, uff_epochs=1, site=site
    )
    model = tmp_path / "m" / cls
    assert (model / SITE_WEIGHTS).is_file() and summary["classes"][0]["site_train_s"] > 0
    keygen(tmp_path / "keys")
    built = build_model_bundle(
        model, tmp_path / "keys", tmp_path / "b", "0.1.0", 1, 30, None, None, tmp_path / "data"
    )
    assert sorted(p.name for p in (model / "onnx").glob("*.onnx")) == ["rgb.onnx", "uff.onnx"]
    assert built["golden"] >= 2 and len(built["golden_cross_check"]) == built["golden"]
    assert verify_model_bundle(Path(built["path"]), tmp_path / "keys", None)["ok"]
    torch_path = evaluate_models(tmp_path / "data", model, tmp_path / "rt", None)
    station = evaluate_bundle(tmp_path / "data", Path(built["tar"]), tmp_path / "keys", tmp_path / "rs")
    assert station["bundle"]["preset"] == "m3dm-site" and station["bundle"]["random_weights"] is False
    for variant in VARIANTS:
        a, b = torch_path["classes"][cls][variant], station["classes"][cls][variant]
        for metric in ("i_auroc", "p_auroc"):
            assert a[metric] == pytest.approx(b[metric], abs=1e-6), (variant, metric)
