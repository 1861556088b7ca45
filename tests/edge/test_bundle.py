"""Station-side bundle checks: every tampering, wrong key, expiry, rollback, and hostile or truncated tars."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import numpy as np
import pytest
from manifest_factory import draft_manifest

from edge.bundle import (
    golden_map_sha256,
    inspect_bundle,
    load_banks,
    safe_extract,
    verify_bundle,
    verify_report,
)
from protocol.errors import (
    ArchiveError,
    ExpiredError,
    HashMismatchError,
    RollbackError,
    SchemaError,
    SignatureError,
)
from protocol.manifest import (
    ArtifactRef,
    BankSpec,
    GoldenSample,
)
from trainer.bank_encode import encode_bank, save_encoded_bank
from trainer.bundle import BundleContents, build_bundle, keygen, tar_path_for

NOW = datetime(2026, 6, 1, tzinfo=UTC)
PAYLOAD = ["banks/point.npz", "banks/rgb.npy", "golden/0.npz", "onnx/rgb.onnx", "onnx/uff.onnx"]
ALL_FILES = sorted([*PAYLOAD, "manifest.json", "manifest.sig"])


def make_contents(tmp: Path) -> BundleContents:
    rng = np.random.default_rng(0)
    save_encoded_bank(encode_bank(rng.normal(size=(6, 4)).astype(np.float32), "fp32"), tmp / "rgb.npy")
    save_encoded_bank(encode_bank(rng.normal(size=(7, 4)).astype(np.float32), "int8"), tmp / "point.npz")
    np.savez(tmp / "golden.npz", rgb=np.zeros((8, 8, 3), np.uint8), xyz=np.zeros((8, 8, 3), np.float32))
    golden_sha = golden_map_sha256(np.zeros((8, 8), np.float32))
    manifest = draft_manifest(
        version="2.0.0",
        anti_rollback_counter=5,
        networks={"uff": ArtifactRef("onnx/uff.onnx"), "rgb": ArtifactRef("onnx/rgb.onnx")},
        banks={
            "rgb": BankSpec("banks/rgb.npy", "fp32", 6, 4, 28),
            "point": BankSpec("banks/point.npz", "int8", 7, 4, 56),
        },
        precision="fp16",
        golden=[GoldenSample("golden/0.npz", 0.0, golden_sha, 0.0, 1e-3)],
    )
    files = {
        "onnx/uff.onnx": b"\x08\x07uff graph bytes",
        "onnx/rgb.onnx": b"\x08\x07rgb graph bytes",
        "banks/rgb.npy": tmp / "rgb.npy",
        "banks/point.npz": tmp / "point.npz",
        "golden/0.npz": tmp / "golden.npz",
    }
    return BundleContents(manifest, files)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(bundle_dir, public_key, other_public_key) built once; tests copy before tampering."""
    root = tmp_path_factory.mktemp("built")
    keygen(root / "keys")
    _, other_public = keygen(root / "other_keys")
    bundle_dir = build_bundle(make_contents(root), root / "keys", root / "bundles" / "bagel-2.0.0")
    return bundle_dir, root / "keys" / "bundle_signing.pub", other_public


