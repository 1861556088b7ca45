"""A draft bundle manifest for tests: the common fields once, each test overriding what it is about."""

from __future__ import annotations

from typing import Any

from protocol.manifest import (
    SCHEMA_VERSION,
    ArtifactRef,
    BankSpec,
    BundleManifest,
    FeatureSpec,
    InputSpec,
    Provenance,
    ScoringSpec,
    Thresholds,
)


def draft_manifest(**overrides: Any) -> BundleManifest:
    """A valid draft (no `files` yet) for the weight-free preset with one fp32 rgb bank of 5×4."""
    fields: dict[str, Any] = dict(
        schema_version=SCHEMA_VERSION,
        bundle_id="0123456789abcdef0123456789abcdef",
        version="0.1.0",
        class_name="bagel",
        preset="m3dm-free",
        random_weights=False,
        created_utc="2026-01-01T00:00:00Z",
        expires_utc="2027-01-01T00:00:00Z",
        anti_rollback_counter=3,
        input_spec=InputSpec(
            224, 224, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), 10, 0.004, 50, 100, 0.005, 100, False, 0.006, 30, 0
        ),
        feature_spec=FeatureSpec("free", "free", 4, 4, 8, 28, 56, 16, 8),
        networks={"uff": ArtifactRef("onnx/uff.onnx")},
        banks={"rgb": BankSpec("banks/rgb.npy", "fp32", 5, 4, 28)},
        scoring=ScoringSpec(0.1, 4.0, 3, 224),
        thresholds=Thresholds("rgb", 1.0, 0.05),
        precision="fp32",
        provenance=Provenance("synthetic", {"seed": 0}, "abc123", "0.1.0", "test"),
    )
    fields.update(overrides)
    return BundleManifest(**fields)
