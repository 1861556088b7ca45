"""A real bundle from a fitted model: verification, golden replay, station-path parity with the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.model import VARIANTS


@pytest.fixture(scope="module")
def built_bundle(tiny_dataset: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from trainer.bundle import keygen
    from trainer.bundle_build import build_model_bundle
    from trainer.pipeline import export_models

    export_models(tiny_model, None, engine=False)
    root = tmp_path_factory.mktemp("bundle")
    keygen(root / "keys")
    summary = build_model_bundle(
        tiny_model, root / "keys", root / "b" / "cls", "1.2.3", 5, 30, None, None, tiny_dataset
    )
    return {**summary, "keys": root / "keys"}


def test_export_records_onnx_parity(tiny_model: Path, built_bundle: dict) -> None:
    raw = json.loads((tiny_model / "model.json").read_text())
    assert raw["networks"] == {"uff": "onnx/uff.onnx"}
    assert raw["export"]["parity"]["uff"]["ok"] is True
    assert raw["export"]["parity"]["uff"]["max_abs_err"] < 1e-4


def test_fresh_bundle_verifies_and_replays_golden(built_bundle: dict) -> None:
    from trainer.bundle_build import verify_model_bundle

    for target in (built_bundle["path"], built_bundle["tar"]):
        report = verify_model_bundle(Path(target), built_bundle["keys"], min_counter=5)
        assert report["ok"], report
        assert set(report["checks"]) == {"schema", "signature", "hashes", "expiry", "rollback", "golden"}
        assert "3 replayed" in report["checks"]["golden"]["message"]


def test_manifest_carries_what_a_station_needs(built_bundle: dict) -> None:
    manifest = json.loads((Path(built_bundle["path"]) / "manifest.json").read_text())
    assert manifest["input_spec"]["image_size"] == 224 and manifest["input_spec"]["plane_removal_m"] == 0.005
    assert (
        manifest["feature_spec"]["fusion_dim"]
        == manifest["feature_spec"]["rgb_dim"] + manifest["feature_spec"]["point_dim"]
    )
    assert manifest["thresholds"]["variant"] == "rgb+point+fusion"
    assert manifest["anti_rollback_counter"] == 5 and manifest["version"] == "1.2.3"
    assert manifest["random_weights"] is False and len(manifest["golden"]) == 3
    assert set(manifest["banks"]) == {"rgb", "point", "fusion"}


def test_lower_counter_on_station_is_rejected(built_bundle: dict) -> None:
    from trainer.bundle_build import verify_model_bundle

    report = verify_model_bundle(Path(built_bundle["path"]), built_bundle["keys"], min_counter=6)
    assert not report["ok"] and not report["checks"]["rollback"]["ok"]


def test_bundle_scores_match_the_trainer(
    tiny_dataset: Path, tiny_model: Path, built_bundle: dict, tmp_path: Path
) -> None:
    """What we measure is what we ship: ONNX Runtime + encoded banks vs torch-path evaluation."""
    from trainer.evaluate import evaluate_bundle, evaluate_models

    torch_path = evaluate_models(tiny_dataset, tiny_model, tmp_path / "t", None)
    station = evaluate_bundle(tiny_dataset, Path(built_bundle["tar"]), built_bundle["keys"], tmp_path / "s")
    assert station["path"] == "bundle (onnxruntime-cpu)"
    cls = tiny_model.name
    for variant in VARIANTS:
        a, b = torch_path["classes"][cls][variant], station["classes"][cls][variant]
        assert abs(a["i_auroc"] - b["i_auroc"]) <= 0.005, variant
        assert abs(a["aupro"] - b["aupro"]) <= 0.01, variant


def test_flipped_byte_in_a_real_bundle_is_rejected(built_bundle: dict, tmp_path: Path) -> None:
    import shutil

    from trainer.bundle_build import verify_model_bundle

    copy = tmp_path / "copy"
    shutil.copytree(built_bundle["path"], copy)
    target = copy / "onnx" / "uff.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    report = verify_model_bundle(copy, built_bundle["keys"], None)
    assert not report["ok"]
    assert not report["checks"]["hashes"]["ok"] and "uff.onnx" in report["checks"]["hashes"]["message"]


# ----------------------------------------------------------------- per-frame parity that a rescale breaks


@pytest.fixture(scope="module")
def both_paths(fleet_bundle: dict) -> dict:
    """Every test frame of the fleet class scored twice: trainer path (model folder, torch UFF) and station
    path (signed bundle, ONNX Runtime, banks as shipped)."""
    from core.mvtec3d import list_samples, load_scan
    from edge.station_model import open_bundle, open_model_folder
    from trainer.backbones import WeightPaths, build_feature_runners
    from trainer.fit import uff_runner
    from trainer.train_uff import load_uff

    model_dir = fleet_bundle["model"]
    station = open_bundle(fleet_bundle["bundle"], fleet_bundle["keys"], backend="ort")
    runners = build_feature_runners(station.info.preset, WeightPaths())
    trainer = open_model_folder(model_dir, runners, uff_runner(load_uff(model_dir / "uff.safetensors")))
    refs = list_samples(fleet_bundle["data"], fleet_bundle["class_name"], "test")
    frames = []
    for ref in refs:
        raw = load_scan(ref)
        frames.append((ref, trainer.score_raw(raw), station.score_raw(raw)))
    return {"trainer": trainer, "station": station, "frames": frames}


def test_every_frame_scores_the_same_on_both_paths(both_paths: dict) -> None:
    assert len(both_paths["frames"]) >= 5
    for ref, t, s in both_paths["frames"]:
        assert set(t.image) == set(s.image) == set(VARIANTS)
        for variant in VARIANTS:
            assert s.image[variant] == pytest.approx(t.image[variant], rel=1e-4, abs=1e-5), (ref, variant)
            assert s.maps[variant].shape == t.maps[variant].shape == (224, 224)
            np.testing.assert_allclose(s.maps[variant], t.maps[variant], rtol=1e-4, atol=1e-4)
        assert s.bank_image.shape == t.bank_image.shape == (3,)
        np.testing.assert_allclose(s.bank_image, t.bank_image, rtol=1e-4, atol=1e-5)


def test_threshold_value_and_every_decision_match(both_paths: dict) -> None:
    from edge.decision import decide
    from edge.model_store import DECISION_VARIANT, read_model_json

    trainer_threshold = read_model_json(both_paths["trainer"].root)["thresholds"][DECISION_VARIANT]
    shipped = both_paths["station"].manifest.thresholds
    assert shipped.variant == DECISION_VARIANT
    assert shipped.image_threshold == trainer_threshold  # the value, bit for bit, not only the name
    decisions = []
    for ref, t, s in both_paths["frames"]:
        trainer_says = decide(t.image[DECISION_VARIANT], trainer_threshold)
        station_says = decide(s.image[DECISION_VARIANT], shipped.image_threshold)
        assert station_says == trainer_says, ref
        decisions.append(station_says)
    # a threshold that decides nothing (all OK or all NOK) would make the comparison above vacuous
    assert {"OK", "NOK"} <= set(decisions)


def test_build_cross_checks_golden_against_the_trainer(fleet_bundle: dict) -> None:
    manifest = json.loads((fleet_bundle["bundle"] / "manifest.json").read_text())
    assert len(manifest["golden"]) == 3


def test_cross_check_refuses_expectations_the_trainer_does_not_reproduce(fleet_bundle: dict) -> None:
    import msgspec

    from core.errors import ConfigError
    from protocol.manifest import manifest_from_json
    from trainer.bundle_build import cross_check_golden

    manifest = manifest_from_json((fleet_bundle["bundle"] / "manifest.json").read_bytes())
    checked = cross_check_golden(fleet_bundle["bundle"], manifest, fleet_bundle["model"], None)
    assert len(checked) == 3 and all(c["abs_diff"] <= 1e-4 + 1e-3 * abs(c["station"]) for c in checked)
    g0 = manifest.golden[0]
    wrong = msgspec.structs.replace(
        manifest, golden=[msgspec.structs.replace(g0, expected_image_score=g0.expected_image_score * 2)]
    )
    with pytest.raises(ConfigError, match=f"golden {g0.input_path}: station path scores .* trainer path"):
        cross_check_golden(fleet_bundle["bundle"], wrong, fleet_bundle["model"], None)


def test_station_scores_follow_the_trainers_own_dlf_weights(both_paths: dict) -> None:
    """Independent of every loader: model.json's DLF weights and normaliser stats, written at fit time from
    the fitted objects, applied by hand to the station's per-bank scores must give its fused image score."""
    from edge.model_store import DECISION_VARIANT, read_model_json

    raw = read_model_json(both_paths["trainer"].root)
    coef = np.asarray(raw["dlf"][DECISION_VARIANT]["image"]["coef"])
    norm = raw["normaliser"]
    mean, std = np.asarray(norm["image_mean_b"]), np.asarray(norm["image_std_b"])
    for ref, _, s in both_paths["frames"]:
        by_hand = float(((s.bank_image - mean) / std + 3.0) @ coef)
        assert s.image[DECISION_VARIANT] == pytest.approx(by_hand, rel=1e-5, abs=1e-6), ref
