"""Defects applied to an object's heightfield and albedo grids, with the exact grid cells they change.

Three kinds: "geometry" edits only the height (dent, bump, crack), "colour" only the albedo (stain,
oxidation, burn), "both" edits the two (cut, hole). Profiles have compact support, so the changed-cell mask
is exact; the renderer turns it into the pixel mask of the visible changed surface.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from scipy.ndimage import binary_dilation

from trainer.synth.fields import periodic_noise_1d
from trainer.synth.shapes import ObjectModel

_MM = 1e-3

DEFECT_TYPES: dict[str, dict[str, str]] = {
    "ring": {"dent": "geometry", "crack": "geometry", "stain": "colour", "cut": "both"},
    "gland": {"bump": "geometry", "crack": "geometry", "oxidation": "colour", "hole": "both"},
    "biscuit": {"crack": "geometry", "dent": "geometry", "burn": "colour", "hole": "both"},
    "peg": {"dent": "geometry", "stain": "colour", "cut": "both", "hole": "both"},
}


def defect_ids(class_name: str) -> dict[str, int]:
    """Defect name -> gt id, counting up to 255 as MVTec writes them.

    Ids stay >= 128 so the M3DM reader's "grey / 255 > 0.5" binarisation marks every type as anomalous.
    """
    names = list(DEFECT_TYPES[class_name])
    return {name: 256 - len(names) + i for i, name in enumerate(names)}


@dataclass(frozen=True)
class DefectEdit:
    """Changes on the object grid: dheight_m (G, G) metres, albedo_gain (G, G, 3) multiplicative."""

    dheight_m: np.ndarray
    albedo_gain: np.ndarray


def _grid_coords(model: ObjectModel) -> tuple[np.ndarray, np.ndarray]:
    n = model.height_m.shape[0]
    axis = (np.arange(n) - (n - 1) / 2) * model.cell_m
    return np.meshgrid(axis, axis)


def _pick_centre(model: ObjectModel, rng: np.random.Generator) -> np.ndarray:
    """(a, b) metres of a random placeable cell."""
    rows, cols = np.nonzero(model.placeable)
    k = rng.integers(len(rows))
    n = model.height_m.shape[0]
    return (np.array([cols[k], rows[k]]) - (n - 1) / 2) * model.cell_m


def _blob_distance(model: ObjectModel, rng: np.random.Generator, radius_m: float) -> np.ndarray:
    """(G, G) distance from a random centre, relative to an irregular outline of mean radius `radius_m`."""
    a, b = _grid_coords(model)
    centre = _pick_centre(model, rng)
    da, db = a - centre[0], b - centre[1]
    outline = radius_m * (1.0 + 0.25 * periodic_noise_1d(rng, np.arctan2(db, da), 6))
    return np.hypot(da, db) / outline


def _polyline_distance(
    model: ObjectModel, rng: np.random.Generator, length_m: float, wiggle: float
) -> np.ndarray:
    """(G, G) metres to a random-walk polyline of `length_m` starting on a placeable cell."""
    a, b = _grid_coords(model)
    heading = rng.uniform(0, 2 * np.pi)
    steps = np.cumsum(rng.normal(0, wiggle, 6)) + heading
    offsets = np.cumsum(np.stack([np.cos(steps), np.sin(steps)], 1) * length_m / 6, axis=0)
    points = np.vstack([[0.0, 0.0], offsets]) + _pick_centre(model, rng) - 0.5 * offsets[-1]
    dist = np.full(a.shape, np.inf)
    for p0, p1 in zip(points[:-1], points[1:], strict=True):  # 6 segments, each vectorised over the grid
        seg = p1 - p0
        t = np.clip(((a - p0[0]) * seg[0] + (b - p0[1]) * seg[1]) / (seg @ seg), 0, 1)
        dist = np.minimum(dist, np.hypot(a - p0[0] - t * seg[0], b - p0[1] - t * seg[1]))
    return dist


def _no_colour(model: ObjectModel) -> np.ndarray:
    return np.ones_like(model.albedo_rgb)


def _tinted(profile: np.ndarray, strength: float, tint_rgb: tuple[float, float, float]) -> np.ndarray:
    """(G, G, 3) gain: 1 off the profile, towards `tint_rgb` scaled by `strength` inside it."""
    return 1.0 - strength * profile[..., None] * (1.0 - np.asarray(tint_rgb))[None, None, :]


def dent(model: ObjectModel, rng: np.random.Generator, pixel_m: float) -> DefectEdit:
    rel = _blob_distance(model, rng, max(rng.uniform(2.0, 3.5) * _MM, 3 * pixel_m))
    depth_m = rng.uniform(0.5, 1.2) * _MM
    return DefectEdit(-depth_m * np.clip(1 - rel**2, 0, None) ** 2, _no_colour(model))


def bump(model: ObjectModel, rng: np.random.Generator, pixel_m: float) -> DefectEdit:
    rel = _blob_distance(model, rng, max(rng.uniform(1.8, 3.0) * _MM, 3 * pixel_m))
    return DefectEdit(rng.uniform(0.5, 1.0) * _MM * np.clip(1 - rel**2, 0, None) ** 2, _no_colour(model))


def crack(model: ObjectModel, rng: np.random.Generator, pixel_m: float) -> DefectEdit:
    dist = _polyline_distance(model, rng, rng.uniform(5, 10) * _MM, 0.4)
    half_width_m = max(rng.uniform(0.3, 0.45) * _MM, 0.9 * pixel_m)
    return DefectEdit(
        -rng.uniform(0.4, 0.9) * _MM * np.clip(1 - dist / half_width_m, 0, None), _no_colour(model)
    )


def _colour_blob(
    tint_rgb: tuple[float, float, float],
) -> Callable[[ObjectModel, np.random.Generator, float], DefectEdit]:
    def make(model: ObjectModel, rng: np.random.Generator, pixel_m: float) -> DefectEdit:
        rel = _blob_distance(model, rng, max(rng.uniform(2.0, 4.0) * _MM, 3 * pixel_m))
        profile = np.clip((1 - rel) / 0.35, 0, 1)
        gain = _tinted(profile, rng.uniform(0.5, 1.0), tint_rgb)
        return DefectEdit(np.zeros_like(model.height_m), gain)

    return make


def cut(model: ObjectModel, rng: np.random.Generator, pixel_m: float) -> DefectEdit:
    dist = _polyline_distance(model, rng, rng.uniform(4, 8) * _MM, 0.08)
    half_width_m = max(rng.uniform(0.5, 0.8) * _MM, 1.2 * pixel_m)
    walls = np.clip((half_width_m - dist) / (0.3 * half_width_m), 0, 1)  # steep-walled groove
    gain = _tinted(walls, rng.uniform(0.6, 1.0), (1.2, 1.15, 1.1))  # freshly exposed, lighter material
    return DefectEdit(-rng.uniform(0.6, 1.2) * _MM * walls, gain)


def hole(model: ObjectModel, rng: np.random.Generator, pixel_m: float) -> DefectEdit:
    rel = _blob_distance(model, rng, max(rng.uniform(1.2, 2.2) * _MM, 2.5 * pixel_m))
    walls = np.clip((1 - rel) / 0.15, 0, 1)
    gain = _tinted(walls, rng.uniform(0.6, 1.0), (0.6, 0.55, 0.5))
    return DefectEdit(-rng.uniform(1.5, 3.0) * _MM * walls, gain)


DEFECT_MAKERS: dict[str, Callable[[ObjectModel, np.random.Generator, float], DefectEdit]] = {
    "dent": dent,
    "bump": bump,
    "crack": crack,
    "cut": cut,
    "hole": hole,
    "stain": _colour_blob((0.78, 0.72, 0.62)),
    "oxidation": _colour_blob((0.72, 0.82, 0.76)),
    "burn": _colour_blob((0.62, 0.52, 0.46)),
}


def apply_defect(
    model: ObjectModel, name: str, rng: np.random.Generator, pixel_m: float
) -> tuple[ObjectModel, np.ndarray]:
    """Apply defect `name` to `model`.

    Returns:
        The edited model and the (G, G) bool mask of object cells whose rendered look changed: the edit,
        plus the neighbours whose interpolated normal (height) or colour (albedo) it reaches.
    """
    edit = DEFECT_MAKERS[name](model, rng, pixel_m)
    footprint = model.height_m > 0
    dheight_m = np.where(footprint, edit.dheight_m, 0.0)
    gain = np.where(footprint[..., None], edit.albedo_gain, 1.0)
    # Bilinear lookups of height gradients reach two cells, of albedo one cell, beyond the edit itself.
    changed_geometry = binary_dilation(dheight_m != 0, np.ones((5, 5), bool))
    changed_colour = binary_dilation(np.any(gain != 1.0, axis=-1), np.ones((3, 3), bool))
    changed = changed_geometry | changed_colour  # the renderer keeps only visible object pixels
    height = np.where(footprint, np.maximum(model.height_m + dheight_m, 0.5 * _MM), 0.0)
    albedo = np.clip(model.albedo_rgb * gain, 0, 1)
    return replace(model, height_m=height, albedo_rgb=albedo), changed
