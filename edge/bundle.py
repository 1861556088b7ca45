"""Station side of bundles: safe tar extraction, signature/hash/expiry/rollback verification, inspection.

A bundle arrives as `<name>.tar`; `safe_extract` unpacks it atomically, `verify_bundle` checks it before any
file is loaded (schema -> signature -> hashes -> expiry -> rollback), then `load_banks` reads the memory
banks. No torch; numpy + cryptography only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from core.bank_codec import EncodedBank, load_encoded_bank
from protocol.errors import (
    ArchiveError,
    BundleError,
    ExpiredError,
    HashMismatchError,
    RollbackError,
    SchemaError,
    SignatureError,
)
from protocol.manifest import MANIFEST_NAME, SIGNATURE_NAME, BundleManifest, manifest_from_json, parse_utc

__all__ = [
    "CHECKS",
    "MAX_MEMBER_BYTES",
    "CheckResult",
    "VerifyReport",
    "golden_map_sha256",
    "inspect_bundle",
    "load_banks",
    "safe_extract",
    "verify_bundle",
    "verify_report",
]

CHECKS = ("schema", "signature", "hashes", "expiry", "rollback")
MAX_MEMBER_BYTES = 4 * 2**30  # a bigger member is a broken or hostile archive, not a model
MAX_MANIFEST_BYTES = 16 * 2**20
_READ_BYTES = 2**20
_BLOCK = 512


def golden_map_sha256(map_hw: np.ndarray) -> str:
    """sha256 of an anomaly map cast to little-endian float16, C order (GoldenSample.expected_map_sha256)."""
    return hashlib.sha256(np.ascontiguousarray(map_hw, dtype="<f2").tobytes()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_READ_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------- extract


def _member_name(member: tarfile.TarInfo, seen: set[str], cap_bytes: int) -> str:
    """The safe relative name of a regular-file member, or ArchiveError saying why not."""
    name = member.name
    pure = PurePosixPath(name)
    if not member.isreg():
        raise ArchiveError(f"member {name!r} is not a regular file (links, devices and dirs are refused)")
    if not name or pure.is_absolute() or "\\" in name or "\x00" in name or ".." in pure.parts:
        raise ArchiveError(f"member {name!r} would escape the destination")
    clean = str(pure)
    if clean in seen:
        raise ArchiveError(f"member {name!r} appears twice")
    if member.size > cap_bytes:
        raise ArchiveError(f"member {name!r} is {member.size} bytes, over the {cap_bytes}-byte cap")
    seen.add(clean)
    return clean


def _check_end_marker(tar_path: Path, end_offset: int) -> None:
    """A complete tar ends with two zero blocks; a cut at a member boundary otherwise reads as valid."""
    with tar_path.open("rb") as handle:
        handle.seek(end_offset)
        trailer = handle.read(2 * _BLOCK)
    if len(trailer) < 2 * _BLOCK or trailer.strip(b"\0"):
        raise ArchiveError("archive is truncated (no end-of-archive marker)", tar_path)


def _copy_member(archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    source = archive.extractfile(member)
    if source is None:
        raise ArchiveError(f"member {member.name!r} has no data")
    written = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("xb") as sink:
        for block in iter(lambda: source.read(_READ_BYTES), b""):
            written += len(block)
            sink.write(block)
    if written != member.size:
        raise ArchiveError(f"member {member.name!r} is short: {written} of {member.size} bytes")


def safe_extract(
    tar_path: str | Path, dest_dir: str | Path, max_member_bytes: int = MAX_MEMBER_BYTES
) -> Path:
    """Extract an uncompressed bundle tar into `dest_dir` (must not exist), all or nothing.

    Members are written into a temporary sibling directory which is renamed into place only when the whole
    archive read cleanly. Raises ArchiveError on truncation, traversal, links/devices, oversize or duplicates.
    """
    tar_path, dest_dir = Path(tar_path), Path(dest_dir)
    if dest_dir.exists():
        raise ArchiveError("destination already exists", dest_dir)
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.", dir=dest_dir.parent))
    try:
        with tarfile.open(tar_path, "r:") as archive:
            seen: set[str] = set()
            for member in archive:
                _copy_member(archive, member, work_dir / _member_name(member, seen, max_member_bytes))
            end_offset = archive.offset
        if not seen:
            raise ArchiveError("archive holds no files", tar_path)
        _check_end_marker(tar_path, end_offset)
        work_dir.chmod(0o755)
        os.rename(work_dir, dest_dir)
    except (tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise ArchiveError(f"unreadable or truncated archive: {exc}", tar_path) from None
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return dest_dir


# ----------------------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class CheckResult:
    """One verification step: status "ok" | "failed" | "skipped" (after an earlier failure)."""

    status: str
    message: str


@dataclass
class VerifyReport:
    """Every check's outcome, in order, for `m3dm bundle verify --json`; `error` is the first failure."""

    bundle_dir: str
    checks: dict[str, CheckResult] = field(default_factory=dict)
    manifest: BundleManifest | None = None
    error: BundleError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(c.status == "ok" for c in self.checks.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"ok", "bundle_dir", "bundle_id", "version", "checks": {name: {status, message}}}."""
        return {
            "ok": self.ok,
            "bundle_dir": self.bundle_dir,
            "bundle_id": None if self.manifest is None else self.manifest.bundle_id,
            "version": None if self.manifest is None else self.manifest.version,
            "checks": {name: {"status": c.status, "message": c.message} for name, c in self.checks.items()},
        }


def _check_schema(bundle_dir: Path) -> tuple[BundleManifest, bytes]:
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file() or path.is_symlink():
        raise SchemaError("manifest.json is missing", path)
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise SchemaError("manifest.json is implausibly large", path)
    raw = path.read_bytes()
    return manifest_from_json(raw), raw


def _check_signature(bundle_dir: Path, raw_manifest: bytes, public_key_path: Path) -> str:
    try:
        key = serialization.load_pem_public_key(public_key_path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"cannot load public key: {exc}", public_key_path) from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("public key is not Ed25519", public_key_path)
    sig_path = bundle_dir / SIGNATURE_NAME
    if not sig_path.is_file() or sig_path.is_symlink():
        raise SignatureError("manifest.sig is missing", sig_path)
    signature = sig_path.read_bytes()
    if len(signature) != 64:
        raise SignatureError(f"manifest.sig is {len(signature)} bytes, an Ed25519 signature is 64", sig_path)
    try:
        key.verify(signature, raw_manifest)  # over the exact bytes parsed above
    except InvalidSignature:
        raise SignatureError("signature does not match manifest.json for this public key", sig_path) from None
    return f"Ed25519 signature valid for {public_key_path.name}"


def _check_hashes(bundle_dir: Path, manifest: BundleManifest) -> str:
    present = {
        p.relative_to(bundle_dir).as_posix(): p
        for p in sorted(bundle_dir.rglob("*"))
        if p.is_symlink() or not p.is_dir()
    }
    for relpath, path in present.items():
        if path.is_symlink() or not path.is_file():
            raise HashMismatchError("not a regular file (links are refused)", relpath)
        if relpath not in manifest.files and relpath not in (MANIFEST_NAME, SIGNATURE_NAME):
            raise HashMismatchError("file is not listed in the manifest", relpath)
    for relpath, expected in sorted(manifest.files.items()):
        if relpath not in present:
            raise HashMismatchError("listed file is missing", relpath)
        actual = _file_sha256(present[relpath])
        if actual != expected:
            raise HashMismatchError(f"sha256 {actual[:16]}... != manifest {expected[:16]}...", relpath)
    for name, ref in [*manifest.networks.items(), *manifest.fp32_networks.items()]:
        size = present[ref.path].stat().st_size
        if size != ref.size_bytes:
            raise HashMismatchError(
                f"network {name!r} is {size} bytes, manifest says {ref.size_bytes}", ref.path
            )
    return f"{len(manifest.files)} files match their sha256, no unlisted files"


def _check_expiry(manifest: BundleManifest, now: datetime) -> str:
    expires = parse_utc(manifest.expires_utc)
    if now >= expires:
        raise ExpiredError(f"expired at {manifest.expires_utc}; station clock is {now.isoformat()}")
    return f"valid until {manifest.expires_utc}"


def _check_rollback(manifest: BundleManifest, min_counter: int | None) -> str:
    if min_counter is None:
        return f"counter {manifest.anti_rollback_counter}; no station minimum given"
    if manifest.anti_rollback_counter < min_counter:
        raise RollbackError(
            f"anti_rollback_counter {manifest.anti_rollback_counter} < station minimum {min_counter}"
        )
    return f"counter {manifest.anti_rollback_counter} >= minimum {min_counter}"


def verify_report(
    bundle_dir: str | Path,
    public_key_path: str | Path,
    now: datetime | None = None,
    min_counter: int | None = None,
) -> VerifyReport:
    """Run every check in order; after the first failure the rest are "skipped" (nothing is trusted)."""
    bundle_dir, public_key_path = Path(bundle_dir), Path(public_key_path)
    now = datetime.now(UTC) if now is None else now
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    report = VerifyReport(str(bundle_dir))
    raw = b""
    steps = {
        "schema": lambda: _check_schema(bundle_dir),
        "signature": lambda: _check_signature(bundle_dir, raw, public_key_path),
        "hashes": lambda: _check_hashes(bundle_dir, report.manifest),
        "expiry": lambda: _check_expiry(report.manifest, now),
        "rollback": lambda: _check_rollback(report.manifest, min_counter),
    }
    for name, step in steps.items():
        if report.error is not None:
            report.checks[name] = CheckResult("skipped", f"not checked: {report.error.check} failed")
            continue
        try:
            outcome = step()
        except BundleError as exc:
            report.error = exc
            report.checks[name] = CheckResult("failed", str(exc))
            continue
        if name == "schema":
            report.manifest, raw = outcome
            outcome = f"{MANIFEST_NAME} parses as {report.manifest.schema_version}"
        report.checks[name] = CheckResult("ok", outcome)
    return report


def verify_bundle(
    bundle_dir: str | Path,
    public_key_path: str | Path,
    now: datetime | None = None,
    min_counter: int | None = None,
) -> BundleManifest:
    """Verify a bundle directory before loading anything from it.

    Checks, in order: manifest parses (SchemaError), Ed25519 signature over manifest.json (SignatureError),
    every listed file's sha256 and no unlisted files (HashMismatchError naming the file), `now` before
    `expires_utc` (ExpiredError), anti-rollback counter >= `min_counter` (RollbackError).

    Returns:
        The verified manifest.
    """
    report = verify_report(bundle_dir, public_key_path, now, min_counter)
    if report.error is not None:
        raise report.error
    assert report.manifest is not None
    return report.manifest


def load_banks(bundle_dir: str | Path, manifest: BundleManifest) -> dict[str, EncodedBank]:
    """Every memory bank of a VERIFIED bundle, still encoded (search with core.bank_codec.nearest)."""
    return {name: load_encoded_bank(bundle_dir, spec) for name, spec in sorted(manifest.banks.items())}


# ---------------------------------------------------------------------------------------- inspect


def _tar_listing(tar_path: Path) -> tuple[bytes, dict[str, int]]:
    """manifest.json bytes and member sizes of a transport tar, without extracting anything."""
    try:
        with tarfile.open(tar_path, "r:") as archive:
            members = [m for m in archive.getmembers() if m.isreg()]
            info = next((m for m in members if m.name == MANIFEST_NAME), None)
            if info is None or info.size > MAX_MANIFEST_BYTES:
                raise SchemaError("archive has no usable manifest.json", tar_path)
            handle = archive.extractfile(info)
            raw = b"" if handle is None else handle.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(f"unreadable archive: {exc}", tar_path) from None
    return raw, {m.name: m.size for m in members}


def inspect_bundle(bundle_dir_or_tar: str | Path) -> dict[str, Any]:
    """Summary of a bundle directory or tar for `m3dm bundle inspect`. Does NOT verify the signature."""
    path = Path(bundle_dir_or_tar)
    if path.is_dir():
        if not (path / MANIFEST_NAME).is_file():
            raise SchemaError("not a bundle: manifest.json is missing", path)
        raw = (path / MANIFEST_NAME).read_bytes()
        sizes = {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*") if p.is_file()}
    elif path.is_file():
        raw, sizes = _tar_listing(path)
    else:
        raise ArchiveError("no such bundle folder or archive", path)
    manifest = manifest_from_json(raw)
    return {
        "path": str(path),
        "verified": False,
        "signed": SIGNATURE_NAME in sizes,
        "bundle_id": manifest.bundle_id,
        "version": manifest.version,
        "class_name": manifest.class_name,
        "preset": manifest.preset,
        "random_weights": manifest.random_weights,
        "precision": manifest.precision,
        "modalities": list(manifest.modalities),
        "image_score_rule": manifest.scoring.image_score_rule,
        "created_utc": manifest.created_utc,
        "expires_utc": manifest.expires_utc,
        "anti_rollback_counter": manifest.anti_rollback_counter,
        "networks": {
            name: {"path": r.path, "size_bytes": sizes.get(r.path)} for name, r in manifest.networks.items()
        },
        "banks": {
            name: {
                "encoding": b.encoding,
                "rows": b.rows,
                "dim": b.dim,
                "size_bytes": sizes.get(b.path),
                # exact search when None; else the faiss index the station searches, and its recall
                "index": None
                if b.index_kind is None
                else {"kind": b.index_kind, "params": b.index_params, "recall_at_1": b.index_recall},
            }
            for name, b in manifest.banks.items()
        },
        "thresholds": manifest.thresholds.to_dict(),
        "golden_samples": len(manifest.golden),
        "file_count": len(sizes),
        "total_bytes": sum(sizes.values()),
    }
