"""Build and sign a model bundle: files + manifest.json (canonical JSON) + manifest.sig (Ed25519).

Last step of `m3dm train`/`m3dm bundle build`: the caller fills a draft `BundleManifest` and a map of bundle
paths to sources; this module hashes every file, seals the manifest, signs it, and writes the bundle
directory plus a reproducible `<dir>.tar` for transport. Stations check it with `edge.bundle`.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.errors import BundleError, SchemaError
from protocol.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    ArtifactRef,
    BundleManifest,
    canonical_json,
    check_relpath,
)

__all__ = [
    "FORBIDDEN_SUFFIXES",
    "PRIVATE_KEY_NAME",
    "PUBLIC_KEY_NAME",
    "BundleContents",
    "build_bundle",
    "keygen",
    "tar_path_for",
]

PRIVATE_KEY_NAME = "bundle_signing.key"
PUBLIC_KEY_NAME = "bundle_signing.pub"
# pickles execute code on load; a station must never be handed one (anomalib's TRUST_REMOTE_CODE lesson)
FORBIDDEN_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib")
_TAR_MTIME = 0  # fixed member metadata makes the transport tar byte-identical across builds


@dataclass(frozen=True)
class BundleContents:
    """What goes into a bundle.

    Attributes:
        manifest: a draft; `files`, and each network's `sha256`/`size_bytes`, are (re)computed from `files`.
        files: bundle relpath (POSIX) -> source file path or the bytes themselves.
    """

    manifest: BundleManifest
    files: Mapping[str, Path | str | bytes]


def tar_path_for(bundle_dir: str | Path) -> Path:
    """The transport archive next to a bundle directory: `<dir>.tar`."""
    bundle_dir = Path(bundle_dir)
    return bundle_dir.with_name(bundle_dir.name + ".tar")


def keygen(out_dir: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair as PEM; the private key gets mode 0600. Refuses to overwrite."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / PRIVATE_KEY_NAME, out_dir / PUBLIC_KEY_NAME
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        # O_EXCL: never clobber a key that signed bundles already out in the fleet
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise BundleError("signing key already exists; refusing to overwrite", private_path) from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    os.chmod(private_path, 0o600)  # the umask may have narrowed, never widened, but be explicit
    public_path.write_bytes(public_pem)
    return private_path, public_path


def _load_private_key(key_dir: Path) -> Ed25519PrivateKey:
    path = key_dir / PRIVATE_KEY_NAME
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"cannot load signing key: {exc}", path) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError("signing key is not Ed25519", path)
    return key


def _check_numpy_file(relpath: str, data: bytes) -> None:
    """Refuse .npy/.npz that need pickle (object arrays) or do not parse."""
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                for name in loaded.files:
                    loaded[name]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BundleError(f"not a pickle-free numpy file: {exc}", relpath) from None


def _read_source(relpath: str, source: Path | str | bytes) -> bytes:
    check_relpath(relpath)
    if relpath.lower().endswith(FORBIDDEN_SUFFIXES):
        raise BundleError("pickle-based files are refused; ship .npy/.npz, safetensors or ONNX", relpath)
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read source {source}: {exc}", relpath) from None
    if relpath.endswith((".npy", ".npz")):
        _check_numpy_file(relpath, data)
    return data


def _seal(draft: BundleManifest, payload: Mapping[str, bytes]) -> BundleManifest:
    """Fill `files` and network hashes/sizes from the payload, then check every reference resolves."""
    digests = {path: hashlib.sha256(data).hexdigest() for path, data in sorted(payload.items())}
    sealed: dict[str, dict[str, ArtifactRef]] = {"networks": {}, "fp32_networks": {}}
    for field_name, refs in sealed.items():
        for name, ref in getattr(draft, field_name).items():
            if ref.path not in payload:
                raise SchemaError(f"network {name!r} file {ref.path!r} is not among the bundle contents")
            refs[name] = ArtifactRef(ref.path, digests[ref.path], len(payload[ref.path]))
    manifest = msgspec.structs.replace(draft, **sealed, files=digests)
    manifest.check_sealed()
    return manifest


def _write_tar(bundle_dir: Path, names: list[str], tar_path: Path) -> None:
    """Regular files only, sorted, fixed owner/mode/mtime: the same bundle gives the same bytes."""
    tmp_path = tar_path.with_name(tar_path.name + ".partial")
    with tarfile.open(tmp_path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name in sorted(names):
            data = (bundle_dir / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            archive.addfile(info, io.BytesIO(data))
    os.replace(tmp_path, tar_path)


def build_bundle(staging: BundleContents, key_dir: str | Path, out_dir: str | Path) -> Path:
    """Write, sign and archive a bundle.

    Args:
        staging: draft manifest and the files to include (relpath -> source path or bytes).
        key_dir: folder holding `bundle_signing.key` (from `keygen`).
        out_dir: bundle directory to create (must not exist); `<out_dir>.tar` is written beside it.

    Returns:
        The bundle directory: files, manifest.json (canonical JSON) and manifest.sig (64-byte Ed25519).
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise BundleError("bundle directory already exists", out_dir)
    key = _load_private_key(Path(key_dir))
    payload = {relpath: _read_source(relpath, source) for relpath, source in staging.files.items()}
    manifest_bytes = canonical_json(_seal(staging.manifest, payload))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: a reader never sees a half-written bundle
    work_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for relpath, data in payload.items():
            (work_dir / relpath).parent.mkdir(parents=True, exist_ok=True)
            (work_dir / relpath).write_bytes(data)
        (work_dir / MANIFEST_NAME).write_bytes(manifest_bytes)
        (work_dir / SIGNATURE_NAME).write_bytes(key.sign(manifest_bytes))
        work_dir.chmod(0o755)
        os.rename(work_dir, out_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    _write_tar(out_dir, [*payload, MANIFEST_NAME, SIGNATURE_NAME], tar_path_for(out_dir))
    return out_dir
