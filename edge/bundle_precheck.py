"""Verify a bundle tar BEFORE anything is unpacked: signature, every member's sha256, expiry, counter.

One streaming pass over the archive (nothing written to disk) hashes every member and keeps manifest.json
and manifest.sig; then the Ed25519 signature is checked over the exact manifest bytes, and only a signed
manifest is trusted for the rest (hashes, no unlisted or missing files, expiry, anti-rollback counter).
Unpacking (`edge.bundle.safe_extract`) happens only after this passes, and `verify_bundle` checks the
extracted folder once more before any file is loaded.
"""

from __future__ import annotations

import hashlib
import tarfile
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.bundle import MAX_MANIFEST_BYTES, _check_expiry, _check_rollback
from protocol.errors import ArchiveError, HashMismatchError, SignatureError
from protocol.manifest import MANIFEST_NAME, SIGNATURE_NAME, BundleManifest, manifest_from_json

__all__ = ["verify_tar"]

_READ_BYTES = 2**20


def _public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"cannot load public key: {exc}", path) from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("public key is not Ed25519", path)
    return key


def _scan(tar_path: Path) -> tuple[dict[str, str], bytes, bytes]:
    """(member -> sha256, manifest bytes, signature bytes), refusing anything but plain relative files."""
    digests: dict[str, str] = {}
    manifest = signature = b""
    try:
        with tarfile.open(tar_path, "r:") as archive:
            for member in archive:
                name = str(PurePosixPath(member.name))
                if (
                    not member.isreg()
                    or PurePosixPath(name).is_absolute()
                    or ".." in PurePosixPath(name).parts
                ):
                    raise ArchiveError(f"member {member.name!r} is not a plain relative file", tar_path)
                if name in digests:
                    raise ArchiveError(f"member {name!r} appears twice", tar_path)
                source = archive.extractfile(member)
                if source is None:
                    raise ArchiveError(f"member {name!r} has no data", tar_path)
                digest = hashlib.sha256()
                keep = name in (MANIFEST_NAME, SIGNATURE_NAME) and member.size <= MAX_MANIFEST_BYTES
                kept = bytearray()
                while block := source.read(_READ_BYTES):
                    digest.update(block)
                    if keep:
                        kept += block
                digests[name] = digest.hexdigest()
                if name == MANIFEST_NAME:
                    manifest = bytes(kept)
                elif name == SIGNATURE_NAME:
                    signature = bytes(kept)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(f"unreadable or truncated archive: {exc}", tar_path) from None
    return digests, manifest, signature


def verify_tar(
    tar_path: Path, public_key_path: Path, min_counter: int | None = None, now: datetime | None = None
) -> BundleManifest:
    """The verified manifest of a bundle tar, or the BundleError of the first failed check."""
    tar_path = Path(tar_path)
    key = _public_key(Path(public_key_path))
    digests, raw, signature = _scan(tar_path)
    if not raw:
        raise SignatureError("archive has no manifest.json", tar_path)
    if len(signature) != 64:
        raise SignatureError(f"manifest.sig is {len(signature)} bytes, an Ed25519 signature is 64", tar_path)
    try:
        key.verify(signature, raw)
    except InvalidSignature:
        raise SignatureError("signature does not match manifest.json for the trusted key", tar_path) from None
    manifest = manifest_from_json(raw)
    for relpath, expected in sorted(manifest.files.items()):
        actual = digests.get(relpath)
        if actual is None:
            raise HashMismatchError("listed file is missing from the archive", relpath)
        if actual != expected:
            raise HashMismatchError(f"sha256 {actual[:16]}... != manifest {expected[:16]}...", relpath)
    unlisted = sorted(set(digests) - set(manifest.files) - {MANIFEST_NAME, SIGNATURE_NAME})
    if unlisted:
        raise HashMismatchError("file is not listed in the manifest", unlisted[0])
    _check_expiry(manifest, datetime.now(UTC) if now is None else now)
    _check_rollback(manifest, min_counter)
    return manifest
