"""Attacks, end to end: nothing untrusted gets in.

Bundles: a tampered, expired, downgraded, wrongly-signed or unsigned bundle never loads through the
station's loader (`edge.station_model.open_bundle`, directory and tar), and the station command exits
non-zero without scoring a frame. A path-traversal tar is refused before anything is written outside.
The unit-level checks of each verification step live in tests/edge/test_bundle.py; these drive the real
fleet bundle (tests/conftest.py `fleet_bundle`) through the paths a station takes.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import msgspec
import pytest

from edge.bundle import safe_extract
from edge.station_model import open_bundle
from protocol.errors import (
    ArchiveError,
    BundleError,
    ExpiredError,
    HashMismatchError,
    RollbackError,
    SignatureError,
)
from protocol.manifest import MANIFEST_NAME, SIGNATURE_NAME, canonical_json, manifest_from_json
from trainer.bundle import _load_private_key, keygen


def _copy(fleet_bundle: dict, dest: Path) -> Path:
    return Path(shutil.copytree(fleet_bundle["bundle"], dest))


def _resign(bundle_dir: Path, key_dir: Path, **changes: object) -> None:
    """Rewrite manifest.json with `changes` and sign it with the key in `key_dir` (a real signer's act)."""
    manifest = manifest_from_json((bundle_dir / MANIFEST_NAME).read_bytes())
    data = canonical_json(msgspec.structs.replace(manifest, **changes))
    (bundle_dir / MANIFEST_NAME).write_bytes(data)
    (bundle_dir / SIGNATURE_NAME).write_bytes(_load_private_key(key_dir).sign(data))


def _tar(bundle_dir: Path, extra: list[tuple[str, bytes]] = ()) -> Path:
    """The bundle as a transport tar (like `m3dm bundle build` writes), plus any `extra` members."""
    tar_path = bundle_dir.with_name(bundle_dir.name + ".tar")
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as archive:
        for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
            archive.add(path, arcname=path.relative_to(bundle_dir).as_posix())
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return tar_path


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def hostile(fleet_bundle: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Bad variants of the fleet bundle: (dir, the error open_bundle must raise, station minimum counter)."""
    root = tmp_path_factory.mktemp("hostile")
    keys = fleet_bundle["keys"]
    keygen(root / "attacker_keys")
    variants: dict[str, tuple[Path, type[BundleError], int | None]] = {}

    bank = _copy(fleet_bundle, root / "tampered_bank")
    _flip_byte(next(p for p in sorted((bank / "banks").iterdir()) if p.is_file()))
    variants["tampered_bank"] = (bank, HashMismatchError, None)

    graph = _copy(fleet_bundle, root / "tampered_onnx")
    _flip_byte(next(p for p in sorted((graph / "onnx").iterdir()) if p.suffix == ".onnx"))
    variants["tampered_onnx"] = (graph, HashMismatchError, None)

    threshold = _copy(fleet_bundle, root / "tampered_threshold")
    raw = json.loads((threshold / MANIFEST_NAME).read_bytes())
    raw["thresholds"]["image_threshold"] = 1e6  # nothing would ever be NOK again
    (threshold / MANIFEST_NAME).write_bytes(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode())
    variants["tampered_threshold"] = (threshold, SignatureError, None)

    expired = _copy(fleet_bundle, root / "expired")
    _resign(expired, keys, created_utc="2020-01-01T00:00:00Z", expires_utc="2021-01-01T00:00:00Z")
    variants["expired"] = (expired, ExpiredError, None)

    downgraded = _copy(fleet_bundle, root / "downgraded")
    _resign(downgraded, keys, anti_rollback_counter=0)
    variants["downgraded"] = (downgraded, RollbackError, 1)  # the station already ran counter 1

    wrong = _copy(fleet_bundle, root / "wrongly_signed")
    _resign(wrong, root / "attacker_keys", version="9.9.9")
    variants["wrongly_signed"] = (wrong, SignatureError, None)

    unsigned = _copy(fleet_bundle, root / "unsigned")
    (unsigned / SIGNATURE_NAME).unlink()
    variants["unsigned"] = (unsigned, SignatureError, None)

    planted = _copy(fleet_bundle, root / "planted_file")
    (planted / "onnx" / "extra.onnx").write_bytes(b"\x08\x07not listed in the manifest")
    variants["planted_file"] = (planted, HashMismatchError, None)
    return {"variants": variants, "trusted_key": keys / "bundle_signing.pub"}


VARIANTS = [
    "tampered_bank",
    "tampered_onnx",
    "tampered_threshold",
    "expired",
    "downgraded",
    "wrongly_signed",
    "unsigned",
    "planted_file",
]


def test_the_untouched_bundle_loads(fleet_bundle: dict) -> None:
    """Control: the same loader, key and minimum accept the real bundle, so the refusals mean something."""
    model = open_bundle(fleet_bundle["bundle"], fleet_bundle["keys"], backend="ort", min_counter=1)
    assert model.manifest.bundle_id == fleet_bundle["bundle_id"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", ["dir", "tar"])
def test_hostile_bundle_never_loads(hostile: dict, variant: str, form: str) -> None:
    bundle_dir, error, min_counter = hostile["variants"][variant]
    target = bundle_dir if form == "dir" else _tar(bundle_dir)
    with pytest.raises(error):
        open_bundle(target, hostile["trusted_key"], backend="ort", min_counter=min_counter)


@pytest.mark.parametrize(
    "name",
    ["../evil.onnx", "onnx/../../evil.onnx", "/tmp/m3dm-evil.onnx"],
)
def test_path_traversal_tar_is_refused_and_writes_nothing_outside(
    fleet_bundle: dict, tmp_path: Path, name: str
) -> None:
    bundle = _copy(fleet_bundle, tmp_path / "src" / "bundle")
    tar_path = _tar(bundle, [(name, b"payload that must never land")])
    dest = tmp_path / "extract" / "dest"
    with pytest.raises(ArchiveError, match="escape"):
        safe_extract(tar_path, dest)
    assert not dest.exists() and list((tmp_path / "extract").iterdir()) == []
    assert not (tmp_path / "extract" / "evil.onnx").exists() and not (tmp_path / "evil.onnx").exists()
    assert not Path("/tmp/m3dm-evil.onnx").exists()
    with pytest.raises(ArchiveError):  # and the station loader takes the same path
        open_bundle(tar_path, fleet_bundle["keys"], backend="ort")
