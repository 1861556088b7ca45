"""MVTec 3D-AD reader (spec §1): discover classes and samples, read rgb / xyz / gt files into RawScans.

The first stage of the trainer path (disk -> RawScan -> core.preprocess). Lazy: listing reads no pixels,
`iter_scans` reads one batch at a time. Every unusable file raises a typed error naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from core.errors import ConfigError, CorruptFileError, InputError, MissingFileError, ShapeError
from core.preprocess import sanitize_xyz
from core.scan import RawScan

__all__ = [
    "RGB_ONLY",
    "RGB_XYZ",
    "SPLITS",
    "ClassMeta",
    "SampleRef",
    "dataset_summary",
    "class_modalities",
    "discover_classes",
    "format_summary",
    "iter_scans",
    "list_samples",
    "load_scan",
    "read_class_meta",
    "read_gt",
    "read_rgb",
    "read_xyz",
    "xyz_coverage",
]

SPLITS = ("train", "validation", "test")
_RGB_SUFFIXES = (".png",)
_XYZ_SUFFIXES = (".tiff", ".tif")
_GT_SUFFIXES = (".png",)
# What a class's files support (protocol.manifest modalities): M3DM proper, or the RGB bank alone.
RGB_XYZ = ("rgb", "point")
RGB_ONLY = ("rgb",)


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's files are. xyz_path is None for RGB-only data, gt_path None when absent."""

    root: Path
    class_name: str
    split: str
    defect_type: str
    stem: str
    rgb_path: Path
    xyz_path: Path | None
    gt_path: Path | None

    @property
    def label(self) -> int:
        """0 for good, 1 for any defect folder."""
        return 0 if self.defect_type == "good" else 1

    @property
    def sample_id(self) -> str:
        return f"{self.class_name}/{self.split}/{self.defect_type}/{self.stem}"


@dataclass(frozen=True)
class ClassMeta:
    """Per-class metadata files; None where the file is absent. M3DM itself uses neither."""

    name: str
    camera_parameters: dict[str, Any] | None
    class_ids: dict[str, Any] | None


def discover_classes(root: str | Path) -> list[str]:
    """Sorted class names: the folders of `root` holding a train/ or test/ subfolder."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError("dataset root is not a folder", root)
    return sorted(p.name for p in root.iterdir() if (p / "train").is_dir() or (p / "test").is_dir())


def list_samples(root: str | Path, class_name: str, split: str) -> list[SampleRef]:
    """All samples of one class and split, sorted: "good" first, then defect types by name, then stem.

    A split folder that does not exist gives []. Raises MissingFileError for an unknown class or for an
    rgb/xyz file without its partner, or a defective test sample without a gt mask.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    root = Path(root)
    class_dir = root / class_name
    if not class_dir.is_dir():
        raise MissingFileError(f"no class folder {class_name!r}", class_dir)
    split_dir = class_dir / split
    if not split_dir.is_dir():
        return []
    defects = sorted((p.name for p in split_dir.iterdir() if p.is_dir()), key=lambda n: (n != "good", n))
    return [ref for defect in defects for ref in _samples_in(root, class_name, split, defect)]


def _files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path] | None:
    """{stem: path} of the files with one of `suffixes`; None when the folder does not exist."""
    if not folder.is_dir():
        return None
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in suffixes and p.is_file()}


def _samples_in(root: Path, class_name: str, split: str, defect: str) -> list[SampleRef]:
    folder = root / class_name / split / defect
    rgb = _files_by_stem(folder / "rgb", _RGB_SUFFIXES) or {}
    xyz = _files_by_stem(folder / "xyz", _XYZ_SUFFIXES)
    gt = _files_by_stem(folder / "gt", _GT_SUFFIXES)
    if xyz is not None:
        for stem in sorted(rgb.keys() ^ xyz.keys()):
            have, lack = ("rgb", "xyz") if stem in rgb else ("xyz", "rgb")
            path = (rgb if stem in rgb else xyz)[stem]
            raise MissingFileError(f"{have} file has no {lack} partner in {folder / lack}", path)
    needs_gt = split == "test" and defect != "good"
    refs = []
    for stem in sorted(rgb):
        gt_path = None if gt is None else gt.get(stem)
        if needs_gt and gt_path is None:
            raise MissingFileError(f"defective sample has no mask in {folder / 'gt'}", rgb[stem])
        xyz_path = None if xyz is None else xyz[stem]
        refs.append(SampleRef(root, class_name, split, defect, stem, rgb[stem], xyz_path, gt_path))
    return refs


