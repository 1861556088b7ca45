"""Tests for core.mvtec3d on a small hand-made MVTec 3D-AD tree and on broken files."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from core.errors import (
    ConfigError,
    CorruptFileError,
    InputError,
    InvalidCloudError,
    MissingFileError,
    ShapeError,
)
from core.mvtec3d import (
    RGB_ONLY,
    RGB_XYZ,
    SampleRef,
    class_modalities,
    dataset_summary,
    discover_classes,
    format_summary,
    iter_scans,
    list_samples,
    load_scan,
    read_class_meta,
    read_gt,
    read_rgb,
    read_xyz,
    xyz_coverage,
)

H, W = 30, 40


def write_xyz(path: Path, xyz: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, xyz, photometric="minisblack")
    return path


def cloud(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.1, 0.5, (h, w, 3)).astype(np.float32)


def write_sample(folder: Path, stem: str, seed: int, xyz: bool = True, gt_id: int | None = None) -> None:
    """rgb/<stem>.png (+ xyz/<stem>.tiff, + gt/<stem>.png with a block of `gt_id`)."""
    rng = np.random.default_rng(seed)
    (folder / "rgb").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(folder / "rgb" / f"{stem}.png")
    if xyz:
        write_xyz(folder / "xyz" / f"{stem}.tiff", cloud(seed))
    if gt_id is not None:
        (folder / "gt").mkdir(parents=True, exist_ok=True)
        mask = np.zeros((H, W), np.uint8)
        mask[5:10, 5:12] = gt_id
        Image.fromarray(mask).save(folder / "gt" / f"{stem}.png")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """alpha: rgb+xyz; train 3, validation 2, test good 2 / crack 2 (id 253) / hole 1 (254). beta: no xyz."""
    root = tmp_path / "mvtec3d"
    alpha = root / "alpha"
    for i in range(3):
        write_sample(alpha / "train" / "good", f"{i:03d}", seed=i)
    for i in range(2):
        write_sample(alpha / "validation" / "good", f"{i:03d}", seed=10 + i)
        write_sample(alpha / "test" / "good", f"{i:03d}", seed=20 + i)
        write_sample(alpha / "test" / "crack", f"{i:03d}", seed=30 + i, gt_id=253)
    write_sample(alpha / "test" / "hole", "000", seed=40, gt_id=254)
    (alpha / "calibration").mkdir()
    (alpha / "calibration" / "camera_parameters.json").write_text(json.dumps({"focus": 0.0103}))
    (alpha / "class_ids.json").write_text(json.dumps({"0": "good", "253": "crack", "254": "hole"}))
    beta = root / "beta"
    for i in range(2):
        write_sample(beta / "train" / "good", f"{i:03d}", seed=50 + i, xyz=False)
    write_sample(beta / "test" / "good", "000", seed=60, xyz=False)
    write_sample(beta / "test" / "crack", "000", seed=61, xyz=False, gt_id=253)
    (root / "not_a_class").mkdir()
    return root


def test_discover_and_summary_counts(tree: Path):
    assert discover_classes(tree) == ["alpha", "beta"]
    assert dataset_summary(tree) == {
        "alpha": {
            "train": {"good": 3},
            "validation": {"good": 2},
            "test": {"good": 2, "crack": 2, "hole": 1},
        },
        "beta": {"train": {"good": 2}, "test": {"good": 1, "crack": 1}},
    }
    table = format_summary(dataset_summary(tree))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["class", "train", "validation"]
    assert lines[2].split()[:6] == ["alpha", "3", "2", "2", "3", "crack"]
    assert lines[-1].split() == ["total", "5", "2", "3", "4"]


def test_list_samples_order_labels_and_paths(tree: Path):
    refs = list_samples(tree, "alpha", "test")
    assert [(r.defect_type, r.stem) for r in refs] == [
        ("good", "000"),
        ("good", "001"),
        ("crack", "000"),
        ("crack", "001"),
        ("hole", "000"),
    ]
    assert [r.label for r in refs] == [0, 0, 1, 1, 1]
    assert refs[0].gt_path is None and refs[2].gt_path.name == "000.png"
    assert refs[2].xyz_path == tree / "alpha" / "test" / "crack" / "xyz" / "000.tiff"
    assert all(r.xyz_path is None for r in list_samples(tree, "beta", "train"))
    assert list_samples(tree, "beta", "validation") == []


def test_load_scan_keeps_defect_ids(tree: Path):
    crack, hole = list_samples(tree, "alpha", "test")[3:]
    scan = load_scan(hole)
    assert scan.rgb_hwc_u8.shape == (H, W, 3) and scan.rgb_hwc_u8.dtype == np.uint8
    assert scan.xyz_hwc_m.dtype == np.float32 and np.array_equal(scan.xyz_hwc_m, cloud(40))
    assert set(np.unique(scan.gt_ids_hw)) == {0, 254} and (scan.gt_ids_hw == 254).sum() == 35
    assert set(np.unique(load_scan(crack).gt_ids_hw)) == {0, 253}
    rgb_only = load_scan(list_samples(tree, "beta", "test")[1])
    assert rgb_only.xyz_hwc_m is None and set(np.unique(rgb_only.gt_ids_hw)) == {0, 253}


def test_class_meta(tree: Path):
    meta = read_class_meta(tree, "alpha")
    assert meta.camera_parameters == {"focus": 0.0103} and meta.class_ids["254"] == "hole"
    assert read_class_meta(tree, "beta").camera_parameters is None
    (tree / "beta" / "class_ids.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="class_ids.json"):
        read_class_meta(tree, "beta")


def test_bad_split_and_class(tree: Path):
    with pytest.raises(ConfigError, match="unknown split 'val'"):
        list_samples(tree, "alpha", "val")
    with pytest.raises(MissingFileError, match="no class folder 'gamma'"):
        list_samples(tree, "gamma", "train")


def test_missing_partner_files_are_named(tree: Path):
    folder = tree / "alpha" / "train" / "good"
    (folder / "xyz" / "001.tiff").unlink()
    with pytest.raises(MissingFileError, match=r"rgb[/\\]001\.png.*no xyz partner"):
        list_samples(tree, "alpha", "train")
    write_xyz(folder / "xyz" / "001.tiff", cloud())
    write_xyz(folder / "xyz" / "007.tiff", cloud())
    with pytest.raises(MissingFileError, match=r"007\.tiff.*no rgb partner"):
        list_samples(tree, "alpha", "train")


def test_defect_without_mask_is_an_error(tree: Path):
    (tree / "alpha" / "test" / "hole" / "gt" / "000.png").unlink()
    with pytest.raises(MissingFileError, match="no mask"):
        list_samples(tree, "alpha", "test")


# --- xyz -----------------------------------------------------------------------------------------------


def test_read_xyz_truncated_and_not_tiff(tmp_path: Path):
    good = write_xyz(tmp_path / "good.tiff", cloud())
    truncated = tmp_path / "truncated.tiff"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match="truncated.tiff"):
        read_xyz(truncated)
    fake = tmp_path / "fake.tiff"
    fake.write_bytes(b"this is not a TIFF file at all" * 10)
    with pytest.raises(CorruptFileError, match="fake.tiff"):
        read_xyz(fake)
    with pytest.raises(MissingFileError, match="absent.tiff: file not found"):
        read_xyz(tmp_path / "absent.tiff")


@pytest.mark.parametrize(
    "array",
    [
        np.ones((H, W, 4), np.float32),
        np.ones((H, W), np.float32),
        np.ones((H, W, 3), np.int32),
        np.ones((H, W, 3), np.uint16),
    ],
    ids=["4-channels", "2-d", "int32", "uint16"],
)
def test_read_xyz_wrong_shape_or_dtype(tmp_path: Path, array: np.ndarray):
    path = write_xyz(tmp_path / "bad.tiff", array)
    with pytest.raises(ShapeError, match="bad.tiff"):
        read_xyz(path)


@pytest.mark.parametrize("fill", [0.0, np.nan, np.inf, -np.inf], ids=["zero", "nan", "inf", "-inf"])
def test_read_xyz_rejects_clouds_without_valid_points(tmp_path: Path, fill: float):
    path = write_xyz(tmp_path / "empty.tiff", np.full((H, W, 3), fill, np.float32))
    with pytest.raises(InvalidCloudError, match="empty.tiff"):
        read_xyz(path)


def test_read_xyz_scattered_nan_inf_become_missing_and_float64_is_cast(tmp_path: Path):
    xyz = cloud().astype(np.float64)
    xyz[3, 4, 0] = np.nan
    xyz[7, 8, 2] = np.inf
    out = read_xyz(write_xyz(tmp_path / "holes.tiff", xyz))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert (out[3, 4] == 0).all() and (out[7, 8] == 0).all()
    assert (out != 0).all(-1).sum() == H * W - 2


# --- rgb and gt -----------------------------------------------------------------------------------------


def write_png16_rgb(path: Path, rgb_u16: np.ndarray) -> None:
    """A 48-bit RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = rgb_u16.shape
    rows = b"".join(b"\x00" + rgb_u16[r].astype(">u2").tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    png = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)


