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
    InputSpec,
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
    with pytest.raises(SchemaError, match="manifest lists no files"):
        BundleManifest.from_dict(msgspec.structs.replace(draft).to_dict())


@pytest.mark.parametrize(
    "bad", ["", "/abs", "a/../b", "./a", "a//b", "a\\b", "a\x00b", "manifest.json", "manifest.sig"]
)
def test_check_relpath_rejects_unsafe_paths(bad: str) -> None:
    with pytest.raises(SchemaError, match="bundle path must be relative, normalised"):
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


# --------------------------------------------------------------- every validation at its boundary (mutmut)

INPUT = dict(
    rgb_input_size=224, image_size=224, rgb_mean=(0.5, 0.5, 0.5), rgb_std=(0.2, 0.2, 0.2), border_px=10,
    ransac_threshold_m=0.004, ransac_n=50, ransac_iterations=100, plane_removal_m=0.005, pad_multiple=100,
    keep_largest_cluster=False, cluster_eps_m=0.006, cluster_min_points=30, seed=0,
)  # fmt: skip
FEATURE = dict(
    rgb_backbone="free", point_backbone="free", rgb_dim=4, point_dim=4, fusion_dim=8, rgb_grid=28,
    point_grid=56, num_groups=16, group_size=8,
)  # fmt: skip
BANK = dict(path="banks/rgb.npz", encoding="pq", rows=5, dim=4, grid=28, feat_std=1.0, pq_m=2)
SCORING = dict(rgb_lambda=0.1, blur_sigma_px=4.0, reweight_k=3, output_size=224)
GOLDEN = dict(
    input_path="golden/0.npz", expected_image_score=1.0, expected_map_sha256=SHA_C, expected_map_mean=0.5,
    tolerance_abs=1e-3,
)  # fmt: skip

