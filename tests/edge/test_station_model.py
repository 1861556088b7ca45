"""Golden replay that can fail: wrong expectations and malformed inputs in a validly re-signed bundle."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest

from edge.station_model import open_bundle, replay_golden
from protocol.manifest import MANIFEST_NAME, SIGNATURE_NAME, BundleManifest, manifest_from_json
from trainer.bundle import BundleContents, build_bundle


def resign(fleet_bundle: dict, out: Path, edit_manifest=None, edit_files=None) -> Path:
    """A copy of the fleet bundle, changed and then signed again with the real key (so only the golden
    replay can notice), like an attacker or a buggy builder holding the signing key would produce."""
    src = fleet_bundle["bundle"]
    manifest = manifest_from_json((src / MANIFEST_NAME).read_bytes())
    files: dict[str, Path | bytes] = {
        p.relative_to(src).as_posix(): p
        for p in sorted(src.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST_NAME, SIGNATURE_NAME)
    }
    if edit_manifest is not None:
        manifest = edit_manifest(manifest)
    if edit_files is not None:
        files = edit_files(files)
    return build_bundle(BundleContents(manifest, files), fleet_bundle["keys"], out)


def shifted_golden(manifest: BundleManifest, shift: float) -> BundleManifest:
    golden = [
        msgspec.structs.replace(g, expected_image_score=g.expected_image_score + shift)
        for g in manifest.golden
    ]
    return msgspec.structs.replace(manifest, golden=golden)


def test_the_shipped_golden_samples_replay_ok(fleet_bundle: dict) -> None:
    results = replay_golden(open_bundle(fleet_bundle["bundle"], fleet_bundle["keys"], backend="ort"))
    assert len(results) == 3 and all(r.ok and r.reason == "" for r in results)
    assert all(abs(r.actual - r.expected) <= 1e-4 + 1e-3 * abs(r.expected) for r in results)


def test_wrong_golden_expectations_in_a_validly_signed_bundle_are_refused(
    fleet_bundle: dict, tmp_path: Path
) -> None:
    from trainer.bundle_build import verify_model_bundle

    bundle = resign(fleet_bundle, tmp_path / "wrong", edit_manifest=lambda m: shifted_golden(m, 0.05))
    model = open_bundle(bundle, fleet_bundle["keys"], backend="ort")  # signature and hashes are fine
    results = replay_golden(model)
    assert [r.ok for r in results] == [False, False, False]
    assert all("image score off by 0.05" in r.reason for r in results)
    report = verify_model_bundle(bundle, fleet_bundle["keys"], None)
    assert not report["ok"]
    assert report["checks"]["signature"]["ok"] and report["checks"]["hashes"]["ok"]
    assert report["checks"]["golden"]["status"] == "failed"
    assert "FAILED, image score off by 0.05" in report["checks"]["golden"]["message"]


@pytest.mark.parametrize(("rgb", "point"), [("site_cnn", "free"), ("free", "pointnet")])
def test_a_signed_bundle_naming_a_backbone_this_station_does_not_run_is_refused(
    fleet_bundle: dict, tmp_path: Path, rgb: str, point: str
) -> None:
    """A site model trained on an older input (backbone id `site_cnn`, before v3) would otherwise be scored
    through today's input silently; an unknown id is refused at open with what to do about it."""
    from core.errors import ConfigError

    def rename(m: BundleManifest) -> BundleManifest:
        spec = msgspec.structs.replace(m.feature_spec, rgb_backbone=rgb, point_backbone=point)
        return msgspec.structs.replace(m, feature_spec=spec)

    bundle = resign(fleet_bundle, tmp_path / "stale", edit_manifest=rename)
    expected = "older input .*retrain" if rgb.startswith("site") else f"unknown point backbone '{point}'"
    with pytest.raises(ConfigError, match=expected):
        open_bundle(bundle, fleet_bundle["keys"], backend="ort")


def test_a_shift_inside_the_tolerance_still_passes(fleet_bundle: dict, tmp_path: Path) -> None:
    """The tolerance is what it says: not zero (which would make any float noise fail), not unbounded."""
    manifest = manifest_from_json((fleet_bundle["bundle"] / MANIFEST_NAME).read_bytes())
    half_tol = min(g.tolerance_abs for g in manifest.golden) / 2
    bundle = resign(fleet_bundle, tmp_path / "near", edit_manifest=lambda m: shifted_golden(m, half_tol))
    assert all(r.ok for r in replay_golden(open_bundle(bundle, fleet_bundle["keys"], backend="ort")))


def test_a_golden_input_without_xyz_is_a_clear_failure_not_a_traceback(
    fleet_bundle: dict, tmp_path: Path
) -> None:
    from trainer.bundle_build import verify_model_bundle

    manifest = manifest_from_json((fleet_bundle["bundle"] / MANIFEST_NAME).read_bytes())
    victim = manifest.golden[0].input_path
    with np.load(fleet_bundle["bundle"] / victim) as data:
        np.savez_compressed(tmp_path / "rgb_only.npz", rgb=data["rgb"])

    bundle = resign(
        fleet_bundle, tmp_path / "noxyz", edit_files=lambda f: {**f, victim: tmp_path / "rgb_only.npz"}
    )
    results = replay_golden(open_bundle(bundle, fleet_bundle["keys"], backend="ort"))
    bad = next(r for r in results if r.input_path == victim)
    assert not bad.ok and np.isnan(bad.actual)
    assert "lacks array(s) ['xyz']" in bad.reason and victim in bad.reason
    assert all(r.ok for r in results if r.input_path != victim)
    report = verify_model_bundle(bundle, fleet_bundle["keys"], None)
    assert not report["ok"] and "lacks array(s) ['xyz']" in report["checks"]["golden"]["message"]


def test_opening_a_tar_cleans_its_extracted_copy_when_the_model_goes(fleet_bundle: dict) -> None:
    import gc

    model = open_bundle(fleet_bundle["tar"], fleet_bundle["keys"], backend="ort")
    scratch = model.root.parent
    assert (model.root / MANIFEST_NAME).is_file() and scratch.name.startswith("m3dm-bundle-")
    del model
    gc.collect()
    assert not scratch.exists()


def test_a_tar_that_fails_verification_leaves_no_extracted_copy(
    fleet_bundle: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from protocol.errors import SignatureError
    from trainer.bundle import keygen

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    _, other_public = keygen(tmp_path / "other")
    with pytest.raises(SignatureError, match="signature does not match"):
        open_bundle(fleet_bundle["tar"], other_public, backend="ort")
    assert list((tmp_path / "tmp").iterdir()) == []