def test_read_rgb_conversions(tmp_path: Path):
    v8 = np.random.default_rng(0).integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(v8).save(tmp_path / "grey.png")
    assert np.array_equal(read_rgb(tmp_path / "grey.png"), np.repeat(v8[..., None], 3, axis=2))
    rgba = np.dstack([v8, 255 - v8, v8 // 2, np.full_like(v8, 9)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert np.array_equal(read_rgb(tmp_path / "rgba.png"), rgba[..., :3])
    Image.fromarray(v8.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    grey16 = read_rgb(tmp_path / "grey16.png")
    assert grey16.dtype == np.uint8 and np.array_equal(grey16, np.repeat(v8[..., None], 3, axis=2))
    rgb8 = np.dstack([v8, 255 - v8, v8 // 3])
    write_png16_rgb(tmp_path / "rgb16.png", rgb8.astype(np.uint16) * 257)
    assert np.array_equal(read_rgb(tmp_path / "rgb16.png"), rgb8)


def test_read_rgb_broken_files(tmp_path: Path):
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_bytes(b"hello")
    for name in ("cut.png", "text.png"):
        with pytest.raises(CorruptFileError, match=name):
            read_rgb(tmp_path / name)
    with pytest.raises(MissingFileError, match="absent.png: file not found"):
        read_rgb(tmp_path / "absent.png")


def test_read_gt_modes(tmp_path: Path):
    ids = np.zeros((H, W), np.uint8)
    ids[2:5, 2:5], ids[10:12, 10:12] = 253, 254
    Image.fromarray(np.dstack([ids] * 3)).save(tmp_path / "rgb_gt.png")
    assert np.array_equal(read_gt(tmp_path / "rgb_gt.png"), ids)
    palette = Image.fromarray(ids).convert("P")
    palette.save(tmp_path / "p_gt.png")
    assert set(np.unique(read_gt(tmp_path / "p_gt.png"))) == set(np.unique(np.asarray(palette)))
    Image.fromarray(np.dstack([ids, ids // 2, ids])).save(tmp_path / "colour.png")
    with pytest.raises(ShapeError, match="colour.png"):
        read_gt(tmp_path / "colour.png")


# --- scans ----------------------------------------------------------------------------------------------


def test_load_scan_size_mismatch_names_both_files(tree: Path):
    ref = list_samples(tree, "alpha", "train")[0]
    write_xyz(ref.xyz_path, cloud(h=H + 2))
    with pytest.raises(ShapeError, match=r"size \(32, 40\) differs from rgb") as info:
        load_scan(ref)
    assert str(ref.xyz_path) in str(info.value) and str(ref.rgb_path) in str(info.value)


def test_iter_scans_batches_and_skips_bad_files(tree: Path):
    refs = list_samples(tree, "alpha", "test")
    assert [len(b) for b in iter_scans(refs, batch_size=2)] == [2, 2, 1]
    refs[1].xyz_path.write_bytes(b"garbage")
    write_xyz(refs[3].xyz_path, np.zeros((H, W, 3), np.float32))
    with pytest.raises(CorruptFileError, match="001.tiff: unreadable TIFF"):
        list(iter_scans(refs))
    errors: list[tuple[str, InputError]] = []
    batches = list(iter_scans(refs, batch_size=2, on_error=lambda r, e: errors.append((r.sample_id, e))))
    assert [[ref.sample_id for ref, _ in b] for b in batches] == [
        ["alpha/test/good/000", "alpha/test/crack/000"],
        ["alpha/test/hole/000"],
    ]
    assert [(sid, type(e)) for sid, e in errors] == [
        ("alpha/test/good/001", CorruptFileError),
        ("alpha/test/crack/001", InvalidCloudError),
    ]
    with pytest.raises(ConfigError, match="batch_size must be >= 1, got 0"):
        next(iter_scans(refs, batch_size=0))


def test_class_modalities_tell_rgb_only_classes_and_refuse_a_mixed_one(tree: Path) -> None:
    assert class_modalities(tree, "alpha") == RGB_XYZ and xyz_coverage(tree, "alpha") == (10, 10)
    assert class_modalities(tree, "beta") == RGB_ONLY and xyz_coverage(tree, "beta") == (0, 4)
    write_sample(tree / "alpha" / "test" / "scratch", "000", seed=70, xyz=False, gt_id=253)
    assert xyz_coverage(tree, "alpha") == (10, 11)
    with pytest.raises(
        MissingFileError,
        match=r"mixes scans with xyz \(10, e\.g\. alpha/train/good/000\) and without "
        r"\(1, e\.g\. alpha/test/scratch/000\)",
    ):
        class_modalities(tree, "alpha")
    table = format_summary(dataset_summary(tree), {"alpha": "rgb+xyz", "beta": "RGB-only"})
    assert table.splitlines()[0].split()[-1] == "data" and table.splitlines()[3].split()[-1] == "RGB-only"


# --- exact messages, values and the summary table (issue 16: mutation survivors) --------------------------


def exactly(path: Path | str, message: str) -> str:
    """An anchored `match=` for the whole text a user reads: "<path>: <message>"."""
    return "^" + re.escape(f"{path}: {message}") + "$"


def test_format_summary_is_the_whole_table(tree: Path):
    expected = (
        "class  train  validation  test good  test defective  defect types\n"
        "-----  -----  ----------  ---------  --------------  ---------------\n"
        "alpha  3      2           2          3               crack 2, hole 1\n"
        "beta   2      0           1          1               crack 1\n"
        "total  5      2           3          4"
    )
    assert format_summary(dataset_summary(tree)) == expected
    with_kinds = (
        "class  train  validation  test good  test defective  defect types     data\n"
        "-----  -----  ----------  ---------  --------------  ---------------  -------\n"
        "alpha  3      2           2          3               crack 2, hole 1  rgb+xyz\n"
        "beta   2      0           1          1               crack 1          ?\n"
        "total  5      2           3          4"
    )
    assert format_summary(dataset_summary(tree), {"alpha": "rgb+xyz"}) == with_kinds


def test_format_summary_of_a_class_without_defects_or_test_split():
    summary = {"gamma": {"train": {"good": 12}}, "delta": {"test": {"good": 1, "dent": 10}}}
    assert format_summary(summary).splitlines() == [
        "class  train  validation  test good  test defective  defect types",
        "-----  -----  ----------  ---------  --------------  ------------",
        "gamma  12     0           0          0               -",
        "delta  0      0           1          10              dent 10",
        "total  12     0           1          10",
    ]


def test_discover_classes_takes_a_train_or_a_test_folder_and_names_a_missing_root(tmp_path: Path):
    for name, sub in (("only_train", "train"), ("only_test", "test"), ("only_validation", "validation")):
        (tmp_path / name / sub).mkdir(parents=True)
    (tmp_path / "file_named_train").mkdir()
    (tmp_path / "file_named_train" / "train").write_text("not a folder")
    (tmp_path / "train").mkdir()  # a split folder at the root is no class
    assert discover_classes(tmp_path) == ["only_test", "only_train"]
    assert discover_classes(str(tmp_path)) == ["only_test", "only_train"]
    missing = tmp_path / "nowhere"
    with pytest.raises(MissingFileError, match=exactly(missing, "dataset root is not a folder")) as info:
        discover_classes(missing)
    assert info.value.path == str(missing)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(MissingFileError, match=exactly(tmp_path / "a_file", "dataset root is not a folder")):
        discover_classes(tmp_path / "a_file")


def test_list_samples_messages_are_complete(tree: Path):
    with pytest.raises(ConfigError, match=r"^unknown split 'val'; known: train, validation, test$"):
        list_samples(tree, "alpha", "val")
    gamma = tree / "gamma"
    with pytest.raises(MissingFileError, match=exactly(gamma, "no class folder 'gamma'")) as info:
        list_samples(str(tree), "gamma", "train")
    assert info.value.path == str(gamma)
    folder = tree / "alpha" / "train" / "good"
    (folder / "xyz" / "001.tiff").unlink()
    with pytest.raises(
        MissingFileError,
        match=exactly(folder / "rgb" / "001.png", f"rgb file has no xyz partner in {folder / 'xyz'}"),
    ):
        list_samples(tree, "alpha", "train")
    (folder / "xyz" / "001.tiff").mkdir()  # a folder with a tiff name is no file
    with pytest.raises(MissingFileError, match=r"001\.png: rgb file has no xyz partner"):
        list_samples(tree, "alpha", "train")
    (folder / "xyz" / "001.tiff").rmdir()
    write_xyz(folder / "xyz" / "001.TIF", cloud())  # suffix case and the short suffix are accepted
    assert [r.xyz_path.name for r in list_samples(tree, "alpha", "train")] == [
        "000.tiff",
        "001.TIF",
        "002.tiff",
    ]
    write_xyz(folder / "xyz" / "007.tiff", cloud())
    with pytest.raises(
        MissingFileError,
        match=exactly(folder / "xyz" / "007.tiff", f"xyz file has no rgb partner in {folder / 'rgb'}"),
    ):
        list_samples(tree, "alpha", "train")
    hole = tree / "alpha" / "test" / "hole"
    (hole / "gt" / "000.png").unlink()
    with pytest.raises(
        MissingFileError,
        match=exactly(hole / "rgb" / "000.png", f"defective sample has no mask in {hole / 'gt'}"),
    ):
        list_samples(tree, "alpha", "test")
    (hole / "gt").rmdir()
    with pytest.raises(MissingFileError, match=r"hole[/\\]rgb[/\\]000\.png: defective sample has no mask"):
        list_samples(tree, "alpha", "test")


def test_sample_refs_carry_every_field(tree: Path):
    (tree / "alpha" / "train" / "good" / "rgb" / "notes.txt").write_text("ignored")
    (tree / "alpha" / "train" / "good" / "rgb" / "sub.png").mkdir()  # a folder, not an image
    (tree / "alpha" / "test" / "stray_file").write_text("not a defect folder")
    refs = list_samples(tree, "alpha", "train")
    assert [r.stem for r in refs] == ["000", "001", "002"]
    ref = refs[1]
    good = tree / "alpha" / "train" / "good"
    assert (ref.root, ref.class_name, ref.split, ref.defect_type, ref.stem) == (
        tree,
        "alpha",
        "train",
        "good",
        "001",
    )
    assert (ref.rgb_path, ref.xyz_path, ref.gt_path) == (
        good / "rgb" / "001.png",
        good / "xyz" / "001.tiff",
        None,
    )
    assert ref.label == 0 and ref.sample_id == "alpha/train/good/001"
    test = list_samples(tree, "alpha", "test")
    assert [r.defect_type for r in test] == ["good", "good", "crack", "crack", "hole"]
    crack = tree / "alpha" / "test" / "crack"
    assert test[3].gt_path == crack / "gt" / "001.png" and test[3].sample_id == "alpha/test/crack/001"
    # A good test sample with a mask keeps it; a train sample may have one too.
    write_sample(tree / "alpha" / "test" / "good", "002", seed=80, gt_id=0)
    assert (
        list_samples(tree, "alpha", "test")[2].gt_path == tree / "alpha" / "test" / "good" / "gt" / "002.png"
    )


def test_class_meta_files_and_their_errors(tree: Path):
    meta = read_class_meta(str(tree), "alpha")
    assert meta.name == "alpha" and meta.class_ids == {"0": "good", "253": "crack", "254": "hole"}
    assert read_class_meta(tree, "beta") == type(meta)("beta", None, None)
    ids = tree / "beta" / "class_ids.json"
    ids.write_text("{not json")
    with pytest.raises(
        CorruptFileError, match="^" + re.escape(f"{ids}: unreadable JSON (Expecting property")
    ):
        read_class_meta(tree, "beta")
    ids.write_text("[1, 2]")
    with pytest.raises(CorruptFileError, match=exactly(ids, "expected a JSON object, got list")) as info:
        read_class_meta(tree, "beta")
    assert info.value.path == str(ids)
    ids.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(CorruptFileError, match="^" + re.escape(f"{ids}: unreadable JSON ('utf-8' codec")):
        read_class_meta(tree, "beta")
    ids.write_text(json.dumps({"1": "dent"}), encoding="utf-8")
    assert read_class_meta(tree, "beta").class_ids == {"1": "dent"}
    ids.unlink()
    ids.mkdir()  # a folder of that name is no file
    assert read_class_meta(tree, "beta").class_ids is None


def test_read_xyz_messages_are_complete(tmp_path: Path):
    fake = tmp_path / "fake.tiff"
    fake.write_bytes(b"this is not a TIFF file at all" * 10)
    with pytest.raises(
        CorruptFileError, match="^" + re.escape(f"{fake}: unreadable TIFF (TiffFileError: ")
    ) as info:
        read_xyz(str(fake))
    assert info.value.path == str(fake)
    absent = tmp_path / "absent.tiff"
    with pytest.raises(MissingFileError, match=exactly(absent, "file not found")) as info:
        read_xyz(absent)
    assert info.value.path == str(absent)
    (tmp_path / "folder.tiff").mkdir()
    with pytest.raises(MissingFileError, match=exactly(tmp_path / "folder.tiff", "file not found")):
        read_xyz(tmp_path / "folder.tiff")
    with pytest.warns(UserWarning, match="writing zero-size array"):
        empty = write_xyz(tmp_path / "empty.tiff", np.zeros((0, 4, 3), np.float32))
    with pytest.raises(CorruptFileError, match=exactly(empty, "TIFF holds no image data")) as info:
        read_xyz(empty)
    assert info.value.path == str(empty)
    four = write_xyz(tmp_path / "four.tiff", np.ones((H, W, 4), np.float32))
    with pytest.raises(
        ShapeError, match=exactly(four, f"expected an (H, W, 3) xyz image, got shape {(H, W, 4)}")
    ):
        read_xyz(four)
    flat = write_xyz(tmp_path / "flat.tiff", np.ones((H, W), np.float32))
    with pytest.raises(
        ShapeError, match=exactly(flat, f"expected an (H, W, 3) xyz image, got shape {(H, W)}")
    ):
        read_xyz(flat)
    ints = write_xyz(tmp_path / "ints.tiff", np.ones((H, W, 3), np.int32))
    with pytest.raises(
        ShapeError, match=exactly(ints, "expected float xyz in metres, got dtype int32")
    ) as info:
        read_xyz(ints)
    assert info.value.path == str(ints)
    zeros = write_xyz(tmp_path / "zeros.tiff", np.zeros((H, W, 3), np.float32))
    with pytest.raises(
        InvalidCloudError, match=exactly(zeros, "point cloud has no valid (finite, non-zero) point")
    ):
        read_xyz(zeros)


def test_read_xyz_keeps_float32_values_and_casts_float16(tmp_path: Path):
    xyz = cloud(3)
    out = read_xyz(str(write_xyz(tmp_path / "f32.tiff", xyz)))
    assert out.dtype == np.float32 and out.shape == (H, W, 3) and np.array_equal(out, xyz)
    half = xyz.astype(np.float16)
    out16 = read_xyz(write_xyz(tmp_path / "f16.tiff", half))
    assert out16.dtype == np.float32 and np.array_equal(out16, half.astype(np.float32))


def test_read_rgb_integer_modes_and_messages(tmp_path: Path):
    v16 = np.array([[0, 255, 256, 511], [32767, 65280, 65534, 65535]], np.uint16)
    Image.fromarray(v16).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as img:
        assert img.mode.startswith("I")
    out = read_rgb(str(tmp_path / "grey16.png"))
    expected = np.array([[0, 0, 1, 1], [127, 255, 255, 255]], np.uint8)
    assert out.dtype == np.uint8 and out.shape == (2, 4, 3)
    assert np.array_equal(out, np.repeat(expected[..., None], 3, axis=2))
    tifffile.imwrite(tmp_path / "grey16be.tiff", v16.astype(">u2"), byteorder=">")  # Pillow mode I;16B
    with Image.open(tmp_path / "grey16be.tiff") as img:
        assert img.mode == "I;16B"
    assert np.array_equal(read_rgb(tmp_path / "grey16be.tiff"), np.repeat(expected[..., None], 3, axis=2))
    i32 = Image.fromarray(np.array([[-5, 0, 70000, 513]], np.int32), mode="I")
    i32.save(tmp_path / "i32.tiff")
    with Image.open(tmp_path / "i32.tiff") as img:
        assert img.mode == "I"
    assert np.array_equal(read_rgb(tmp_path / "i32.tiff")[..., 0], [[0, 0, 255, 2]])
    assert np.array_equal(read_rgb(tmp_path / "i32.tiff")[..., 2], [[0, 0, 255, 2]])
    Image.fromarray(np.ones((H, W), np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(
        ShapeError, match=exactly(tmp_path / "float.tiff", "floating-point image is not an RGB picture")
    ) as info:
        read_rgb(tmp_path / "float.tiff")
    assert info.value.path == str(tmp_path / "float.tiff")
    (tmp_path / "text.png").write_bytes(b"hello")
    with pytest.raises(
        CorruptFileError,
        match="^"
        + re.escape(f"{tmp_path / 'text.png'}: unreadable image (UnidentifiedImageError: cannot identify"),
    ) as info:
        read_rgb(tmp_path / "text.png")
    assert info.value.path == str(tmp_path / "text.png")
    absent = tmp_path / "absent.png"
    with pytest.raises(MissingFileError, match=exactly(absent, "file not found")) as info:
        read_rgb(absent)
    assert info.value.path == str(absent)
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(MissingFileError, match=exactly(tmp_path / "folder.png", "file not found")):
        read_gt(tmp_path / "folder.png")


def test_read_gt_values_modes_and_messages(tmp_path: Path):
    ids = np.zeros((H, W), np.uint8)
    ids[2:5, 2:5], ids[10:12, 10:12] = 253, 254
    palette = Image.fromarray(ids).convert("P")
    palette.save(tmp_path / "p_gt.png")
    out = read_gt(str(tmp_path / "p_gt.png"))
    assert out.dtype == np.uint8 and np.array_equal(out, np.asarray(palette))
    Image.fromarray(np.dstack([ids, np.full_like(ids, 255)]), mode="LA").save(tmp_path / "la.png")
    assert np.array_equal(read_gt(tmp_path / "la.png"), ids)  # the alpha channel is no id
    Image.fromarray(np.dstack([ids, ids, ids, np.full_like(ids, 7)])).save(tmp_path / "rgba.png")
    assert np.array_equal(read_gt(tmp_path / "rgba.png"), ids)
    colour = np.dstack([ids, ids, ids // 2])  # only the last channel differs
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(
        ShapeError,
        match=exactly(tmp_path / "colour.png", "colour mask: channels differ, cannot read defect ids"),
    ) as info:
        read_gt(tmp_path / "colour.png")
    assert info.value.path == str(tmp_path / "colour.png")
    wide = np.zeros((H, W), np.uint16)
    wide[1, 1], wide[2, 2] = 255, 1
    Image.fromarray(wide).save(tmp_path / "wide_ok.png")
    out = read_gt(tmp_path / "wide_ok.png")
    assert out.dtype == np.uint8 and out[1, 1] == 255 and out[2, 2] == 1 and out.sum() == 256
    wide[3, 3] = 300
    Image.fromarray(wide).save(tmp_path / "wide.png")
    with pytest.raises(
        ShapeError, match=exactly(tmp_path / "wide.png", "mask ids must fit in uint8, got range [0, 300]")
    ) as info:
        read_gt(tmp_path / "wide.png")
    assert info.value.path == str(tmp_path / "wide.png")
    Image.fromarray(np.array([[-1, 0, 2]], np.int32), mode="I").save(tmp_path / "negative.tiff")
    with pytest.raises(
        ShapeError, match=exactly(tmp_path / "negative.tiff", "mask ids must fit in uint8, got range [-1, 2]")
    ):
        read_gt(tmp_path / "negative.tiff")
    Image.fromarray(np.array([[256, 1, 2]], np.int32), mode="I").save(tmp_path / "over.tiff")
    with pytest.raises(ShapeError, match=r"got range \[1, 256\]$"):
        read_gt(tmp_path / "over.tiff")
    Image.fromarray(np.array([[255, 0, 2]], np.int32), mode="I").save(tmp_path / "edge.tiff")
    assert np.array_equal(read_gt(tmp_path / "edge.tiff"), np.array([[255, 0, 2]], np.uint8))


def test_load_scan_fields_and_size_messages(tree: Path):
    hole = list_samples(tree, "alpha", "test")[4]
    scan = load_scan(hole)
    with Image.open(hole.rgb_path) as img:
        rgb = np.asarray(img)
    assert np.array_equal(scan.rgb_hwc_u8, rgb) and scan.source == str(hole.xyz_path)
    expected_gt = np.zeros((H, W), np.uint8)
    expected_gt[5:10, 5:12] = 254
    assert np.array_equal(scan.gt_ids_hw, expected_gt)
    good = list_samples(tree, "alpha", "train")[0]
    assert load_scan(good).gt_ids_hw is None
    rgb_only = list_samples(tree, "beta", "train")[0]
    assert load_scan(rgb_only).source == str(rgb_only.rgb_path)
    write_xyz(good.xyz_path, cloud(h=H + 2))
    rgb_path = good.rgb_path
    with pytest.raises(
        ShapeError, match=exactly(good.xyz_path, f"size (32, 40) differs from rgb {rgb_path} size (30, 40)")
    ) as info:
        load_scan(good)
    assert info.value.path == str(good.xyz_path)
    Image.fromarray(np.zeros((H, W + 1), np.uint8)).save(hole.gt_path)
    with pytest.raises(
        ShapeError,
        match=exactly(hole.gt_path, f"size (30, 41) differs from rgb {hole.rgb_path} size (30, 40)"),
    ) as info:
        load_scan(hole)
    assert info.value.path == str(hole.gt_path)


def test_iter_scans_default_batch_and_the_error_passed_on(tree: Path):
    refs = [ref for split in ("train", "validation", "test") for ref in list_samples(tree, "alpha", split)]
    batches = list(iter_scans(refs))
    assert [len(b) for b in batches] == [8, 2]  # the default batch is 8
    assert [len(b) for b in iter_scans(refs, batch_size=1)] == [1] * 10
    assert [ref for batch in batches for ref, _ in batch] == refs
    assert np.array_equal(batches[0][7][1].xyz_hwc_m, cloud(30))
    refs[0].xyz_path.write_bytes(b"garbage")
    seen: list[tuple[SampleRef, InputError]] = []
    batches = list(iter_scans(refs, batch_size=9, on_error=lambda r, e: seen.append((r, e))))
    assert [len(b) for b in batches] == [9]
    assert [r for r, _ in seen] == [refs[0]] and seen[0][1].path == str(refs[0].xyz_path)
    with pytest.raises(ConfigError, match=r"^batch_size must be >= 1, got -1$"):
        next(iter_scans(refs, batch_size=-1))
    assert list(iter_scans([], batch_size=1)) == []


def test_class_modalities_message_and_path(tree: Path):
    write_sample(tree / "alpha" / "test" / "scratch", "000", seed=70, xyz=False, gt_id=253)
    scratch = tree / "alpha" / "test" / "scratch"
    with pytest.raises(
        MissingFileError,
        match=exactly(
            scratch,
            "class 'alpha' mixes scans with xyz (10, e.g. alpha/train/good/000) and without (1, e.g. "
            "alpha/test/scratch/000); supply the missing xyz/ files, or remove every xyz/ folder of the "
            "class to train an RGB-only model",
        ),
    ) as info:
        class_modalities(str(tree), "alpha")
    assert info.value.path == str(scratch)
    assert xyz_coverage(str(tree), "alpha") == (10, 11)
    assert class_modalities(tree, "beta") == ("rgb",) and RGB_XYZ == ("rgb", "point")
