"""Tests of family B (trainer/synth_b): layout and file quirks, determinism, defect modalities and masks,
frames, independence from trainer/synth, and that the trainer's own reader and preprocessing accept it."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy.ndimage import binary_dilation
from typer.testing import CliRunner

from core.config import PreprocessConfig
from core.errors import ConfigError
from core.mvtec3d import discover_classes, list_samples, load_scan
from core.preprocess import prepare_scan
from trainer.cli import app
from trainer.synth_b import (
    CLASS_NAMES,
    DEFECT_TYPES,
    MODALITY,
    VALIDATION_DEFECTS,
    SynthBConfig,
    frames_for,
    render_scan,
    synthesize_b,
)

TINY = {"n_train": 2, "n_validation": 1, "n_test_good": 1, "n_test_per_defect": 1}
TINY_VAL = {"n_valdef_good": 1, "n_valdef_per_defect": 1}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_file_quirks_and_validation_defect_root(tmp_path: Path) -> None:
    cfg = SynthBConfig(seed=1, classes=("tread",), size_px=160, workers=1, **TINY, **TINY_VAL)
    summary = synthesize_b(tmp_path, cfg)
    defects = DEFECT_TYPES["tread"]
    assert summary["samples"] == (2 + 1 + 1 + len(defects)) + (1 + len(defects))
    # validation_defects/ is a data root of its own, never a class of the main one
    assert discover_classes(tmp_path) == ["tread"]
    assert discover_classes(tmp_path / VALIDATION_DEFECTS) == ["tread"]
    assert (
        "model selection" in json.loads((tmp_path / VALIDATION_DEFECTS / "split.json").read_text())["purpose"]
    )
    val_root = tmp_path / VALIDATION_DEFECTS / "tread"
    assert sorted(p.name for p in val_root.iterdir() if p.is_dir()) == ["calibration", "test"]
    assert sorted(p.name for p in (val_root / "test").iterdir()) == sorted(["good", *defects])
    class_dir = tmp_path / "tread"
    assert json.loads((class_dir / "class_ids.json").read_text()) == {d: i + 1 for i, d in enumerate(defects)}
    camera = json.loads((class_dir / "calibration" / "camera_parameters.json").read_text())
    assert [tuple(f) for f in camera["frames"]] == list(frames_for("tread", 160))
    for split in ("train", "validation", "test"):
        for ref in list_samples(tmp_path, "tread", split):
            with Image.open(ref.rgb_path) as rgb:
                assert rgb.mode == "RGB"  # 8-bit
            xyz = tifffile.imread(ref.xyz_path)
            assert xyz.dtype == np.float32 and xyz.ndim == 3 and xyz.shape[2] == 3
            assert (xyz == 0).all(-1).any() and (xyz[..., 2] > 0.25).any()  # zeros for missing, metres
            if split == "test":
                with Image.open(ref.gt_path) as gt_img:
                    assert gt_img.mode == "L"
                    gt = np.asarray(gt_img)
                assert set(np.unique(gt)) <= {0, 255}  # as the real masks, not ids
                assert gt.any() if ref.defect_type != "good" else not gt.any(), ref.sample_id
            scan = load_scan(ref)  # the trainer's reader takes every file
            assert (scan.rgb_hwc_u8.shape[1], scan.rgb_hwc_u8.shape[0]) in frames_for("tread", 160)


def test_same_seed_same_bytes_other_seed_other_scans(tmp_path: Path) -> None:
    cfg = SynthBConfig(seed=4, classes=("weave",), size_px=128, workers=1, **TINY, **TINY_VAL)
    synthesize_b(tmp_path / "one", cfg)
    synthesize_b(tmp_path / "two", cfg)
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")
    other = render_scan("weave", 5, None, 128).xyz_hwc_m
    assert not np.array_equal(render_scan("weave", 4, None, 128).xyz_hwc_m, other)


def test_existing_data_is_refused_without_overwrite(tmp_path: Path) -> None:
    cfg = SynthBConfig(seed=0, classes=("flange",), size_px=96, workers=1, **TINY, **TINY_VAL)
    synthesize_b(tmp_path, cfg)
    with pytest.raises(ConfigError, match="already holds data"):
        synthesize_b(tmp_path, cfg)
    synthesize_b(tmp_path, cfg, overwrite=True)


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_a_defect_changes_only_its_neighbourhood(class_name: str) -> None:
    """Random streams are split by purpose: the same seed with a defect keeps pose, shape and noise, so
    everything a few pixels away from the mask is bit-identical and the mask covers what changed."""
    good = render_scan(class_name, 11, None, 200)
    for defect in DEFECT_TYPES[class_name]:
        bad = render_scan(class_name, 11, defect, 200)
        mask = bad.gt_hw_u8 > 0
        assert mask.sum() >= 8, (class_name, defect)
        far = ~binary_dilation(mask, iterations=6)  # shading, demosaic, shadow: <= 5 px
        assert np.array_equal(good.rgb_hwc_u8[far], bad.rgb_hwc_u8[far]), (class_name, defect)
        assert np.array_equal(good.xyz_hwc_m[far], bad.xyz_hwc_m[far]), (class_name, defect)


def _changes(class_name: str, defect: str) -> tuple[float, float]:
    """(median |rgb change| in grey levels, median |depth change| mm) inside the mask, valid in both."""
    good, bad = render_scan(class_name, 7, None, 300), render_scan(class_name, 7, defect, 300)
    mask = bad.gt_hw_u8 > 0
    rgb = np.abs(good.rgb_hwc_u8.astype(int) - bad.rgb_hwc_u8.astype(int)).mean(-1)[mask]
    both = mask & (good.xyz_hwc_m[..., 2] > 0) & (bad.xyz_hwc_m[..., 2] > 0)
    depth_mm = 1e3 * np.abs(good.xyz_hwc_m[..., 2] - bad.xyz_hwc_m[..., 2])[both]
    return float(np.median(rgb)), float(np.median(depth_mm)) if both.any() else 0.0


def test_defects_show_in_the_modalities_they_claim() -> None:
    for class_name, defects in DEFECT_TYPES.items():
        for defect in defects:
            rgb_change, depth_change_mm = _changes(class_name, defect)
            modality = MODALITY[defect]
            if modality in ("geometry", "both"):
                assert depth_change_mm > 0.25, (class_name, defect, depth_change_mm)
            else:  # colour only: at most the 20 um of a scratch, within the depth noise
                assert depth_change_mm < 0.05, (class_name, defect, depth_change_mm)
            if modality in ("colour", "both"):
                assert rgb_change > 8, (class_name, defect, rgb_change)


def test_frames_are_non_square_and_vary_within_a_class() -> None:
    assert any(w != h for c in CLASS_NAMES for w, h in frames_for(c, 400))
    assert all(len(set(frames_for(c, 400))) >= 2 for c in CLASS_NAMES)
    drawn = {render_scan("sponge", seed, None, 160).rgb_hwc_u8.shape[:2] for seed in range(8)}
    assert len(drawn) >= 2 and all(h != w for h, w in drawn)


def test_plane_removal_keeps_the_object_and_the_defect() -> None:
    """The trainer's own preprocessing (border plane fit, 5 mm removal) must leave the part standing and
    the defect on it: objects stand 8-15 mm tall, the plane shows in every border strip."""
    from core.scan import RawScan

    for class_name in CLASS_NAMES:
        defect = DEFECT_TYPES[class_name][0]
        scan = render_scan(class_name, 3, defect, 300)
        raw = RawScan(
            rgb_hwc_u8=scan.rgb_hwc_u8, xyz_hwc_m=scan.xyz_hwc_m, gt_ids_hw=scan.gt_hw_u8, source="t"
        )
        prepared = prepare_scan(raw, PreprocessConfig())
        assert 0.05 < prepared.valid_hw.mean() < 0.6, class_name
        gt = prepared.gt_ids_hw > 0
        assert gt.any() and (prepared.valid_hw[gt].mean() > 0.3 or MODALITY[defect] != "geometry"), class_name


def test_unknown_names_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown family-B class"):
        render_scan("ring", 0, None)
    with pytest.raises(ConfigError, match="has no defect"):
        render_scan("tread", 0, "scratch")
    with pytest.raises(ConfigError, match="family-B classes"):
        SynthBConfig(classes=("ring",))


def test_written_independently_of_family_a() -> None:
    for path in Path("trainer/synth_b").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                )
                assert not any(n == "trainer.synth" or n.startswith("trainer.synth.") for n in names), path


def test_cli_family_b_writes_both_roots(tmp_path: Path) -> None:
    args = ["synth", "--family", "b", "--out", str(tmp_path), "--class", "sponge", "--size", "96"]
    args += ["--n-train", "2", "--n-validation", "1", "--n-test-good", "1", "--n-test-per-defect", "1"]
    result = CliRunner().invoke(app, [*args, "--val-defects", "1", "--workers", "1", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["family"] == "b" and summary["counts"]["sponge"]["validation"] == {"good": 1}
    assert summary["counts"][f"{VALIDATION_DEFECTS}/sponge"]["test"]["good"] == 6
    bad = CliRunner().invoke(app, ["synth", "--family", "c", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--family must be a or b" in bad.output
