"""A corrupt-data set (`m3dm synth --corrupt`): every bad input the reader knows, mixed with good scans.

<out>/<class>/test/good/{rgb,xyz}/NNN.{png,tiff}, one folder of rgb/xyz pairs as a station replays it, and
<out>/expected.json listing each sample with the case it exercises, the typed error (`core.errors`) it must
raise when read and prepared the station's way (`core.mvtec3d.load_scan` then `core.preprocess.
prepare_scan`), and the file that error must name. Good scans have error None. Deterministic per seed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from core.errors import ConfigError
from trainer.synth.camera import camera_for_size, pixel_rays
from trainer.synth.render import RenderedScan, render_sample
from trainer.synth.shapes import CLASS_NAMES
from trainer.synth.writer import sample_seed

EXPECTED_NAME = "expected.json"


@dataclass(frozen=True)
class Case:
    """One kind of bad sample: the error class it must raise and which file of the pair is at fault."""

    error: str  # class name in core.errors
    at_fault: str  # "rgb" or "xyz": the file the error must name
    why: str


# Every error path of core.mvtec3d.read_rgb / read_xyz / load_scan and core.preprocess.prepare_scan.
CASES: dict[str, Case] = {
    "truncated_tiff": Case("CorruptFileError", "xyz", "xyz TIFF cut to half its bytes (interrupted write)"),
    "garbage_tiff": Case("CorruptFileError", "xyz", "xyz file that is not a TIFF at all"),
    "wrong_dtype_tiff": Case("ShapeError", "xyz", "xyz TIFF of uint16 millimetres instead of float metres"),
    "wrong_shape_tiff": Case("ShapeError", "xyz", "depth-only (H, W) TIFF instead of (H, W, 3)"),
    "nan_cloud": Case("InvalidCloudError", "xyz", "every coordinate NaN"),
    "zero_cloud": Case("InvalidCloudError", "xyz", "every point (0, 0, 0): sensor saw nothing"),
    "plane_only": Case(
        "EmptyCloudError", "xyz", "empty tray: only support-plane points, none left after removal"
    ),
    "size_mismatch": Case("ShapeError", "xyz", "rgb 16 px smaller than xyz in both directions"),
    "unreadable_png": Case("CorruptFileError", "rgb", "rgb PNG cut to a third of its bytes"),
    "missing_xyz": Case("MissingFileError", "rgb", "rgb without its xyz partner"),
    "missing_rgb": Case("MissingFileError", "xyz", "xyz without its rgb partner"),
}


def _plane_only(scan: RenderedScan) -> np.ndarray:
    """The scan's xyz with every object pixel moved onto the support plane along its camera ray."""
    h, w = scan.xyz_hwc_m.shape[:2]
    rays = pixel_rays(camera_for_size(w, h))
    normal, offset = scan.plane[:3], scan.plane[3]
    depth = -offset / (rays @ normal)  # n . (t ray) + d = 0
    xyz = scan.xyz_hwc_m.copy()
    on_object = scan.object_mask_hw
    xyz[on_object] = (depth[..., None] * rays)[on_object].astype(np.float32)
    return xyz


def _write_png(path: Path, rgb_hwc_u8: np.ndarray) -> None:
    Image.fromarray(rgb_hwc_u8, mode="RGB").save(path, format="PNG")


def _truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: max(16, int(len(data) * fraction))])


def _write_case(case: str, scan: RenderedScan, rgb_path: Path, xyz_path: Path) -> None:  # noqa: C901
    """Write one sample's files as `case` ("good" or a CASES key) corrupts them."""
    rgb, xyz = scan.rgb_hwc_u8, scan.xyz_hwc_m
    if case == "size_mismatch":
        rgb = np.ascontiguousarray(rgb[8:-8, 8:-8])
    elif case == "plane_only":
        xyz = _plane_only(scan)
    elif case == "nan_cloud":
        xyz = np.full_like(xyz, np.nan)
    elif case == "zero_cloud":
        xyz = np.zeros_like(xyz)
    elif case == "wrong_dtype_tiff":
        xyz = np.clip(xyz * 1000.0, 0, 65535).astype(np.uint16)
    elif case == "wrong_shape_tiff":
        xyz = np.ascontiguousarray(xyz[..., 2])
    if case != "missing_rgb":
        _write_png(rgb_path, rgb)
    if case == "garbage_tiff":
        xyz_path.write_bytes(b"this is not a TIFF file\n" * 64)
    elif case != "missing_xyz":
        tifffile.imwrite(xyz_path, xyz)
    if case == "truncated_tiff":
        _truncate(xyz_path, 0.5)
    elif case == "unreadable_png":
        _truncate(rgb_path, 1 / 3)


