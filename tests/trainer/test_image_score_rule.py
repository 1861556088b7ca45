"""A model fitted with a non-default image-score rule (local_norm): the trainer fits and records its scales,
the signed bundle ships them, and the station and the trainer score every frame alike (issue 15)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from core.model import VARIANTS


@pytest.fixture(scope="module")
def local_norm_model(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from core.config import PRESETS, FitConfig, UFFConfig, score_config_for
    from trainer.backbones import WeightPaths, build_feature_runners
    from trainer.bundle import keygen
    from trainer.bundle_build import build_model_bundle
    from trainer.fit import fit_class
    from trainer.synth import CLASS_NAMES

    preset = dataclasses.replace(PRESETS["m3dm-free"], image_rule="local_norm", image_local_key="row")
    cfg = FitConfig(preset=preset, score=score_config_for(preset), uff=UFFConfig(epochs=1, min_steps=0))
    root = tmp_path_factory.mktemp("local-norm")
    model_dir = root / "models" / CLASS_NAMES[0]
    fit_class(tiny_dataset, CLASS_NAMES[0], cfg, build_feature_runners(preset, WeightPaths()), model_dir)
    keygen(root / "keys")
    summary = build_model_bundle(
        model_dir, root / "keys", root / "b", "1.0.0", 1, 30, None, None, tiny_dataset
    )
    return {"model": model_dir, "bundle": Path(summary["path"]), "keys": root / "keys", "data": tiny_dataset}


def test_rule_and_scales_are_recorded_hashed_and_signed(local_norm_model: dict) -> None:
    raw = json.loads((local_norm_model["model"] / "model.json").read_text())
    assert raw["score"]["image_rule"] == "local_norm" and raw["preset"]["image_rule"] == "local_norm"
    manifest = json.loads((local_norm_model["bundle"] / "manifest.json").read_text())
    assert manifest["scoring"]["image_score_rule"] == "local_norm"
    assert manifest["scoring"]["local_norm_key"] == "row"
    for name, bank in manifest["banks"].items():
        rel = bank["local_scale_path"]
        assert rel == f"banks/{name}_local_scale.npy" and rel in manifest["files"]
        scale = np.load(local_norm_model["bundle"] / rel, allow_pickle=False)
        assert scale.shape == (bank["rows"],) and scale.dtype == np.float32 and (scale > 0).all()
        assert scale.std() > 0  # per-row scales, not one constant


def test_station_and_trainer_give_the_same_scores_under_local_norm(local_norm_model: dict) -> None:
    from core.config import ScoreConfig
    from core.model import FrameScorer
    from core.mvtec3d import list_samples, load_scan
    from edge.station_model import open_bundle, open_model_folder
    from trainer.backbones import WeightPaths, build_feature_runners
    from trainer.fit import uff_runner
    from trainer.train_uff import load_uff

    station = open_bundle(local_norm_model["bundle"], local_norm_model["keys"], backend="ort")
    model_dir = local_norm_model["model"]
    runners = build_feature_runners(station.info.preset, WeightPaths())
    trainer = open_model_folder(model_dir, runners, uff_runner(load_uff(model_dir / "uff.safetensors")))
    assert station.scorer.score_cfg.image_rule == trainer.scorer.score_cfg.image_rule == "local_norm"
    refs = list_samples(local_norm_model["data"], station.info.class_name, "test")
    differs = 0
    for ref in refs[:4]:
        raw = load_scan(ref)
        ours, theirs = station.score_raw(raw), trainer.score_raw(raw)
        for variant in VARIANTS:
            assert ours.image[variant] == pytest.approx(theirs.image[variant], rel=1e-4, abs=1e-5), variant
        # the rule is really applied: the same banks under max_patch give other bank scores
        plain = FrameScorer(station.scorer.banks, None, None, station.scorer.uff, ScoreConfig())
        features = station.features(station.prepare(raw))
        differs += int(not np.allclose(plain.bank_scores(features)[0], ours.bank_image, rtol=1e-3))
    assert differs == 4