@pytest.fixture
def bundle_copy(built: tuple[Path, Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(built[0], tmp_path / "bundle"))


def test_fresh_bundle_verifies_from_dir_and_from_tar(built, tmp_path: Path) -> None:
    bundle_dir, public_key, _ = built
    manifest = verify_bundle(bundle_dir, public_key, now=NOW, min_counter=5)
    assert manifest.version == "2.0.0" and manifest.anti_rollback_counter == 5
    extracted = safe_extract(tar_path_for(bundle_dir), tmp_path / "installed")
    assert verify_bundle(extracted, public_key, now=NOW) == manifest
    report = verify_report(extracted, public_key, now=NOW)
    assert report.ok and [c.status for c in report.checks.values()] == ["ok"] * 5
    json.dumps(report.to_dict())


def test_parametrised_files_cover_the_whole_bundle(built) -> None:
    bundle_dir = built[0]
    assert (
        sorted(p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file())
        == ALL_FILES
    )


@pytest.mark.parametrize("relpath", ALL_FILES)
def test_one_flipped_byte_anywhere_is_rejected(built, bundle_copy: Path, relpath: str) -> None:
    path = bundle_copy / relpath
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    report = verify_report(bundle_copy, built[1], now=NOW)
    assert not report.ok
    failed = [name for name, check in report.checks.items() if check.status == "failed"]
    assert len(failed) == 1
    if relpath == "manifest.json":  # either no longer parses/validates, or no longer matches the signature
        assert failed[0] in ("schema", "signature")
        expected: tuple[type[Exception], ...] = (SchemaError, SignatureError)
    elif relpath == "manifest.sig":
        assert failed == ["signature"]
        expected = (SignatureError,)
    else:
        assert failed == ["hashes"] and relpath in report.checks["hashes"].message
        expected = (HashMismatchError,)
    with pytest.raises(expected, match=r"\[(schema|signature|hashes)\]"):
        verify_bundle(bundle_copy, built[1], now=NOW)


def test_wrong_public_key_fails_signature(built) -> None:
    bundle_dir, _, other_public = built
    with pytest.raises(SignatureError, match="signature does not match"):
        verify_bundle(bundle_dir, other_public, now=NOW)


def test_expired_bundle_names_both_dates(built) -> None:
    with pytest.raises(ExpiredError, match="2027-01-01T00:00:00Z.*2027-02-01"):
        verify_bundle(built[0], built[1], now=datetime(2027, 2, 1, tzinfo=UTC))


def test_lower_anti_rollback_counter_is_refused(built) -> None:
    with pytest.raises(RollbackError, match="5 < station minimum 6"):
        verify_bundle(built[0], built[1], now=NOW, min_counter=6)
    report = verify_report(built[0], built[1], now=NOW, min_counter=6)
    assert report.to_dict()["checks"]["rollback"]["status"] == "failed"


def test_unlisted_missing_and_linked_files_are_rejected(built, bundle_copy: Path) -> None:
    (bundle_copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(HashMismatchError, match="extra.bin.*not listed"):
        verify_bundle(bundle_copy, built[1], now=NOW)
    (bundle_copy / "extra.bin").unlink()
    (bundle_copy / "banks/rgb.npy").unlink()
    with pytest.raises(HashMismatchError, match="banks/rgb.npy.*missing"):
        verify_bundle(bundle_copy, built[1], now=NOW)
    (bundle_copy / "banks/rgb.npy").symlink_to(built[0] / "banks/rgb.npy")
    with pytest.raises(HashMismatchError, match="links are refused"):
        verify_bundle(bundle_copy, built[1], now=NOW)


def test_failed_check_skips_the_rest_in_the_report(built, bundle_copy: Path) -> None:
    (bundle_copy / "manifest.sig").write_bytes(b"short")
    statuses = {
        n: c["status"] for n, c in verify_report(bundle_copy, built[1], now=NOW).to_dict()["checks"].items()
    }
    assert statuses == {
        "schema": "ok",
        "signature": "failed",
        "hashes": "skipped",
        "expiry": "skipped",
        "rollback": "skipped",
    }


def test_missing_manifest_is_a_schema_error(built, bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(SchemaError, match="missing"):
        verify_bundle(bundle_copy, built[1], now=NOW)


@pytest.mark.parametrize("cut", ["mid_header", "mid_data", "no_end_marker", "empty"])
def test_truncated_tar_is_rejected_and_leaves_nothing(built, tmp_path: Path, cut: str) -> None:
    data = tar_path_for(built[0]).read_bytes()
    first_size = tarfile.open(fileobj=io.BytesIO(data)).getmembers()[0].size
    end = {
        "mid_header": 512 + 512 * ((first_size + 511) // 512) + 100,
        "mid_data": 512 + first_size // 2,
        "no_end_marker": len(data.rstrip(b"\0")) + (-len(data.rstrip(b"\0")) % 512),
        "empty": 0,
    }[cut]
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(data[:end])
    with pytest.raises(ArchiveError, match="truncated|unreadable|no files"):
        safe_extract(truncated, tmp_path / "out" / "dest")
    assert not (tmp_path / "out" / "dest").exists()
    assert list((tmp_path / "out").iterdir()) == []  # the temporary directory was removed too


def hostile_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"evil", target: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ([member("../evil")], "escape"),
        ([member("ok/../../evil")], "escape"),
        ([member("/tmp/evil")], "escape"),
        ([member("link", tarfile.SYMTYPE, target="/etc/passwd")], "not a regular file"),
        ([member("a"), member("hard", tarfile.LNKTYPE, target="a")], "not a regular file"),
        ([member("dev", tarfile.CHRTYPE)], "not a regular file"),
        ([member("a"), member("a")], "twice"),
        ([member("big", data=b"x" * 2048)], "cap"),
    ],
)
def test_hostile_tar_members_are_rejected(tmp_path: Path, members: list, match: str) -> None:
    tar = hostile_tar(tmp_path / "hostile.tar", members)
    with pytest.raises(ArchiveError, match=match):
        safe_extract(tar, tmp_path / "deep" / "dest", max_member_bytes=1024)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "deep" / "evil").exists()
    assert list((tmp_path / "deep").iterdir()) == []


def test_extract_refuses_existing_destination(built, tmp_path: Path) -> None:
    (tmp_path / "dest").mkdir()
    with pytest.raises(ArchiveError, match="already exists"):
        safe_extract(tar_path_for(built[0]), tmp_path / "dest")


def test_inspect_dir_and_tar_agree(built) -> None:
    from_dir, from_tar = inspect_bundle(built[0]), inspect_bundle(tar_path_for(built[0]))
    assert {k: v for k, v in from_dir.items() if k != "path"} == {
        k: v for k, v in from_tar.items() if k != "path"
    }
    assert from_dir["verified"] is False and from_dir["signed"] is True
    assert from_dir["banks"]["point"] == {
        "encoding": "int8",
        "rows": 7,
        "dim": 4,
        "size_bytes": (built[0] / "banks/point.npz").stat().st_size,
        "index": None,
    }
    assert from_dir["networks"]["uff"]["size_bytes"] == len(b"\x08\x07uff graph bytes")
    assert from_dir["file_count"] == len(ALL_FILES)
    assert from_dir["total_bytes"] == sum((built[0] / name).stat().st_size for name in ALL_FILES)


def test_inspect_names_each_banks_ann_index_and_the_image_rule(bundle_copy: Path) -> None:
    """An operator reads from `inspect` which bank is searched approximately, and with which knob."""
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["banks"]["point"] |= {
        "index_path": "banks/point.faiss",
        "index_kind": "ivf-flat",
        "index_params": {"nprobe": 12},
        "index_recall": 0.993,
    }
    manifest["files"]["banks/point.faiss"] = "0" * 64  # listed, as a shipped index is (inspect never hashes)
    manifest["scoring"]["image_score_rule"] = "max_blurred_map"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    info = inspect_bundle(bundle_copy)
    assert info["banks"]["point"]["index"] == {
        "kind": "ivf-flat",
        "params": {"nprobe": 12},
        "recall_at_1": 0.993,
    }
    assert info["banks"]["rgb"]["index"] is None
    assert info["image_score_rule"] == "max_blurred_map"


def test_inspect_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="not a bundle: manifest.json is missing"):
        inspect_bundle(tmp_path)
    with pytest.raises(ArchiveError, match="no such bundle"):
        inspect_bundle(tmp_path / "nothing.tar")