def plan_cases(n_good: int) -> list[str]:
    """Sample order: good scans spread evenly among the bad cases (one of each), good first and last."""
    bad = list(CASES)
    if n_good < 2:
        raise ConfigError("a corrupt set needs at least 2 good scans (one before and one after the bad ones)")
    order: list[str] = []
    slots = n_good - 1  # gaps between good scans
    per_gap = [len(bad) // slots + (1 if i < len(bad) % slots else 0) for i in range(slots)]
    it = iter(bad)
    for gap in per_gap:
        order.append("good")
        order += [next(it) for _ in range(gap)]
    order.append("good")
    return order


def write_corrupt_set(
    out_dir: Path,
    class_name: str = CLASS_NAMES[0],
    seed: int = 0,
    size_px: int = 224,
    n_good: int = 4,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write the corrupt set under `out_dir` and return the parsed expected.json.

    expected.json: {"class", "folder" (the rgb/xyz pair folder, relative to out_dir), "cases": [{"stem",
    "case", "error" (core.errors class name or None), "file" (relative path the error must name or None),
    "partner" (the absent file of a missing pair, else None), "rgb", "xyz", "why"}], "counts"}.
    """
    if class_name not in CLASS_NAMES:
        raise ConfigError(f"unknown class {class_name!r}; known: {', '.join(CLASS_NAMES)}")
    out_dir = Path(out_dir)
    class_dir = out_dir / class_name
    if class_dir.exists() and any(class_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"{class_dir} already holds data; choose another folder or overwrite")
        shutil.rmtree(class_dir)
    folder = Path(class_name) / "test" / "good"
    for kind in ("rgb", "xyz"):
        (out_dir / folder / kind).mkdir(parents=True, exist_ok=True)
    order = plan_cases(n_good)
    entries = []
    for index, case in enumerate(order):
        stem = f"{index:03d}"
        rgb_rel, xyz_rel = folder / "rgb" / f"{stem}.png", folder / "xyz" / f"{stem}.tiff"
        scan = render_sample(
            class_name, sample_seed(seed, class_name, "corrupt", case, index), None, size_px, size_px
        )
        _write_case(case, scan, out_dir / rgb_rel, out_dir / xyz_rel)
        spec = CASES.get(case)
        at_fault = None if spec is None else (rgb_rel if spec.at_fault == "rgb" else xyz_rel)
        partner = {"missing_xyz": xyz_rel, "missing_rgb": rgb_rel}.get(case)
        entries.append(
            {
                "stem": stem,
                "case": case,
                "error": None if spec is None else spec.error,
                "file": None if at_fault is None else str(at_fault),
                "partner": None if partner is None else str(partner),
                "rgb": str(rgb_rel),
                "xyz": str(xyz_rel),
                "why": "a normal scan" if spec is None else spec.why,
            }
        )
        if progress is not None:
            progress(index + 1, len(order))
    expected = {
        "class": class_name,
        "folder": str(folder),
        "seed": seed,
        "size_px": size_px,
        "cases": entries,
        "counts": {"good": order.count("good"), "bad": len(order) - order.count("good")},
    }
    (out_dir / EXPECTED_NAME).write_text(json.dumps(expected, indent=2) + "\n", encoding="utf-8")
    return expected


def read_expected(out_dir: Path) -> dict:
    """The expected.json of a corrupt set written by `write_corrupt_set`."""
    return json.loads((Path(out_dir) / EXPECTED_NAME).read_text(encoding="utf-8"))