BOUNDARIES = [
    # (record, valid fields at the boundary, the same field just past it, message)
    (InputSpec, INPUT | {"rgb_input_size": 1}, {"rgb_input_size": 0}, "InputSpec: sizes must be positive"),
    (InputSpec, INPUT | {"image_size": 1}, {"image_size": 0}, "InputSpec: sizes must be positive"),
    (
        InputSpec,
        INPUT | {"rgb_std": (1e-9, 1, 1)},
        {"rgb_std": (1, 0.0, 1)},
        "InputSpec: rgb_std must be positive",
    ),
    (
        InputSpec,
        INPUT | {"rgb_std": (1, 1, 1e-9)},
        {"rgb_std": (1, 1, -1.0)},
        "InputSpec: rgb_std must be positive",
    ),
    (
        InputSpec,
        INPUT | {"ransac_threshold_m": 0.999},
        {"ransac_threshold_m": 1.0},
        r"InputSpec: metres in \(0,1\)",
    ),
    (
        InputSpec,
        INPUT | {"ransac_threshold_m": 1e-9},
        {"ransac_threshold_m": 0.0},
        r"InputSpec: metres in \(0,1\)",
    ),
    (
        InputSpec,
        INPUT | {"plane_removal_m": 0.999},
        {"plane_removal_m": 1.0},
        r"InputSpec: metres in \(0,1\)",
    ),
    (InputSpec, INPUT | {"plane_removal_m": 1e-9}, {"plane_removal_m": 0.0}, r"InputSpec: metres in \(0,1\)"),
    *[
        (
            FeatureSpec,
            FEATURE | {k: 1} | ({"fusion_dim": 5} if k in ("rgb_dim", "point_dim") else {}),
            {k: 0},
            "FeatureSpec: dims, grids and group sizes must be positive",
        )
        for k in ("rgb_dim", "point_dim", "rgb_grid", "point_grid", "num_groups", "group_size")
    ],
    (FeatureSpec, FEATURE, {"fusion_dim": 9}, r"FeatureSpec: fusion_dim != rgb\+point dims"),
    (
        ArtifactRef,
        {"path": "onnx/u.onnx", "size_bytes": 0},
        {"size_bytes": -1},
        "onnx/u.onnx: size_bytes must be >= 0",
    ),
    (
        ArtifactRef,
        {"path": "onnx/u.onnx", "sha256": SHA_A},
        {"sha256": "A" * 64},
        "onnx/u.onnx: sha256 must be 64",
    ),
    *[
        (
            BankSpec,
            BANK | {k: 1} | ({"dim": 2} if k == "dim" else {}),
            {k: 0},
            "banks/rgb.npz: rows/dim/grid must be > 0",
        )
        for k in ("rows", "grid")
    ],
    (BankSpec, BANK | {"dim": 2}, {"dim": 0}, "banks/rgb.npz: rows/dim/grid must be > 0"),
    (BankSpec, BANK | {"feat_std": 1e-9}, {"feat_std": 0.0}, "banks/rgb.npz: feat_std must be > 0"),
    (BankSpec, BANK | {"pq_m": 1}, {"pq_m": 0}, "banks/rgb.npz: pq_m must divide dim"),
    (BankSpec, BANK | {"pq_m": 4}, {"pq_m": 3}, "banks/rgb.npz: pq_m must divide dim"),
    (BankSpec, BANK, {"pq_m": None}, "banks/rgb.npz: pq_m is set iff encoding pq"),
    (
        BankSpec,
        BANK | {"encoding": "fp16", "pq_m": None},
        {"pq_m": 2},
        "banks/rgb.npz: pq_m is set iff encoding pq",
    ),
    (
        BankSpec,
        BANK | {"stats_path": "banks/s.npy"},
        {"stats_path": "../s.npy"},
        "bundle path must be relative",
    ),
    (BankSpec, BANK, {"encoding": "FP32"}, "banks/rgb.npz: unknown bank encoding 'FP32'"),
    (
        ScoringSpec,
        SCORING | {"blur_sigma_px": 0.0},
        {"blur_sigma_px": -1e-9},
        "ScoringSpec: blur_sigma_px must be >= 0",
    ),
    (ScoringSpec, SCORING | {"reweight_k": 1}, {"reweight_k": 0}, "ScoringSpec: reweight_k/output_size > 0"),
    (
        ScoringSpec,
        SCORING | {"output_size": 1},
        {"output_size": 0},
        "ScoringSpec: reweight_k/output_size > 0",
    ),
    (
        Thresholds,
        {"variant": "rgb", "image_threshold": 1.0, "false_reject_rate": 0.0},
        {"false_reject_rate": -1e-9},
        r"Thresholds: false_reject_rate must lie in \[0, 1\]",
    ),
    (
        Thresholds,
        {"variant": "rgb", "image_threshold": 1.0, "false_reject_rate": 1.0},
        {"false_reject_rate": 1.0001},
        r"Thresholds: false_reject_rate must lie in \[0, 1\]",
    ),
    (
        GoldenSample,
        GOLDEN | {"tolerance_abs": 0.0},
        {"tolerance_abs": -1e-9},
        "golden/0.npz: tolerance_abs must be >= 0",
    ),
    (GoldenSample, GOLDEN, {"input_path": "golden/0.npy"}, "golden/0.npy: golden input must be .npz"),
    (
        GoldenSample,
        GOLDEN,
        {"expected_map_sha256": "c" * 63},
        "golden/0.npz: sha256 must be 64 lowercase hex",
    ),
]


