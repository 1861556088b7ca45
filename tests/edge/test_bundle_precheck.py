"""Bundle tars are verified before unpacking: signature, member hashes, unlisted files, counter."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from edge.bundle_precheck import verify_tar
from protocol.errors import ArchiveError, HashMismatchError, RollbackError, SignatureError


def _rewrite(src: Path, dst: Path, edit) -> Path:
    with tarfile.open(src) as archive, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as out:
        for member in archive:
            data = archive.extractfile(member).read()
            member, data = edit(member, data)
            if member is not None:
                member.size = len(data)
                out.addfile(member, io.BytesIO(data))
    return dst


def test_good_tar_verifies(fleet_bundle: dict) -> None:
    manifest = verify_tar(fleet_bundle["tar"], fleet_bundle["keys"] / "bundle_signing.pub")
    assert manifest.bundle_id == fleet_bundle["bundle_id"]


def test_tampered_member_unlisted_member_and_traversal(fleet_bundle: dict, tmp_path: Path) -> None:
    key = fleet_bundle["keys"] / "bundle_signing.pub"

    def flip_golden(member, data):
        if member.name.startswith("golden/"):
            data = data[:-1] + bytes([data[-1] ^ 1])
        return member, data

    with pytest.raises(HashMismatchError, match="golden/"):
        verify_tar(_rewrite(fleet_bundle["tar"], tmp_path / "a.tar", flip_golden), key)

    tar = _rewrite(fleet_bundle["tar"], tmp_path / "b.tar", lambda m, d: (m, d))
    with tarfile.open(tar, "a") as archive:
        info = tarfile.TarInfo("extra.bin")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(HashMismatchError, match="extra.bin"):
        verify_tar(tar, key)

    tar = tmp_path / "c.tar"
    with tarfile.open(tar, "w") as archive:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ArchiveError, match="escape"):
        verify_tar(tar, key)


def test_other_key_and_rollback_floor(fleet_bundle: dict, tmp_path: Path) -> None:
    from trainer.bundle import keygen

    keygen(tmp_path / "other")
    with pytest.raises(SignatureError, match="signature does not match"):
        verify_tar(fleet_bundle["tar"], tmp_path / "other" / "bundle_signing.pub")
    with pytest.raises(RollbackError, match="anti_rollback_counter 1 < station minimum 99"):
        verify_tar(fleet_bundle["tar"], fleet_bundle["keys"] / "bundle_signing.pub", min_counter=99)
