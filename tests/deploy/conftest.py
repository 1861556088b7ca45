"""Bundle variants for the deploy tests, built once per session from the shared `fleet_bundle`.

v1        fleet_bundle (1.0.0, counter 1): what stations start on
v11       a fresh build of the same model (1.1.0, counter 2): a good update
golden    v11 re-signed with golden expectations that cannot be met (1.2.0, counter 3)
nok       v11 re-signed with a much lower decision threshold (1.3.0, counter 3): installs, passes its
          golden self-test (scores are unchanged), but turns many OK decisions into NOK
wrongsig  v11 re-signed by ANOTHER key (1.4.0, counter 3): stations must refuse it
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest


def resign(src_dir: Path, key_dir: Path, out_dir: Path, version: str, counter: int, **changes: Any) -> dict:
    """A copy of the bundle in `src_dir`: new id, version, counter and `changes`, signed by `key_dir`."""
    from protocol.manifest import MANIFEST_NAME, SIGNATURE_NAME, manifest_from_json, new_bundle_id
    from trainer.bundle import BundleContents, build_bundle, tar_path_for

    manifest = manifest_from_json((src_dir / MANIFEST_NAME).read_bytes())
    draft = msgspec.structs.replace(
        manifest, bundle_id=new_bundle_id(), version=version, anti_rollback_counter=counter, **changes
    )
    files = {rel: src_dir / rel for rel in manifest.files if rel not in (MANIFEST_NAME, SIGNATURE_NAME)}
    bundle_dir = build_bundle(BundleContents(manifest=draft, files=files), key_dir, out_dir)
    return {
        "bundle": bundle_dir,
        "tar": tar_path_for(bundle_dir),
        "bundle_id": draft.bundle_id,
        "version": version,
        "manifest": draft,
    }


@pytest.fixture(scope="session")
def deploy_bundles(fleet_bundle: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    from protocol.manifest import MANIFEST_NAME, manifest_from_json
    from trainer.bundle import keygen
    from trainer.bundle_build import build_model_bundle

    root = tmp_path_factory.mktemp("deploy-bundles")
    keys = fleet_bundle["keys"]
    summary = build_model_bundle(
        fleet_bundle["model"], keys, root / "v11", "1.1.0", 2, 30, None, None, fleet_bundle["data"]
    )
    v11_dir = Path(summary["path"])
    v11 = {
        "bundle": v11_dir,
        "tar": Path(summary["tar"]),
        "bundle_id": summary["bundle_id"],
        "version": "1.1.0",
        "manifest": manifest_from_json((v11_dir / MANIFEST_NAME).read_bytes()),
    }
    m = v11["manifest"]
    golden = [msgspec.structs.replace(g, expected_image_score=g.expected_image_score + 1.0) for g in m.golden]
    good_dir = fleet_bundle["data"] / fleet_bundle["class_name"] / "test" / "good"
    scores = sorted(_good_scores(v11_dir, keys, fleet_bundle))
    assert len(scores) >= 3 and scores[-1] <= m.thresholds.image_threshold, scores  # all OK under v1.1
    low = msgspec.structs.replace(m.thresholds, image_threshold=(scores[0] + scores[1]) / 2)
    keygen(root / "other-keys")
    return {
        "v1": {
            **fleet_bundle,
            "manifest": manifest_from_json((fleet_bundle["bundle"] / MANIFEST_NAME).read_bytes()),
        },
        "v11": v11,
        "golden": resign(v11_dir, keys, root / "golden", "1.2.0", 3, golden=golden),
        "nok": resign(v11_dir, keys, root / "nok", "1.3.0", 3, thresholds=low),
        "wrongsig": resign(v11_dir, root / "other-keys", root / "wrongsig", "1.4.0", 3),
        "keys": keys,
        "other_keys": root / "other-keys",
        "good_dir": good_dir,  # rgb/ + xyz/ of the good test scans: the stations' frame source
        "good_scores": scores,
    }


def _good_scores(bundle_dir: Path, keys: Path, fleet_bundle: dict) -> list[float]:
    from core.mvtec3d import list_samples, load_scan
    from edge.station_model import open_bundle

    model = open_bundle(bundle_dir, keys, backend="ort")
    variant = model.manifest.thresholds.variant
    refs = list_samples(fleet_bundle["data"], fleet_bundle["class_name"], "test")
    return [float(model.score_raw(load_scan(r)).image[variant]) for r in refs if r.defect_type == "good"]
