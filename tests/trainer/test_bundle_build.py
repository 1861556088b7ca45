"""A real bundle from a fitted model: verification, golden replay, station-path parity with the trainer."""

from __future__ import annotations

import json
from pathlib import Path

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
