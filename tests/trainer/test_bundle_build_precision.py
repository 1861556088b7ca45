"""`bundle build --precision int8`: int8 and fp32 graphs shipped and signed; a station runs either."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import numpy as np
import onnx
import pytest

from core.errors import ConfigError
from protocol.errors import SchemaError


@pytest.fixture(scope="module")
def int8_bundle(tiny_dataset: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from trainer.bundle import keygen
    from trainer.bundle_build import build_model_bundle
    from trainer.pipeline import export_models

    export_models(tiny_model, None, engine=False)
    root = tmp_path_factory.mktemp("bundle_int8")
    keygen(root / "keys")
    summary = build_model_bundle(
        tiny_model,
        root / "keys",
        root / "b" / "cls",
        "1.0.0",
        1,
        30,
        None,
        None,
        tiny_dataset,
        precision="int8",
    )
    return {**summary, "keys": root / "keys"}


def test_manifest_records_int8_and_ships_both_graphs_signed(int8_bundle: dict) -> None:
    root = Path(int8_bundle["path"])
    manifest = json.loads((root / "manifest.json").read_text())
    assert int8_bundle["precision"] == manifest["precision"] == "int8"
    assert manifest["networks"]["uff"]["path"] == "onnx/uff.int8.onnx"
    assert manifest["fp32_networks"]["uff"]["path"] == "onnx/uff.onnx"
    for ref in (manifest["networks"]["uff"], manifest["fp32_networks"]["uff"]):
        assert manifest["files"][ref["path"]] == ref["sha256"]  # hashed, hence signed
        assert (root / ref["path"]).stat().st_size == ref["size_bytes"]
    ops = {n.op_type for n in onnx.load(str(root / "onnx/uff.int8.onnx")).graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger"}  # really quantised
    # golden expectations for each precision a station may run: 3 of the int8 graphs, 3 of the fp32 ones
    assert len(manifest["golden"]) == len(manifest["fp32_golden"]) == 3
    int8_scores = [g["expected_image_score"] for g in manifest["golden"]]
    assert int8_scores != [g["expected_image_score"] for g in manifest["fp32_golden"]]


def test_int8_bundle_verifies_and_replays_its_own_goldens(int8_bundle: dict) -> None:
    from trainer.bundle_build import verify_model_bundle

    report = verify_model_bundle(Path(int8_bundle["tar"]), int8_bundle["keys"], min_counter=None)
    assert report["ok"], report
    assert "3 replayed" in report["checks"]["golden"]["message"]


def test_station_told_fp32_runs_the_fp32_graphs_and_their_goldens(int8_bundle: dict) -> None:
    from edge.station_model import golden_scan, open_bundle, replay_golden

    root, keys = Path(int8_bundle["path"]), int8_bundle["keys"]
    own = open_bundle(root, keys, backend="ort")
    fp32 = open_bundle(root, keys, backend="ort", precision="fp32")
    assert own.summary["precision"] == "int8" and fp32.summary["precision"] == "fp32"
    assert Path(own.scorer.uff.onnx_path).name == "uff.int8.onnx"
    assert Path(fp32.scorer.uff.onnx_path).name == "uff.onnx"
    results = replay_golden(fp32)
    assert len(results) == 3 and all(r.ok for r in results), results
    assert [r.expected for r in results] == [g.expected_image_score for g in own.manifest.fp32_golden]
    scan = golden_scan(root, own.manifest.golden[0])
    a, b = own.score_raw(scan), fp32.score_raw(scan)
    fusion_a, fusion_b = a.maps["fusion"], b.maps["fusion"]
    assert not np.array_equal(fusion_a, fusion_b)  # two different graphs ran
    assert np.corrcoef(fusion_a.ravel(), fusion_b.ravel())[0, 1] > 0.99


def test_precision_choices_are_checked(int8_bundle: dict, tiny_model: Path, tmp_path: Path) -> None:
    from edge.config import StationConfig
    from edge.station_model import networks_to_run
    from protocol.manifest import manifest_from_json
    from trainer.bundle_build import build_model_bundle

    manifest = manifest_from_json((Path(int8_bundle["path"]) / "manifest.json").read_bytes())
    with pytest.raises(ConfigError, match="runs a bundle's own precision \\(int8\\) or fp32, not 'fp16'"):
        networks_to_run(manifest, "fp16")
    fp32_only = msgspec.structs.replace(
        manifest, precision="fp32", networks=manifest.fp32_networks, fp32_networks={}, fp32_golden=[]
    )
    assert networks_to_run(fp32_only, "fp32") == ("fp32", dict(manifest.fp32_networks))
    with pytest.raises(SchemaError, match="fp32_golden needs fp32_networks"):
        msgspec.structs.replace(manifest, fp32_networks={})
    int8_only = msgspec.structs.replace(manifest, fp32_networks={}, fp32_golden=[])
    with pytest.raises(ConfigError, match="is int8 and carries no fp32 graphs"):
        networks_to_run(int8_only, "fp32")
    with pytest.raises(ConfigError, match="precision must be fp32"):
        StationConfig(station_id="s1", bundle=tmp_path, source="x", insecure_no_verify=True, precision="int8")
    with pytest.raises(ConfigError, match="bundle precision must be fp32 or int8, not 'fp16'"):
        build_model_bundle(
            tiny_model, tmp_path, tmp_path / "o", "1.0.0", 1, 30, None, None, None, precision="fp16"
        )
