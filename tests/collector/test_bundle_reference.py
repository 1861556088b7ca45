"""The drift reference travels in the signed bundle: a trained bundle's manifest carries the validation
normals' score quantiles, and the collector's `--bundles` scan turns them into its drift reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collector.drift import load_references
from collector.store import Store


@pytest.mark.integration
def test_trained_bundle_manifest_feeds_the_drift_reference(fleet_bundle: dict, tmp_path: Path) -> None:
    manifest = json.loads((Path(fleet_bundle["bundle"]) / "manifest.json").read_text())
    thresholds = manifest["thresholds"]
    quantiles = thresholds["score_quantiles"][thresholds["variant"]]
    assert len(quantiles) == 21 and quantiles == sorted(quantiles) and quantiles[0] < quantiles[-1]
    store = Store.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        assert load_references(store, Path(fleet_bundle["bundle"]).parent) >= 1
        ref = store.drift_reference(fleet_bundle["bundle_id"], thresholds["variant"])
        assert ref is not None
        assert ref["quantiles"] == pytest.approx(quantiles)
        assert ref["threshold"] == pytest.approx(thresholds["image_threshold"])
        # a rescan of an unchanged folder reads nothing again
        seen: dict = {}
        load_references(store, Path(fleet_bundle["bundle"]).parent, seen)
        assert load_references(store, Path(fleet_bundle["bundle"]).parent, seen) == 0
    finally:
        store.close()