def read_class_meta(root: str | Path, class_name: str) -> ClassMeta:
    """Read `<class>/calibration/camera_parameters.json` and `<class>/class_ids.json` (each optional)."""
    class_dir = Path(root) / class_name
    return ClassMeta(
        name=class_name,
        camera_parameters=_read_json(class_dir / "calibration" / "camera_parameters.json"),
        class_ids=_read_json(class_dir / "class_ids.json"),
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"unreadable JSON ({exc})", path) from exc
    if not isinstance(data, dict):
        raise CorruptFileError(f"expected a JSON object, got {type(data).__name__}", path)
    return data


def _open_image(path: Path) -> Image.Image:
    """Open and fully decode an image, turning every failure into a typed error naming the file."""
    if not path.is_file():
        raise MissingFileError("file not found", path)
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise CorruptFileError(f"unreadable image ({type(exc).__name__}: {exc})", path) from exc


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an RGB image as (H, W, 3) uint8.

    Grey images are replicated to three channels and RGBA drops its alpha (Pillow `convert("RGB")`).
    16-bit grey PNGs keep the high byte (v >> 8, so 257 * v8 -> v8 exactly), which is what Pillow itself
    does when it decodes a 16-bit RGB PNG.
    """
    path = Path(path)
    img = _open_image(path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = (np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "F":
        raise ShapeError("floating-point image is not an RGB picture", path)
    return np.array(img.convert("RGB"))


def read_xyz(path: str | Path) -> np.ndarray:
    """Read an organised point cloud TIFF as (H, W, 3) float32 metres.

    Float64/float16 are cast to float32; points with a NaN/inf coordinate become (0, 0, 0) (missing).
    Raises CorruptFileError (not a readable TIFF), ShapeError (not (H, W, 3) float) and InvalidCloudError
    (no finite non-zero point at all).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("file not found", path)
    try:
        xyz = tifffile.imread(path)
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error, ...
        raise CorruptFileError(f"unreadable TIFF ({type(exc).__name__}: {exc})", path) from exc
    if xyz.size == 0:
        raise CorruptFileError("TIFF holds no image data", path)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ShapeError(f"expected an (H, W, 3) xyz image, got shape {xyz.shape}", path)
    if not np.issubdtype(xyz.dtype, np.floating):
        raise ShapeError(f"expected float xyz in metres, got dtype {xyz.dtype}", path)
    return sanitize_xyz(xyz.astype(np.float32, copy=False), str(path))


def read_gt(path: str | Path) -> np.ndarray:
    """Read a mask as (H, W) uint8 defect-type ids (0 = normal, any non-zero = anomalous; ids are kept).

    Palette PNGs give their indices; an RGB mask must have equal channels (the first is returned).
    """
    path = Path(path)
    img = _open_image(path)
    ids = np.asarray(img)
    if ids.ndim == 3:
        channels = ids[..., :3] if ids.shape[2] >= 3 else ids[..., :1]  # LA: ignore the alpha
        if not (channels == channels[..., :1]).all():
            raise ShapeError("colour mask: channels differ, cannot read defect ids", path)
        ids = ids[..., 0]
    if ids.dtype != np.uint8:
        if ids.min(initial=0) < 0 or ids.max(initial=0) > 255:
            raise ShapeError(f"mask ids must fit in uint8, got range [{ids.min()}, {ids.max()}]", path)
        ids = ids.astype(np.uint8)
    return np.ascontiguousarray(ids)


def load_scan(ref: SampleRef) -> RawScan:
    """Read one sample's files into a RawScan; rgb, xyz and gt must have the same height and width."""
    rgb = read_rgb(ref.rgb_path)
    xyz = None if ref.xyz_path is None else read_xyz(ref.xyz_path)
    gt = None if ref.gt_path is None else read_gt(ref.gt_path)
    for other, other_path in ((xyz, ref.xyz_path), (gt, ref.gt_path)):
        if other is not None and other.shape[:2] != rgb.shape[:2]:
            raise ShapeError(
                f"size {other.shape[:2]} differs from rgb {ref.rgb_path} size {rgb.shape[:2]}", other_path
            )
    return RawScan(rgb_hwc_u8=rgb, xyz_hwc_m=xyz, gt_ids_hw=gt, source=str(ref.xyz_path or ref.rgb_path))


