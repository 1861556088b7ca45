"""Manifest schema: strict round trip, canonical JSON, and refusal of malformed fields."""

from __future__ import annotations

import json

import msgspec
import pytest
from manifest_factory import draft_manifest

from protocol.errors import SchemaError
from protocol.manifest import (
    ArtifactRef,
    BankSpec,
    BundleManifest,
    DLFCoefficients,
    FeatureSpec,
    GoldenSample,
    Provenance,
    ScoringSpec,
    Thresholds,
    canonical_json,
    check_relpath,
    manifest_from_json,
)

SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


def sealed_manifest(**overrides: object) -> BundleManifest:
    fields = dict(
        version="1.2.3",
        anti_rollback_counter=7,
        feature_spec=FeatureSpec("free", "free", 48, 48, 96, 28, 56, 1024, 128),
        networks={"uff": ArtifactRef("onnx/uff.onnx", SHA_A, 10)},
        banks={"rgb": BankSpec("banks/rgb.npz", "pq", 300, 48, 28, feat_mean=0.1, feat_std=2.0, pq_m=6)},
        scoring=ScoringSpec(
            0.1,
            4.0,
            3,
            224,
            {"rgb": {"image_mean": 1.0}},
            {"rgb+point": DLFCoefficients((1.0, 2.0), 0.0, (3.0,), 1.5)},
        ),
        thresholds=Thresholds("rgb+point+fusion", 2.5, 0.01),
        provenance=Provenance("synthetic", {"lr": 0.003, "layers": [3, 7]}, "deadbeef", "0.1.0", "host"),
        golden=[GoldenSample("golden/0.npz", 1.25, SHA_C, 0.5, 1e-3)],
        files={"onnx/uff.onnx": SHA_A, "banks/rgb.npz": SHA_B, "golden/0.npz": SHA_C},
    )
    fields.update(overrides)
    return draft_manifest(**fields)


def test_round_trip_through_dict_and_canonical_json() -> None:
    manifest = sealed_manifest()
    assert BundleManifest.from_dict(manifest.to_dict()) == manifest
    raw = canonical_json(manifest)
    assert manifest_from_json(raw) == manifest
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    assert isinstance(manifest.to_dict()["input_spec"]["rgb_mean"], list)  # plain JSON types only


def test_canonical_json_is_key_order_independent() -> None:
    manifest = sealed_manifest()
    shuffled = dict(reversed(list(manifest.to_dict().items())))
    assert canonical_json(BundleManifest.from_dict(shuffled)) == canonical_json(manifest)


def test_unknown_schema_version_is_refused() -> None:
    data = sealed_manifest().to_dict() | {"schema_version": "m3dm-bundle/2"}
    with pytest.raises(SchemaError, match="schema_version"):
        BundleManifest.from_dict(data)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d | {"surprise": 1}, "unknown field"),
        (lambda d: {k: v for k, v in d.items() if k != "preset"}, "missing required field `preset`"),
        (
            lambda d: d | {"anti_rollback_counter": "7"},
            r"Expected `int`, got `str` - at `\$.anti_rollback_counter`",
        ),
        (lambda d: d | {"random_weights": 1}, r"Expected `bool`, got `int`"),
        (lambda d: d | {"version": "1.2"}, "semver"),
        (lambda d: d | {"bundle_id": "xyz"}, "uuid4"),
        (lambda d: d | {"expires_utc": "2025-01-01T00:00:00Z"}, "expires_utc"),
        (lambda d: d | {"created_utc": "2026-01-01T00:00:00"}, "timezone"),
        (lambda d: d | {"precision": "int4"}, "precision"),
        (lambda d: d | {"networks": {}}, "uff"),
        (lambda d: d | {"files": {"../x": SHA_A}}, "relative"),
        (lambda d: d | {"files": {"onnx/uff.onnx": SHA_A}}, "not listed"),
        (lambda d: d | {"files": {**d["files"], "onnx/uff.onnx": SHA_B}}, "sha256 differs"),
        (
            lambda d: d | {"input_spec": {**d["input_spec"], "rgb_mean": [0.1, 0.2]}},
            r"length 3, got 2 - at `\$.input_spec.rgb_mean`",
        ),
        (lambda d: d | {"banks": {"rgb": {**d["banks"]["rgb"], "encoding": "zip"}}}, "encoding"),
        (lambda d: d | {"banks": {"rgb": {**d["banks"]["rgb"], "pq_m": 5}}}, "pq_m"),
    ],
)
def test_malformed_fields_raise_schema_error(mutate, match) -> None:
    with pytest.raises(SchemaError, match=match):
        BundleManifest.from_dict(mutate(sealed_manifest().to_dict()))


