"""Tests of the synthetic scan generator: layout, determinism, units, masks, defect kinds, preview."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy.ndimage import binary_dilation

import trainer.synth as synth
from core.config import PreprocessConfig
from core.errors import ConfigError
from trainer.synth import CLASS_NAMES, DEFECT_TYPES, SynthConfig, defect_ids, render_sample, synthesize
from trainer.synth.camera import camera_for_size, pixel_rays

try:  # the brief names core.preprocess; the functions live in core.plane today
    from core.preprocess import fit_border_plane, remove_plane
except ImportError:
    from core.plane import fit_border_plane, remove_plane

SMALL = {"n_train": 2, "n_validation": 1, "n_test_good": 1, "n_test_per_defect": 1}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_public_api_is_exported() -> None:
    for name in synth.__all__:
        assert hasattr(synth, name), name
    assert len(CLASS_NAMES) >= 3 and set(DEFECT_TYPES) == set(CLASS_NAMES)
    for defects in DEFECT_TYPES.values():
        assert {"geometry", "colour", "both"} <= set(defects.values())


def test_layout_counts_and_metadata(tmp_path: Path) -> None:
    cfg = SynthConfig(seed=3, classes=("ring", "peg"), width_px=96, height_px=64, workers=1, **SMALL)
    summary = synthesize(tmp_path, cfg)
    assert summary["samples"] == 2 * (2 + 1 + 1 + 4)
    for class_name in cfg.classes:
        class_dir = tmp_path / class_name
        ids = json.loads((class_dir / "class_ids.json").read_text())
        assert ids == defect_ids(class_name) and set(ids) == set(DEFECT_TYPES[class_name])
        assert len(set(ids.values())) == len(ids) and min(ids.values()) >= 128 and max(ids.values()) == 255
        camera = json.loads((class_dir / "calibration" / "camera_parameters.json").read_text())
        assert (camera["image_width"], camera["image_height"]) == (96, 64)
        expected = {"train/good": 2, "validation/good": 1, "test/good": 1}
        expected |= {f"test/{d}": 1 for d in DEFECT_TYPES[class_name]}
        for folder, count in expected.items():
            kinds = ("rgb", "xyz", "gt") if folder.startswith("test") else ("rgb", "xyz")
            assert sorted(p.name for p in (class_dir / folder).iterdir()) == sorted(kinds)
            stems = [f"{i:03d}" for i in range(count)]
            assert [p.stem for p in sorted((class_dir / folder / "rgb").iterdir())] == stems
            assert [p.name for p in sorted((class_dir / folder / "xyz").iterdir())] == [
                f"{s}.tiff" for s in stems
            ]
        assert summary["counts"][class_name]["test"] == {
            k.split("/")[1]: v for k, v in expected.items() if "test" in k
        }
        rgb = np.asarray(Image.open(class_dir / "test/good/rgb/000.png"))
        xyz = tifffile.imread(class_dir / "test/good/xyz/000.tiff")
        gt = np.asarray(Image.open(class_dir / "test/good/gt/000.png"))
        assert rgb.shape == (64, 96, 3) and rgb.dtype == np.uint8
        assert xyz.shape == (64, 96, 3) and xyz.dtype == np.float32
        assert gt.shape == (64, 96) and gt.dtype == np.uint8 and not gt.any()


def test_same_seed_same_bytes_across_worker_counts(tmp_path: Path) -> None:
    counts = {"n_train": 10, "n_validation": 2, "n_test_good": 2, "n_test_per_defect": 1}  # 18 jobs: pooled
    base = SynthConfig(seed=7, classes=("gland",), width_px=64, height_px=64, workers=1, **counts)
    synthesize(tmp_path / "a", base)
    synthesize(tmp_path / "b", SynthConfig(**{**base.__dict__, "workers": 2}))
    synthesize(tmp_path / "c", SynthConfig(**{**base.__dict__, "seed": 8}))
    first, second, other = (_files(tmp_path / n) for n in "abc")
    assert first == second
    assert first.keys() == other.keys()
    differing = [k for k in first if k.endswith(".tiff") and first[k] != other[k]]
    assert len(differing) == 18


def test_existing_data_is_not_overwritten_silently(tmp_path: Path) -> None:
    cfg = SynthConfig(classes=("peg",), width_px=48, height_px=48, workers=1, **SMALL)
    synthesize(tmp_path, cfg)
    with pytest.raises(ConfigError, match="already holds data"):
        synthesize(tmp_path, cfg)
    assert synthesize(tmp_path, cfg, overwrite=True)["samples"] == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": ("bagel",)}, r"classes must be distinct names from .*; got \('bagel',\)"),
        ({"width_px": 8}, r"image sides must lie in \[32, 2048\] px, got 8"),
        ({"n_train": 0}, "n_train >= 1"),
        ({"workers": 0}, "workers must be >= 1"),
        ({"classes": ("ring", "ring")}, r"classes must be distinct names .*; got \('ring', 'ring'\)"),
    ],
)
def test_bad_config_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SynthConfig(**kwargs)


def test_render_rejects_unknown_names() -> None:
    with pytest.raises(ConfigError, match="unknown synthetic class 'bagel'"):
        render_sample("bagel", 0)
    with pytest.raises(ConfigError, match="class 'ring' has no defect 'hole'"):
        render_sample("ring", 0, "hole")  # a defect of another class


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_xyz_is_a_pinhole_back_projection_in_metres(class_name: str) -> None:
    scan = render_sample(class_name, 11, None, 128, 96)
    xyz = scan.xyz_hwc_m
    assert xyz.dtype == np.float32 and xyz.shape == (96, 128, 3)
    valid = np.all(xyz != 0, axis=-1)
    assert np.array_equal(valid, np.any(xyz != 0, axis=-1))  # missing points are exactly (0, 0, 0)
    assert 0.002 < 1 - valid.mean() < 0.15
    z = xyz[..., 2][valid]
    assert z.min() > 0.25 and z.max() < 0.6
    rays = pixel_rays(camera_for_size(128, 96))
    np.testing.assert_allclose(xyz[valid][:, :2] / z[:, None], rays[valid][:, :2], rtol=0, atol=1e-6)
    # Plane pixels lie on the reported plane within the sensor noise; the object stands >= 5 mm above it.
    distance_m = xyz[valid] @ scan.plane[:3] + scan.plane[3]
    plane_px = ~scan.object_mask_hw[valid]
    assert np.abs(np.linalg.norm(scan.plane[:3]) - 1) < 1e-9
    assert np.percentile(np.abs(distance_m[plane_px]), 99) < 1.5e-3
    assert np.percentile(distance_m[~plane_px], 5) > 5e-3
    assert 0.03 < scan.object_mask_hw.mean() < 0.5
    assert not scan.object_mask_hw[:3].any() and not scan.object_mask_hw[-3:].any()


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_defect_masks_and_kinds(class_name: str) -> None:
    good = render_sample(class_name, 5, None, 128, 128)
    assert not good.gt_ids_hw.any()
    ids = defect_ids(class_name)
    for defect, kind in DEFECT_TYPES[class_name].items():
        bad = render_sample(class_name, 5, defect, 128, 128)
        mask = bad.gt_ids_hw > 0
        assert set(np.unique(bad.gt_ids_hw)) == {0, ids[defect]}
        assert mask.any() and not (mask & ~bad.object_mask_hw).any()
        assert 0.002 < mask.sum() / bad.object_mask_hw.sum() < 0.12, defect
        assert np.array_equal(bad.object_mask_hw | mask, bad.object_mask_hw)
        _check_kind(good, bad, mask, kind, defect)


def _check_kind(good, bad, mask: np.ndarray, kind: str, defect: str) -> None:
    rgb_good, rgb_bad = good.rgb_hwc_u8.astype(float), bad.rgb_hwc_u8.astype(float)
    rgb_changed = np.any(rgb_good != rgb_bad, axis=-1)
    both_valid = np.all(good.xyz_hwc_m != 0, -1) & np.all(bad.xyz_hwc_m != 0, -1)
    xyz_changed = np.any(good.xyz_hwc_m != bad.xyz_hwc_m, axis=-1) & both_valid
    if kind == "colour":
        assert np.array_equal(good.xyz_hwc_m, bad.xyz_hwc_m), defect
        assert rgb_changed.any() and not (rgb_changed & ~mask).any(), defect
        return
    near = binary_dilation(mask, iterations=2)  # cast shadows of a changed surface may reach a pixel or two
    assert (xyz_changed & mask).sum() > 0.3 * (mask & both_valid).sum(), defect
    assert not (xyz_changed & ~near).any(), defect
    assert not (rgb_changed & ~near).any(), defect
    lit = mask & np.all(rgb_good > 40, -1) & np.all(rgb_bad > 40, -1) & both_valid
    ratio = rgb_bad[lit] / rgb_good[lit]
    hue_shift = np.median(ratio.max(-1) - ratio.min(-1))
    if kind == "geometry":  # same albedo: only the shading (a grey factor) changes
        assert hue_shift < 0.06, defect
    else:
        assert rgb_changed[mask].mean() > 0.5, defect


def test_plane_removal_keeps_object_and_removes_plane() -> None:
    cfg = PreprocessConfig()
    for seed, class_name in enumerate(CLASS_NAMES):
        scan = render_sample(class_name, seed, None, 400, 400)
        plane = fit_border_plane(scan.xyz_hwc_m, cfg, class_name)
        assert abs(plane[:3] @ scan.plane[:3]) > np.cos(np.deg2rad(1.0))
        xyz, _ = remove_plane(scan.xyz_hwc_m, scan.rgb_hwc_u8, plane, cfg)
        before, after = np.all(scan.xyz_hwc_m != 0, -1), np.all(xyz != 0, -1)
        obj = scan.object_mask_hw
        assert (after & obj).sum() >= 0.98 * (before & obj).sum(), class_name
        assert (after & ~obj).sum() <= 0.02 * (before & ~obj).sum(), class_name


def test_preview_is_written(tmp_path: Path) -> None:
    cfg = SynthConfig(classes=("ring", "biscuit", "gland"), width_px=64, height_px=64, workers=1, **SMALL)
    synthesize(tmp_path / "data", cfg)
    out = synth.write_preview(tmp_path / "data", tmp_path / "sheet" / "preview.png", per_class=2)
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[0] > 150 and image.shape[1] > 300
    assert image.std() > 20 and len(np.unique(image.reshape(-1, 3), axis=0)) > 500