def iter_scans(
    refs: Iterable[SampleRef],
    batch_size: int = 8,
    on_error: Callable[[SampleRef, InputError], None] | None = None,
) -> Iterator[list[tuple[SampleRef, RawScan]]]:
    """Lazily read samples in batches of up to `batch_size` (ref, scan) pairs.

    With `on_error`, a sample whose files raise an InputError is reported to it and skipped; without it the
    error propagates.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[tuple[SampleRef, RawScan]] = []
    for ref in refs:
        try:
            batch.append((ref, load_scan(ref)))
        except InputError as exc:
            if on_error is None:
                raise
            on_error(ref, exc)
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def xyz_coverage(root: str | Path, class_name: str) -> tuple[int, int]:
    """(samples with an xyz file, all samples) over every split of one class; lists files, reads none."""
    refs = [ref for split in SPLITS for ref in list_samples(root, class_name, split)]
    return sum(ref.xyz_path is not None for ref in refs), len(refs)


def class_modalities(root: str | Path, class_name: str) -> tuple[str, ...]:
    """RGB_XYZ when every sample of the class has its xyz file, RGB_ONLY when none has (xyz/ removed).

    Real MVTec 3D-AD copies often ship without xyz/; such a class trains the RGB bank alone. A class where
    some scans have xyz and others not is refused (MissingFileError naming one of each): a point bank from
    part of the scans, scored on frames that may lack points, would be a silently broken model.
    """
    refs = [ref for split in SPLITS for ref in list_samples(root, class_name, split)]
    without = [ref for ref in refs if ref.xyz_path is None]
    if not without:
        return RGB_XYZ
    if len(without) == len(refs):
        return RGB_ONLY
    with_xyz = next(ref for ref in refs if ref.xyz_path is not None)
    raise MissingFileError(
        f"class {class_name!r} mixes scans with xyz ({len(refs) - len(without)}, e.g. {with_xyz.sample_id}) "
        f"and without ({len(without)}, e.g. {without[0].sample_id}); supply the missing xyz/ files, or "
        "remove every xyz/ folder of the class to train an RGB-only model",
        without[0].rgb_path.parent.parent,
    )


def dataset_summary(root: str | Path) -> dict[str, dict[str, dict[str, int]]]:
    """Sample counts as summary[class][split][defect_type]; splits without samples are left out."""
    summary: dict[str, dict[str, dict[str, int]]] = {}
    for name in discover_classes(root):
        summary[name] = {}
        for split in SPLITS:
            counts: dict[str, int] = {}
            for ref in list_samples(root, name, split):
                counts[ref.defect_type] = counts.get(ref.defect_type, 0) + 1
            if counts:
                summary[name][split] = counts
    return summary


def format_summary(
    summary: dict[str, dict[str, dict[str, int]]], data_kinds: dict[str, str] | None = None
) -> str:
    """A plain-text table of `dataset_summary` output, one row per class plus a total row.

    data_kinds: class -> what its files hold (e.g. "rgb+xyz", "RGB-only"), shown as a last column.
    """
    header: tuple[str, ...] = ("class", "train", "validation", "test good", "test defective", "defect types")
    rows = []
    totals = [0, 0, 0, 0]
    for name, splits in summary.items():
        test = splits.get("test", {})
        counts = [
            sum(splits.get("train", {}).values()),
            sum(splits.get("validation", {}).values()),
            test.get("good", 0),
            sum(n for d, n in test.items() if d != "good"),
        ]
        totals = [t + c for t, c in zip(totals, counts, strict=True)]
        defects = ", ".join(f"{d} {n}" for d, n in test.items() if d != "good")
        kind = () if data_kinds is None else (data_kinds.get(name, "?"),)
        rows.append((name, *map(str, counts), defects or "-", *kind))
    if data_kinds is not None:
        header = (*header, "data")
    rows.append(("total", *map(str, totals), "", *(("",) if data_kinds is not None else ())))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    table = (header, *rows)
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