def test_manifest_from_json_rejects_garbage_and_nan() -> None:
    with pytest.raises(SchemaError, match="not valid JSON"):
        manifest_from_json(b"{not json")
    raw = canonical_json(sealed_manifest()).replace(
        b'"expected_image_score":1.25', b'"expected_image_score":NaN'
    )
    with pytest.raises(SchemaError, match="NaN"):
        manifest_from_json(raw)


def test_draft_artifact_refs_allowed_but_unsealed_manifest_refused() -> None:
    draft = sealed_manifest(networks={"uff": ArtifactRef("onnx/uff.onnx")}, files={})
    with pytest.raises(SchemaError, match="no files"):
        draft.check_sealed()
    with pytest.raises(SchemaError):
        BundleManifest.from_dict(msgspec.structs.replace(draft).to_dict())


@pytest.mark.parametrize(
    "bad", ["", "/abs", "a/../b", "./a", "a//b", "a\\b", "manifest.json", "manifest.sig"]
)
def test_check_relpath_rejects_unsafe_paths(bad: str) -> None:
    with pytest.raises(SchemaError):
        check_relpath(bad)


def test_non_finite_floats_are_refused_on_construction_and_parse() -> None:
    with pytest.raises(SchemaError, match=r"Thresholds.image_threshold: must be finite"):
        Thresholds("rgb", float("nan"), 0.01)
    data = sealed_manifest().to_dict()
    data["scoring"]["score_stats"]["rgb"]["image_mean"] = float("inf")
    with pytest.raises(SchemaError, match=r"score_stats.rgb.image_mean: must be finite"):
        BundleManifest.from_dict(data)
    # 1e999 parses as inf in Python's json; it must not reach a station as a threshold
    raw = canonical_json(sealed_manifest()).replace(b'"image_threshold":2.5', b'"image_threshold":1e999')
    with pytest.raises(SchemaError, match="must be finite"):
        manifest_from_json(raw)


def test_records_are_frozen_and_errors_name_the_field_path() -> None:
    manifest = sealed_manifest()
    with pytest.raises(AttributeError, match="immutable"):
        manifest.version = "9.9.9"  # type: ignore[misc]
    data = manifest.to_dict()
    data["banks"]["rgb"]["dim"] = "48"
    with pytest.raises(SchemaError, match=r"Expected `int`, got `str` - at `\$.banks\[\.\.\.\].dim`"):
        BundleManifest.from_dict(data)


def test_canonical_bytes_are_pinned_for_a_small_record() -> None:
    """The signed format: sorted keys, no spaces, ASCII escapes, floats as Python's repr."""
    sample = GoldenSample("golden/\u00e9.npz", 1e-05, SHA_C, 0.5, 0.001)
    assert json.dumps(sample.to_dict(), sort_keys=True, separators=(",", ":")) == (
        '{"expected_image_score":1e-05,"expected_map_mean":0.5,"expected_map_sha256":"'
        + SHA_C
        + '","input_path":"golden/\\u00e9.npz","tolerance_abs":0.001,"variant":"rgb+point+fusion"}'
    )
    raw = canonical_json(sealed_manifest(provenance=Provenance("s\u00e9", {}, "c", "0.1.0", "h")))
    assert raw.isascii() and b" " not in raw and b'"dataset":"s\\u00e9"' in raw


def test_bank_index_fields_come_together_and_are_hashed_like_every_file() -> None:
    from protocol.manifest import BankSpec

    spec = BankSpec(
        "banks/point.npy", "fp32", 75000, 1152, 56, index_path="banks/point.faiss", index_kind="ivf-flat",
        index_params={"nprobe": 16}, index_recall=0.99,
    )  # fmt: skip
    assert BankSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SchemaError, match="come together"):
        BankSpec("banks/point.npy", "fp32", 75000, 1152, 56, index_path="banks/point.faiss")
    with pytest.raises(SchemaError, match="unknown index kind"):
        BankSpec(
            "banks/p.npy", "fp32", 9, 4, 56, index_path="banks/p.faiss", index_kind="lsh", index_params={}
        )
