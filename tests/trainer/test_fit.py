"""fit_class on generated scans: a diverging fit leaves no model behind; RGB-only classes end to end."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.config import FitConfig, UFFConfig, get_preset
from core.features import FeatureRunners
from trainer.errors import TrainingError
from trainer.fit import fit_class
from trainer.synth import CLASS_NAMES


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


# ------------------------------------------------------------------------------------------ RGB-only classes


@pytest.fixture(scope="module")
def rgb_only_dataset(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated class with every xyz/ folder removed, as real MVTec 3D-AD copies often come."""
    root = tmp_path_factory.mktemp("rgb-only") / "data"
    shutil.copytree(tiny_dataset, root)
    for xyz_dir in sorted(root.rglob("xyz")):
        shutil.rmtree(xyz_dir)
    return root


@pytest.fixture(scope="module")
def rgb_only_model(rgb_only_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.pipeline import train_classes

    out = tmp_path_factory.mktemp("rgb-only-model")
    train_classes(rgb_only_dataset, out, [CLASS_NAMES[0]], False, "m3dm-free", None, False, 0, uff_epochs=1)
    return out / CLASS_NAMES[0]


def test_data_info_labels_an_rgb_only_class(rgb_only_dataset: Path, tiny_dataset: Path) -> None:
    from typer.testing import CliRunner

    from trainer.cli import app

    rgb_only = CliRunner().invoke(app, ["data", "info", str(rgb_only_dataset)])
    full = CliRunner().invoke(app, ["data", "info", str(tiny_dataset)])
    assert rgb_only.exit_code == 0 and full.exit_code == 0, rgb_only.output + full.output
    row = next(line for line in rgb_only.stdout.splitlines() if line.startswith(CLASS_NAMES[0]))
    assert row.endswith("RGB-only (no xyz/: rgb bank only)")
    assert next(line for line in full.stdout.splitlines() if line.startswith(CLASS_NAMES[0])).endswith(
        "rgb+xyz"
    )


def test_an_rgb_only_class_trains_the_rgb_bank_alone_and_records_it(
    rgb_only_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from edge.model_store import read_draft_manifest
    from trainer.pipeline import train_classes

    with caplog.at_level(logging.INFO, logger="m3dm.trainer"):
        summary = train_classes(
            rgb_only_dataset, tmp_path, [], True, "m3dm-free", None, False, 0, uff_epochs=1
        )
    said = [r.getMessage() for r in caplog.records if "RGB-only" in r.getMessage()]
    assert len(said) == 1 and "training the RGB bank alone" in said[0]
    model = tmp_path / CLASS_NAMES[0]
    raw = json.loads((model / "model.json").read_text())
    assert raw["modalities"] == ["rgb"] and summary["classes"][0]["modalities"] == ["rgb"]
    assert (
        set(raw["banks"]) == {"rgb"} and raw["uff"] is None and raw["dlf"] == {} and raw["normaliser"] is None
    )
    assert set(raw["thresholds"]) == {"rgb"} and np.isfinite(raw["thresholds"]["rgb"])
    assert raw["thresholds"]["rgb"] > 0  # a real score quantile, not the 0.0 of an all-zero bank
    assert raw["threshold_report"]["rgb"]["n_normals"] == 4
    assert not (model / "uff.safetensors").exists() and not (model / "banks" / "point.npy").exists()
    draft = read_draft_manifest(model)
    assert draft.modalities == ("rgb",) and draft.variants == ("rgb",) and set(draft.banks) == {"rgb"}
    assert draft.networks == {} and draft.thresholds.variant == "rgb"


def test_an_rgb_only_model_evaluates_only_the_rgb_variant(
    rgb_only_dataset: Path, rgb_only_model: Path, tmp_path: Path
) -> None:
    from trainer.evaluate import evaluate_models

    results = evaluate_models(rgb_only_dataset, rgb_only_model, tmp_path / "report", None, encodings=True)
    metrics = results["classes"][CLASS_NAMES[0]]
    assert set(metrics) == {"rgb"}
    encodings = results["encodings"][CLASS_NAMES[0]]  # the bank-encoding comparison runs on the rgb variant
    assert set(encodings) == {"fp32", "fp16", "int8", "pq"} and encodings["fp32"]["delta_i_auroc"] == 0.0
    assert encodings["fp16"]["compression"] == pytest.approx(2.0)
    # Measured on this fixture: P-AUROC ~0.99, AUPRO ~0.97 (I-AUROC on 3 good / 8 bad is noisy: no floor).
    assert metrics["rgb"]["p_auroc"] >= 0.95 and metrics["rgb"]["aupro"] >= 0.85
    table = (tmp_path / "report" / "results.md").read_text()
    assert "| rgb |" in table and "fusion" not in table and "point" not in table


def test_a_point_cloud_model_refuses_rgb_only_test_data(rgb_only_dataset: Path, tiny_model: Path) -> None:
    from core.errors import ConfigError
    from trainer.evaluate import evaluate_models

    with pytest.raises(ConfigError, match="has no xyz file, but this model uses point clouds"):
        evaluate_models(rgb_only_dataset, tiny_model, None, None)


def test_a_class_mixing_scans_with_and_without_xyz_is_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    from core.errors import MissingFileError
    from trainer.pipeline import train_classes

    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    shutil.rmtree(root / CLASS_NAMES[0] / "test" / "good" / "xyz")
    with pytest.raises(
        MissingFileError, match=r"mixes scans with xyz \(\d+, e\.g\. .*\) and without \(3, e\.g\."
    ):
        train_classes(root, tmp_path / "models", [CLASS_NAMES[0]], False, "m3dm-free", None, False, 0)
    assert not (tmp_path / "models" / CLASS_NAMES[0] / "model.json").exists()


def test_an_rgb_only_bundle_ships_the_rgb_variant_and_the_station_scores_rgb_only_frames(
    rgb_only_dataset: Path, rgb_only_model: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    from core.errors import ConfigError
    from core.features import FeatureRunners
    from core.mvtec3d import list_samples, load_scan
    from edge.decision import ResultOptions, scored_result
    from edge.model_slot import ModelSlot, Policy
    from edge.sources import Frame
    from edge.station_model import open_bundle, open_model_folder
    from trainer.bundle import keygen
    from trainer.bundle_build import build_model_bundle, verify_model_bundle

    keygen(tmp_path / "keys")
    summary = build_model_bundle(
        rgb_only_model, tmp_path / "keys", tmp_path / "b", "1.0.0", 1, 30, None, None, rgb_only_dataset
    )
    assert summary["banks"] == {"rgb": "fp32"} and summary["golden"] == 3
    assert verify_model_bundle(Path(summary["tar"]), tmp_path / "keys", None)["ok"]
    station = open_bundle(Path(summary["tar"]), tmp_path / "keys")
    manifest = station.manifest
    assert manifest.modalities == ("rgb",) and set(manifest.banks) == {"rgb"} and manifest.networks == {}
    assert manifest.thresholds.variant == "rgb" and {g.variant for g in manifest.golden} == {"rgb"}

    ref = next(r for r in list_samples(rgb_only_dataset, CLASS_NAMES[0], "test") if r.label == 1)
    raw = load_scan(ref)
    assert raw.xyz_hwc_m is None
    scores = station.score_raw(raw)
    assert (
        set(scores.image) == {"rgb"}
        and scores.bank_names == ("rgb",)
        and scores.maps["rgb"].shape == (224, 224)
    )
    # The same scoring path as `m3dm eval --model`: the trainer's view of the model folder agrees.
    trainer_view = open_model_folder(rgb_only_model, FeatureRunners(), None)
    assert scores.image["rgb"] == pytest.approx(trainer_view.score_raw(raw).image["rgb"], rel=1e-6)
    # A frame that does carry points is scored on its rgb alone, exactly as the model was trained.
    with_xyz = load_scan(
        next(r for r in list_samples(tiny_dataset, CLASS_NAMES[0], "test") if r.sample_id == ref.sample_id)
    )
    assert with_xyz.xyz_hwc_m is not None
    assert station.score_raw(with_xyz).image["rgb"] == pytest.approx(scores.image["rgb"], rel=1e-6)

    with pytest.raises(ConfigError, match="use --variant 'rgb'"):
        ModelSlot(station, Policy(variant="rgb+point+fusion"))  # a pinned fused variant has no threshold here
    slot = ModelSlot(station)  # by default the station decides on the bundle's own variant: rgb
    assert slot.current().variant == "rgb"
    frame = Frame("f1", 0.0, raw, None, str(ref.rgb_path))
    result, _ = scored_result(frame, slot.current(), scores, {}, ResultOptions("s1"), with_map=False)
    assert result.variant == "rgb" and result.bank_scores == {"rgb": pytest.approx(scores.image["rgb"])}
    assert result.decision == ("NOK" if scores.image["rgb"] > manifest.thresholds.image_threshold else "OK")


def test_an_rgb_only_fit_with_the_local_norm_rule_ships_the_rgb_bank_scales(
    rgb_only_dataset: Path, tmp_path: Path
) -> None:
    from dataclasses import replace

    from core.config import ScoreConfig
    from core.mvtec3d import list_samples, load_scan
    from edge.station_model import open_model_folder

    cfg = FitConfig(preset=get_preset("m3dm-free"), score=replace(ScoreConfig(), image_rule="local_norm"))
    fit_class(rgb_only_dataset, CLASS_NAMES[0], cfg, FeatureRunners(), tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "model.json").read_text())
    assert raw["banks"]["rgb"]["local_scale_file"] == "banks/rgb_local_scale.npy"
    model = open_model_folder(tmp_path / "m", FeatureRunners(), None)
    assert model.scorer.banks["rgb"].local_scale_k is not None
    scan = load_scan(list_samples(rgb_only_dataset, CLASS_NAMES[0], "test")[0])
    assert np.isfinite(model.score_raw(scan).image["rgb"])