def test_load_banks_after_verification(built) -> None:
    manifest = verify_bundle(built[0], built[1], now=NOW)
    banks = load_banks(built[0], manifest)
    assert {name: (b.encoding, b.rows, b.dim) for name, b in banks.items()} == {
        "point": ("int8", 7, 4),
        "rgb": ("fp32", 6, 4),
    }


def test_golden_map_sha256_hashes_float16_bytes() -> None:
    map_hw = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    assert golden_map_sha256(map_hw) == hashlib.sha256(map_hw.astype("<f2").tobytes()).hexdigest()
    assert golden_map_sha256(map_hw) != golden_map_sha256(map_hw + 1e-2)


# ------------------------------------------------------------------ tampering at real sizes, every folder

BIG_BYTES = 3 * 2**20 + 12345  # > 2 MiB: a digest of only the first MiB (or two) must not pass


@pytest.fixture(scope="module")
def big_built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bundle whose network and bank files are multi-MiB, like a real fusion bank (2.2 MB)."""
    root = tmp_path_factory.mktemp("big")
    keygen(root / "keys")
    contents = make_contents(root)
    rng = np.random.default_rng(1)
    rows = BIG_BYTES // 16
    save_encoded_bank(encode_bank(rng.normal(size=(rows, 4)).astype(np.float32), "fp32"), root / "big.npy")
    manifest = msgspec.structs.replace(
        contents.manifest,
        banks={**contents.manifest.banks, "rgb": BankSpec("banks/rgb.npy", "fp32", rows, 4, 28)},
    )
    files = {
        **contents.files,
        "onnx/uff.onnx": b"\x08\x07" + rng.bytes(BIG_BYTES),
        "banks/rgb.npy": root / "big.npy",
    }
    bundle_dir = build_bundle(BundleContents(manifest, files), root / "keys", root / "bundles" / "big")
    return bundle_dir, root / "keys" / "bundle_signing.pub"


@pytest.mark.parametrize("relpath", ["onnx/uff.onnx", "banks/rgb.npy"])
@pytest.mark.parametrize("where", ["last_byte", "past_2_mib"])
def test_a_flip_deep_inside_a_multi_mib_file_is_rejected(
    big_built, tmp_path: Path, relpath: str, where: str
) -> None:
    copy = Path(shutil.copytree(big_built[0], tmp_path / "b"))
    path = copy / relpath
    size = path.stat().st_size
    assert size > 3 * 2**20
    offset = size - 1 if where == "last_byte" else 2 * 2**20 + 7
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(HashMismatchError, match=f"{relpath}.*sha256"):
        verify_bundle(copy, big_built[1], now=NOW)


def test_the_multi_mib_bundle_verifies_untouched(big_built) -> None:
    manifest = verify_bundle(big_built[0], big_built[1], now=NOW)
    assert manifest.networks["uff"].size_bytes == BIG_BYTES + 2


@pytest.mark.parametrize("folder", ["", "banks", "golden", "onnx", "onnx/extra", "newdir/deeper"])
def test_an_unlisted_file_in_any_folder_is_rejected(built, bundle_copy: Path, folder: str) -> None:
    target = bundle_copy / folder / "stowaway.bin"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"x" * 10)
    relpath = target.relative_to(bundle_copy).as_posix()
    with pytest.raises(HashMismatchError, match=f"{relpath}: file is not listed"):
        verify_bundle(bundle_copy, built[1], now=NOW)


# --------------------------------------------------------------- errors name the check, file and reason


def test_report_to_dict_carries_identity_and_every_message(built) -> None:
    report = verify_report(built[0], built[1], now=NOW, min_counter=5).to_dict()
    assert report["ok"] is True and report["bundle_dir"] == str(built[0])
    assert report["version"] == "2.0.0" and report["bundle_id"] == "0123456789abcdef0123456789abcdef"
    assert report["checks"] == {
        "schema": {"status": "ok", "message": "manifest.json parses as m3dm-bundle/1"},
        "signature": {"status": "ok", "message": "Ed25519 signature valid for bundle_signing.pub"},
        "hashes": {"status": "ok", "message": "5 files match their sha256, no unlisted files"},
        "expiry": {"status": "ok", "message": "valid until 2027-01-01T00:00:00Z"},
        "rollback": {"status": "ok", "message": "counter 5 >= minimum 5"},
    }
    plain = verify_report(built[0], built[1], now=NOW).to_dict()["checks"]["rollback"]["message"]
    assert plain == "counter 5; no station minimum given"
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        verify_report(built[0], built[1], now=datetime(2026, 6, 1))


def test_a_report_without_a_manifest_has_no_identity(built, bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").write_bytes(b"{}")
    report = verify_report(bundle_copy, built[1], now=NOW).to_dict()
    assert report["ok"] is False and report["bundle_id"] is None and report["version"] is None
    assert report["checks"]["schema"]["status"] == "failed"
    assert report["checks"]["signature"] == {"status": "skipped", "message": "not checked: schema failed"}


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("short_sig", r"\[signature\] .*manifest.sig: manifest.sig is 5 bytes, an Ed25519 signature is 64"),
        ("no_sig", r"\[signature\] .*manifest.sig: manifest.sig is missing"),
        ("bad_key", r"\[signature\] .*bundle_signing.pub: cannot load public key"),
        ("rsa_key", r"\[signature\] .*rsa.pub: public key is not Ed25519"),
        ("big_manifest", r"\[schema\] .*manifest.json: manifest.json is implausibly large"),
        ("linked_manifest", r"\[schema\] .*manifest.json: manifest.json is missing"),
    ],
)
def test_each_signature_and_schema_failure_says_why(built, bundle_copy: Path, tmp_path: Path, damage, match):
    key = built[1]
    if damage == "short_sig":
        (bundle_copy / "manifest.sig").write_bytes(b"short")
    elif damage == "no_sig":
        (bundle_copy / "manifest.sig").unlink()
    elif damage == "bad_key":
        key = tmp_path / "bundle_signing.pub"
        key.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    elif damage == "rsa_key":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        public = ec.generate_private_key(ec.SECP256R1()).public_key()
        key = tmp_path / "rsa.pub"
        key.write_bytes(
            public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
    elif damage == "big_manifest":
        (bundle_copy / "manifest.json").write_bytes(b" " * (16 * 2**20 + 1))
    else:
        (bundle_copy / "manifest.json").unlink()
        (bundle_copy / "manifest.json").symlink_to(built[0] / "manifest.json")
    with pytest.raises((SignatureError, SchemaError), match=match):
        verify_bundle(bundle_copy, key, now=NOW)


def test_archive_errors_name_the_archive_and_the_reason(built, tmp_path: Path) -> None:
    data = tar_path_for(built[0]).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data.rstrip(b"\0")) + (-len(data.rstrip(b"\0")) % 512)])
    with pytest.raises(
        ArchiveError, match=r"cut.tar: archive is truncated \(no end-of-archive marker\)"
    ) as err:
        safe_extract(cut, tmp_path / "out")
    assert err.value.path == str(cut)
    (tmp_path / "dest").mkdir()
    with pytest.raises(ArchiveError, match="dest: destination already exists") as err:
        safe_extract(tar_path_for(built[0]), tmp_path / "dest")
    assert err.value.path == str(tmp_path / "dest")


def test_members_at_the_size_cap_nested_and_multi_block_extract(big_built, tmp_path: Path) -> None:
    tar = hostile_tar(tmp_path / "ok.tar", [member("a/b/c/four", data=b"1234"), member("top", data=b"5678")])
    out = safe_extract(tar, tmp_path / "x" / "y" / "dest", max_member_bytes=4)  # == cap is allowed
    assert (out / "a/b/c/four").read_bytes() == b"1234" and (out / "top").read_bytes() == b"5678"
    assert sorted(p.name for p in (tmp_path / "x" / "y").iterdir()) == ["dest"]  # no work dir left
    extracted = safe_extract(tar_path_for(big_built[0]), tmp_path / "big")  # members of several MiB
    assert (extracted / "onnx/uff.onnx").read_bytes() == (big_built[0] / "onnx/uff.onnx").read_bytes()
    assert verify_bundle(extracted, big_built[1], now=NOW).networks["uff"].size_bytes == BIG_BYTES + 2


@pytest.mark.parametrize("name", ["a\\b", ""])  # tarfile itself cuts a name at NUL
def test_backslash_nul_and_empty_member_names_are_refused(tmp_path: Path, name: str) -> None:
    tar = hostile_tar(tmp_path / "h.tar", [member("fine"), member(name)])
    with pytest.raises(ArchiveError, match="escape|unreadable"):
        safe_extract(tar, tmp_path / "d" / "dest")
    assert list((tmp_path / "d").iterdir()) == []


def test_inspect_reports_every_field(built) -> None:
    info = inspect_bundle(tar_path_for(built[0]))
    assert info == {
        "path": str(tar_path_for(built[0])),
        "verified": False,
        "signed": True,
        "bundle_id": "0123456789abcdef0123456789abcdef",
        "version": "2.0.0",
        "class_name": "bagel",
        "preset": "m3dm-free",
        "random_weights": False,
        "precision": "fp16",
        "modalities": ["rgb", "point"],
        "image_score_rule": "max_patch",
        "created_utc": "2026-01-01T00:00:00Z",
        "expires_utc": "2027-01-01T00:00:00Z",
        "anti_rollback_counter": 5,
        "networks": {
            "rgb": {"path": "onnx/rgb.onnx", "size_bytes": len(b"\x08\x07rgb graph bytes")},
            "uff": {"path": "onnx/uff.onnx", "size_bytes": len(b"\x08\x07uff graph bytes")},
        },
        "banks": {
            "rgb": {
                "encoding": "fp32",
                "rows": 6,
                "dim": 4,
                "size_bytes": (built[0] / "banks/rgb.npy").stat().st_size,
                "index": None,
            },
            "point": {
                "encoding": "int8",
                "rows": 7,
                "dim": 4,
                "size_bytes": (built[0] / "banks/point.npz").stat().st_size,
                "index": None,
            },
        },
        "thresholds": verify_bundle(built[0], built[1], now=NOW).thresholds.to_dict(),
        "golden_samples": 1,
        "file_count": len(ALL_FILES),
        "total_bytes": sum((built[0] / n).stat().st_size for n in ALL_FILES),
    }
    shipped = info["thresholds"]  # fields may grow (score quantiles); these three are the decision
    assert (shipped["variant"], shipped["image_threshold"], shipped["false_reject_rate"]) == (
        "rgb",
        1.0,
        0.05,
    )


def test_inspect_of_a_tar_without_manifest_or_unreadable(tmp_path: Path) -> None:
    tar = hostile_tar(tmp_path / "nomanifest.tar", [member("a")])
    with pytest.raises(SchemaError, match="nomanifest.tar: archive has no usable manifest.json"):
        inspect_bundle(tar)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ArchiveError, match="junk.tar: unreadable archive"):
        inspect_bundle(junk)


def test_a_bundle_is_expired_at_its_expiry_second_not_after(built) -> None:
    expires = datetime(2027, 1, 1, tzinfo=UTC)
    assert verify_bundle(built[0], built[1], now=expires.replace(second=0) - timedelta(seconds=1)).version
    with pytest.raises(ExpiredError, match="expired at 2027-01-01T00:00:00Z"):
        verify_bundle(built[0], built[1], now=expires)
