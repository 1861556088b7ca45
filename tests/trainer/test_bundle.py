"""Bundle building: key generation, sealing and signing, reproducible tar, refusal of pickles."""

from __future__ import annotations

import io
import json
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from manifest_factory import draft_manifest

from protocol.errors import BundleError, SchemaError
from protocol.manifest import (
    canonical_json,
    manifest_from_json,
)
from trainer.bundle import BundleContents, build_bundle, keygen, tar_path_for


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def staging() -> BundleContents:
    manifest = draft_manifest()
    files = {
        "onnx/uff.onnx": b"\x08\x07onnx-ish bytes",
        "banks/rgb.npy": npy_bytes(np.ones((5, 4), np.float32)),
    }
    return BundleContents(manifest, files)


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    keygen(tmp_path / "keys")
    return tmp_path / "keys"


def test_keygen_writes_pem_pair_with_private_key_0600(tmp_path: Path) -> None:
    private_path, public_path = keygen(tmp_path / "keys")
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    with pytest.raises(BundleError, match="refusing to overwrite"):
        keygen(tmp_path / "keys")


def test_build_writes_sealed_signed_bundle_and_tar(tmp_path: Path, key_dir: Path) -> None:
    bundle_dir = build_bundle(staging(), key_dir, tmp_path / "out" / "bagel-0.1.0")
    names = sorted(p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file())
    assert names == ["banks/rgb.npy", "manifest.json", "manifest.sig", "onnx/uff.onnx"]
    raw = (bundle_dir / "manifest.json").read_bytes()
    manifest = manifest_from_json(raw)
    assert raw == canonical_json(manifest)
    assert set(manifest.files) == {"banks/rgb.npy", "onnx/uff.onnx"}
    assert manifest.networks["uff"].sha256 == manifest.files["onnx/uff.onnx"]
    assert manifest.networks["uff"].size_bytes == len(b"\x08\x07onnx-ish bytes")
    public_key = serialization.load_pem_public_key((key_dir / "bundle_signing.pub").read_bytes())
    signature = (bundle_dir / "manifest.sig").read_bytes()
    assert len(signature) == 64
    public_key.verify(signature, raw)  # raises if wrong
    with tarfile.open(tar_path_for(bundle_dir)) as archive:
        members = archive.getmembers()
    assert [m.name for m in members] == sorted(names)
    assert all(m.isreg() and m.mtime == 0 and m.uid == 0 for m in members)


def test_tar_is_byte_reproducible(tmp_path: Path, key_dir: Path) -> None:
    first = build_bundle(staging(), key_dir, tmp_path / "a" / "bundle")
    second = build_bundle(staging(), key_dir, tmp_path / "b" / "bundle")
    assert tar_path_for(first).read_bytes() == tar_path_for(second).read_bytes()


@pytest.mark.parametrize("name", ["model.pkl", "weights/uff.pt", "uff.PTH", "x.ckpt"])
def test_pickle_files_are_refused(tmp_path: Path, key_dir: Path, name: str) -> None:
    contents = staging()
    contents = BundleContents(contents.manifest, {**contents.files, name: b"\x80\x04."})
    with pytest.raises(BundleError, match="pickle"):
        build_bundle(contents, key_dir, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_object_array_npy_is_refused(tmp_path: Path, key_dir: Path) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    contents = staging()
    contents = BundleContents(contents.manifest, {**contents.files, "banks/rgb.npy": buffer.getvalue()})
    with pytest.raises(BundleError, match="banks/rgb.npy"):
        build_bundle(contents, key_dir, tmp_path / "bundle")


def test_missing_referenced_file_and_existing_output_are_refused(tmp_path: Path, key_dir: Path) -> None:
    contents = staging()
    without_bank = BundleContents(contents.manifest, {"onnx/uff.onnx": b"x"})
    with pytest.raises(SchemaError, match="banks/rgb.npy"):
        build_bundle(without_bank, key_dir, tmp_path / "bundle")
    (tmp_path / "exists").mkdir()
    with pytest.raises(BundleError, match="already exists"):
        build_bundle(contents, key_dir, tmp_path / "exists")


def test_sources_may_be_paths(tmp_path: Path, key_dir: Path) -> None:
    source = tmp_path / "uff.onnx"
    source.write_bytes(b"graph")
    contents = staging()
    bundle_dir = build_bundle(
        BundleContents(contents.manifest, {**contents.files, "onnx/uff.onnx": source}),
        key_dir,
        tmp_path / "b",
    )
    assert (bundle_dir / "onnx/uff.onnx").read_bytes() == b"graph"
    assert json.loads((bundle_dir / "manifest.json").read_bytes())["networks"]["uff"]["size_bytes"] == 5