@pytest.mark.parametrize(("record", "valid", "past", "message"), BOUNDARIES)
def test_each_validation_accepts_its_boundary_and_refuses_one_step_past(record, valid, past, message) -> None:
    built = record(**valid)
    assert record.from_dict(built.to_dict()) == built
    with pytest.raises(SchemaError, match=f"^\\[schema\\] {message}"):
        record(**(valid | past))
    with pytest.raises(SchemaError, match=message):  # the same check runs when parsing
        record.from_dict(
            {**built.to_dict(), **{k: list(v) if isinstance(v, tuple) else v for k, v in past.items()}}
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"anti_rollback_counter": -1}, "^\\[schema\\] anti_rollback_counter must be >= 0$"),
        ({"expires_utc": "2026-01-01T00:00:00Z"}, "^\\[schema\\] expires_utc must follow created_utc$"),
        (
            {"networks": {"uff": ArtifactRef("onnx/uff.onnx"), "depth": ArtifactRef("onnx/d.onnx")}},
            r"unknown network name\(s\) \['depth'\]; known: \('rgb', 'point', 'uff'\)",
        ),
        ({"networks": {"rgb": ArtifactRef("onnx/rgb.onnx")}}, "networks must include 'uff'"),
        ({"banks": {}}, "^\\[schema\\] at least one memory bank is required$"),
        ({"files": {"banks/rgb.npy": "z" * 64}}, "banks/rgb.npy: sha256 must be 64"),
        ({"files": {"manifest.json": SHA_A}}, "not reserved: 'manifest.json'"),
        ({"precision": "fp8"}, r"precision must be one of \('fp32', 'fp16', 'int8'\): 'fp8'"),
        ({"schema_version": "m3dm-bundle/0"}, "unknown schema_version 'm3dm-bundle/0'"),
        ({"version": "01.2.3"}, "version must be semver: '01.2.3'"),
        ({"bundle_id": "A" * 32}, "bundle_id must be uuid4 hex"),
    ],
)
def test_manifest_level_validations(overrides: dict, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        draft_manifest(**overrides)


def test_counter_zero_and_semver_prerelease_are_valid() -> None:
    manifest = draft_manifest(anti_rollback_counter=0, version="1.0.0-rc.1+build.5")
    assert manifest.anti_rollback_counter == 0 and manifest.version == "1.0.0-rc.1+build.5"


def test_referenced_paths_and_sealing_name_what_is_missing() -> None:
    manifest = sealed_manifest(
        banks={"rgb": BankSpec("banks/rgb.npz", "pq", 300, 48, 28, stats_path="banks/s.npy", pq_m=6)}
    )
    assert manifest.referenced_paths() == ["banks/rgb.npz", "banks/s.npy", "golden/0.npz", "onnx/uff.onnx"]
    with pytest.raises(
        SchemaError, match=r"^\[schema\] referenced file\(s\) not listed in `files`: \['banks/s.npy'\]$"
    ):
        manifest.check_sealed()
    with pytest.raises(SchemaError, match=r"^\[schema\] manifest lists no files$"):
        sealed_manifest(files={}).check_sealed()
    with pytest.raises(SchemaError, match=r"network 'uff': sha256 differs from files\[onnx/uff.onnx\]"):
        sealed_manifest(files={**sealed_manifest().files, "onnx/uff.onnx": SHA_B}).check_sealed()


def test_utc_helpers_round_trip_and_refuse_naive_times() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    from protocol.manifest import format_utc, parse_utc

    moment = datetime(2026, 3, 4, 5, 6, 7, 890, tzinfo=timezone(timedelta(hours=2)))
    assert format_utc(moment) == "2026-03-04T03:06:07Z"
    assert parse_utc("2026-03-04T03:06:07Z") == datetime(2026, 3, 4, 3, 6, 7, tzinfo=UTC)
    assert parse_utc("2026-03-04T05:06:07+02:00") == datetime(2026, 3, 4, 3, 6, 7, tzinfo=UTC)
    with pytest.raises(SchemaError, match="^\\[schema\\] datetime must be timezone-aware$"):
        format_utc(datetime(2026, 1, 1))
    with pytest.raises(SchemaError, match="not an ISO 8601 timestamp: 'yesterday'"):
        parse_utc("yesterday")
    with pytest.raises(SchemaError, match="timestamp has no timezone: '2026-01-01T00:00:00'"):
        parse_utc("2026-01-01T00:00:00")


def test_from_dict_refuses_non_objects_and_checks_the_version_first() -> None:
    with pytest.raises(SchemaError, match="^\\[schema\\] manifest must be a JSON object, got list$"):
        BundleManifest.from_dict([])
    with pytest.raises(SchemaError, match=r"unknown schema_version None; expected m3dm-bundle/1"):
        BundleManifest.from_dict({"surprise": 1})
    with pytest.raises(SchemaError, match=r"^\[schema\] BankSpec: Expected `int`, got `str` - at `\$.rows`$"):
        BankSpec.from_dict({**BANK, "rows": "5"})


def test_manifest_from_json_names_the_bad_constant_and_bad_bytes() -> None:
    with pytest.raises(SchemaError, match="^\\[schema\\] manifest contains Infinity, which is not JSON$"):
        manifest_from_json(
            canonical_json(sealed_manifest()).replace(b'"image_threshold":2.5', b'"image_threshold":Infinity')
        )
    with pytest.raises(SchemaError, match="manifest.json is not valid JSON"):
        manifest_from_json(b"\xff\xfe")


def test_canonical_json_refuses_what_json_cannot_hold() -> None:
    manifest = sealed_manifest(provenance=Provenance("s", {"when": object()}, "c", "0.1.0", "h"))
    with pytest.raises(SchemaError, match="^\\[schema\\] manifest is not JSON-serialisable"):
        canonical_json(manifest)


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


def test_a_nan_inside_a_tuple_names_its_index() -> None:
    with pytest.raises(SchemaError, match=r"InputSpec.rgb_mean\[1\]: must be finite, got nan"):
        InputSpec(**(INPUT | {"rgb_mean": (0.5, float("nan"), 0.5)}))


def test_image_score_rule_defaults_for_old_manifests_and_local_norm_needs_signed_scales() -> None:
    old = sealed_manifest().to_dict()
    for key in ("image_score_rule", "image_topk_fraction", "local_norm_key"):
        old["scoring"].pop(key)
    parsed = BundleManifest.from_dict(old)  # a manifest written before the rule existed still loads
    assert (parsed.scoring.image_score_rule, parsed.scoring.local_norm_key) == ("max_patch", "row")
    with pytest.raises(SchemaError, match="unknown image_score_rule 'median'"):
        ScoringSpec(0.1, 4.0, 3, 224, image_score_rule="median")
    with pytest.raises(SchemaError, match="image_topk_fraction must lie in"):
        ScoringSpec(0.1, 4.0, 3, 224, image_score_rule="topk_mean", image_topk_fraction=0.0)
    local = ScoringSpec(0.1, 4.0, 3, 224, image_score_rule="local_norm", local_norm_key="position")
    with pytest.raises(SchemaError, match=r"local_norm needs every bank's local_scale_path; .*\['rgb'\]"):
        sealed_manifest(scoring=local)
    bank = BankSpec("banks/rgb.npz", "pq", 300, 48, 28, pq_m=6, local_scale_path="banks/rgb_local.npy")
    manifest = sealed_manifest(scoring=local, banks={"rgb": bank})
    assert "banks/rgb_local.npy" in manifest.referenced_paths()
    with pytest.raises(SchemaError, match=r"not listed in `files`: \['banks/rgb_local.npy'\]"):
        manifest.check_sealed()  # the scale file is hashed and signed like every bank file
    assert BundleManifest.from_dict(msgspec.structs.replace(
        manifest, files={**manifest.files, "banks/rgb_local.npy": SHA_B}
    ).to_dict()).scoring == local  # fmt: skip


def test_an_rgb_only_manifest_carries_its_modality_and_ships_the_rgb_bank_alone() -> None:
    rgb_only = {"modalities": ("rgb",), "networks": {}, "scoring": ScoringSpec(0.1, 4.0, 3, 224)}
    sealed = sealed_manifest(
        **rgb_only,
        thresholds=Thresholds("rgb", 2.5, 0.01),
        files={"banks/rgb.npz": SHA_B, "golden/0.npz": SHA_C},
    )
    parsed = manifest_from_json(canonical_json(sealed))
    assert parsed.modalities == ("rgb",) and parsed.variants == ("rgb",)
    assert b'"modalities":["rgb"]' in canonical_json(sealed)  # the signed bytes say it, for the station
    # A manifest from before the field existed is an rgb + point model with all five variants.
    old = {k: v for k, v in sealed_manifest().to_dict().items() if k != "modalities"}
    assert BundleManifest.from_dict(old).modalities == ("rgb", "point")
    assert BundleManifest.from_dict(old).variants[-1] == "rgb+point+fusion"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"modalities": ("point",)}, r"modalities must be one of .*: \('point',\)"),
        (
            {
                "banks": {
                    "rgb": BankSpec("b/r.npy", "fp32", 5, 4, 28),
                    "point": BankSpec("b/p.npy", "fp32", 5, 4, 56),
                }
            },
            r"RGB-only model has the rgb bank alone: \['point', 'rgb'\]",
        ),
        ({"networks": {"uff": ArtifactRef("onnx/uff.onnx")}}, r"no point network or UFF, got \['uff'\]"),
        ({"thresholds": Thresholds("rgb+point+fusion", 1.0, 0.05)}, "RGB-only model decides on the 'rgb'"),
        (
            {
                "scoring": ScoringSpec(
                    0.1, 4.0, 3, 224, {}, {"rgb+point": DLFCoefficients((1.0, 2.0), 0.0, (3.0,), 1.5)}
                )
            },
            "RGB-only model has no decision-layer fusion",
        ),
    ],
)
def test_an_rgb_only_manifest_refuses_what_it_cannot_have(overrides: dict, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        draft_manifest(**{"modalities": ("rgb",), "networks": {}, **overrides})
