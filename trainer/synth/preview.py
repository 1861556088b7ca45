"""Contact sheet of a generated data set: per class a few test samples as rgb | depth | mask overlay.

Backs `m3dm synth --preview`; reads the files back from disk, so it shows exactly what was written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from PIL import Image

from core.errors import InputError


def _pick_samples(class_dir: Path, per_class: int) -> list[tuple[str, Path]]:
    """Up to `per_class` (folder, rgb path) pairs, round-robin over the test folders (defects first)."""
    test_dir = class_dir / "test"
    folders = sorted((p for p in test_dir.iterdir() if p.is_dir()), key=lambda p: (p.name == "good", p.name))
    stems = {f: sorted((f / "rgb").glob("*.png")) for f in folders}
    picks: list[tuple[str, Path]] = []
    for rank in range(max((len(v) for v in stems.values()), default=0)):
        for folder in folders:
            if rank < len(stems[folder]) and len(picks) < per_class:
                picks.append((folder.name, stems[folder][rank]))
    return picks


def _depth_image(xyz_path: Path, cmap: Colormap) -> np.ndarray:
    """(H, W, 3) float RGB: z colour-mapped between its 1st and 99th percentile, missing points black."""
    z = tifffile.imread(xyz_path)[..., 2]
    valid = z > 0
    out = np.zeros(z.shape + (3,))
    if valid.any():
        low, high = np.percentile(z[valid], [1, 99])
        out[valid] = cmap(np.clip((z[valid] - low) / max(high - low, 1e-6), 0, 1))[:, :3]
    return out


def _overlay(rgb: np.ndarray, gt_path: Path) -> np.ndarray:
    """(H, W, 3) float RGB: the image dimmed, defect pixels tinted red."""
    out = rgb.astype(float) / 255 * 0.6
    if gt_path.is_file():
        mask = np.asarray(Image.open(gt_path)) > 0
        out[mask] = 0.4 * out[mask] + 0.6 * np.array([1.0, 0.1, 0.1])
    return out


def write_preview(data_root: Path, out_png: Path, per_class: int = 4) -> Path:
    """Write a PNG contact sheet of `data_root` (one row per class) to `out_png` and return its path.

    Raises InputError when `data_root` holds no class folder with a test split.
    """
    data_root, out_png = Path(data_root), Path(out_png)
    classes = sorted(p for p in data_root.iterdir() if (p / "test").is_dir()) if data_root.is_dir() else []
    if not classes:
        raise InputError("no class folder with a test/ split to preview", data_root)
    from matplotlib import colormaps  # deferred: a few hundred ms, only for previews

    cmap = colormaps["turbo"]
    fig = Figure(figsize=(per_class * 3 * 1.7, len(classes) * 1.95), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(classes), per_class * 3, squeeze=False)
    for row, class_dir in enumerate(classes):
        for ax in axes[row]:
            ax.set_axis_off()
        for k, (folder, rgb_path) in enumerate(_pick_samples(class_dir, per_class)):
            rgb = np.asarray(Image.open(rgb_path).convert("RGB"))
            xyz_path = rgb_path.parent.parent / "xyz" / f"{rgb_path.stem}.tiff"
            gt_path = rgb_path.parent.parent / "gt" / rgb_path.name
            panels = (rgb, _depth_image(xyz_path, cmap), _overlay(rgb, gt_path))
            for j, (panel, title) in enumerate(
                zip(panels, (f"{class_dir.name} {folder} {rgb_path.stem}", "z", "mask"), strict=True)
            ):
                axes[row, 3 * k + j].imshow(panel, interpolation="nearest")
                axes[row, 3 * k + j].set_title(title, fontsize=7)
    fig.tight_layout(pad=0.3)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png
