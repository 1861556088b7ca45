"""The synthetic object classes: each is a heightfield over the support plane plus an albedo texture.

An object lives on a square grid in its own plane-aligned frame (a, b in metres, centred on the object);
the renderer places it with a pose (position, rotation about the plane normal). Every visible surface is
kept well above the plane-removal threshold (>= 6 mm) with steep side walls, as real parts are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from trainer.synth.fields import periodic_noise_1d, value_noise

_MM = 1e-3


@dataclass(frozen=True)
class ObjectModel:
    """One object instance on a (G, G) grid of `cell_m` cells; row index ~ b, column index ~ a.

    height_m: (G, G) float64 height above the plane, 0 off the object. albedo_rgb: (G, G, 3) float64 in
    [0, 1]. placeable: (G, G) bool, where a defect centre may go (visible top surfaces). specular: the
    strength of the highlight of this material, 0 for matte.
    """

    height_m: np.ndarray
    albedo_rgb: np.ndarray
    placeable: np.ndarray
    cell_m: float
    specular: float

    @property
    def half_extent_m(self) -> float:
        return 0.5 * (self.height_m.shape[0] - 1) * self.cell_m


def local_grid(half_extent_m: float, cell_m: float) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) coordinate grids, each (G, G) float64 metres, covering [-half, half]^2."""
    n = 2 * int(np.ceil(half_extent_m / cell_m)) + 1
    axis = (np.arange(n) - (n - 1) / 2) * cell_m
    return np.meshgrid(axis, axis)


def _jitter_colour(
    rng: np.random.Generator, base_rgb: tuple[float, float, float], spread: float
) -> np.ndarray:
    """A per-sample colour near `base_rgb`: brightness and per-channel jitter."""
    return np.clip(
        np.asarray(base_rgb) * rng.uniform(1 - spread, 1 + spread) + rng.normal(0, spread / 3, 3), 0, 1
    )


def _texture(
    rng: np.random.Generator, shape_hw: tuple[int, int], base: np.ndarray, amount: float, cells: int
):
    """Albedo (G, G, 3): `base` colour modulated by mottling noise of relative strength `amount`."""
    mottle = value_noise(rng, shape_hw, cells, octaves=4)
    return base[None, None, :] * (1.0 + amount * mottle)[..., None]


def build_ring(shape_rng: np.random.Generator, tex_rng: np.random.Generator, cell_m: float) -> ObjectModel:
    """A slightly elliptical torus lying flat (anodised, brushed along the circumference)."""
    major_m = shape_rng.uniform(11, 14) * _MM
    minor_m = shape_rng.uniform(5.6, 6.6) * _MM
    ellipse = shape_rng.uniform(0.95, 1.05)
    a, b = local_grid(major_m + minor_m + 4 * _MM, cell_m)
    angle = np.arctan2(b, a)
    wobble = 1.0 + 0.04 * periodic_noise_1d(shape_rng, angle, 7)
    rho = np.hypot(a / ellipse, b * ellipse)
    d = (rho - major_m) / wobble
    inside = np.abs(d) < minor_m
    height = np.where(inside, minor_m + np.sqrt(np.clip(minor_m**2 - d**2, 0, None)), 0.0)
    base = _jitter_colour(
        tex_rng, tex_rng.choice([(0.62, 0.45, 0.30), (0.45, 0.50, 0.58), (0.60, 0.58, 0.55)]), 0.12
    )
    albedo = _texture(tex_rng, a.shape, base, 0.08, 6)
    radial_lines = np.interp(rho, np.linspace(0, rho.max(), 400), tex_rng.normal(0, 1, 400))
    albedo *= (1.0 + 0.05 * radial_lines)[..., None]
    placeable = inside & (np.abs(d) < 0.55 * minor_m)
    return ObjectModel(height, np.clip(albedo, 0, 1), placeable, cell_m, specular=0.5)


def build_gland(shape_rng: np.random.Generator, tex_rng: np.random.Generator, cell_m: float) -> ObjectModel:
    """A hex nut: chamfered hexagonal prism with a countersunk through-hole (brass or zinc-plated)."""
    flats_m = shape_rng.uniform(20, 25) * _MM
    thick_m = shape_rng.uniform(9, 12) * _MM
    hole_m = shape_rng.uniform(0.22, 0.28) * flats_m
    sink_m = shape_rng.uniform(0.8, 1.6) * _MM
    a, b = local_grid(flats_m / np.sqrt(3) + 4 * _MM, cell_m)
    hex_m = np.max([np.abs(a * np.cos(k * np.pi / 3) + b * np.sin(k * np.pi / 3)) for k in range(3)], axis=0)
    rho = np.hypot(a, b)
    chamfer_start = 0.5 * flats_m * shape_rng.uniform(0.92, 0.98)
    height = thick_m - np.clip(rho - chamfer_start, 0, None) * 0.6
    height = np.minimum(height, thick_m - np.clip(hole_m + sink_m - rho, 0, None))
    inside = (hex_m < 0.5 * flats_m) & (rho > hole_m)
    height = np.where(inside, height, 0.0)
    base = _jitter_colour(tex_rng, tex_rng.choice([(0.66, 0.55, 0.33), (0.55, 0.56, 0.57)]), 0.1)
    albedo = _texture(tex_rng, a.shape, base, 0.07, 5)
    pitch_m = tex_rng.uniform(0.3, 0.6) * _MM
    albedo *= (1.0 + 0.04 * np.sin(2 * np.pi * rho / pitch_m))[..., None]  # facing-lathe rings
    top = height >= thick_m - 1e-9
    placeable = top & (rho > hole_m + sink_m + 1.5 * _MM) & (hex_m < 0.5 * flats_m - 2 * _MM)
    return ObjectModel(height, np.clip(albedo, 0, 1), placeable, cell_m, specular=0.35)


def build_biscuit(shape_rng: np.random.Generator, tex_rng: np.random.Generator, cell_m: float) -> ObjectModel:
    """A baked biscuit: irregular disc with a rounded rim, bumpy top, docking holes and browned edges."""
    radius_m = shape_rng.uniform(15, 19) * _MM
    thick_m = shape_rng.uniform(7.5, 10) * _MM
    rim_m = 3 * _MM
    ellipse = shape_rng.uniform(0.94, 1.06)
    a, b = local_grid(radius_m * 1.1 + 4 * _MM, cell_m)
    angle = np.arctan2(b, a)
    outline = radius_m * (1.0 + 0.03 * periodic_noise_1d(shape_rng, angle, 9))
    rho = np.hypot(a / ellipse, b * ellipse)
    edge = np.clip(rho - (outline - rim_m), 0, rim_m)
    height = thick_m - rim_m + np.sqrt(rim_m**2 - edge**2)
    relief = value_noise(shape_rng, a.shape, max(3, int(2 * radius_m / (9 * _MM))), octaves=2)
    crumbs = value_noise(shape_rng, a.shape, max(6, int(2 * radius_m / (1.5 * _MM))), octaves=1)
    height += (0.7 * relief + 0.08 * crumbs) * _MM * (1.0 - edge / rim_m)
    for _ in range(shape_rng.integers(4, 9)):  # docking holes: normal, so a detector must accept them
        c = shape_rng.uniform(-0.6, 0.6, 2) * radius_m
        pit = np.clip(1.0 - np.hypot(a - c[0], b - c[1]) / (0.9 * _MM), 0, None)
        height -= 0.8 * _MM * np.sqrt(pit)
    inside = rho < outline
    height = np.where(inside, height, 0.0)
    base = _jitter_colour(tex_rng, (0.78, 0.56, 0.32), 0.1)
    albedo = _texture(tex_rng, a.shape, base, 0.10, 8)
    browning = np.clip((rho / outline - 0.72) / 0.28, 0, 1) ** 2 * tex_rng.uniform(0.2, 0.4)
    specks = (value_noise(tex_rng, a.shape, max(8, int(radius_m / (0.5 * _MM))), octaves=1) > 0.55) * 0.25
    albedo *= (1.0 - browning - specks)[..., None]
    placeable = inside & (rho < outline - rim_m - 3 * _MM)
    return ObjectModel(height, np.clip(albedo, 0, 1), placeable, cell_m, specular=0.0)


def build_peg(shape_rng: np.random.Generator, tex_rng: np.random.Generator, cell_m: float) -> ObjectModel:
    """A wooden dowel lying on its side: slightly bent cylinder with chamfered ends and grain."""
    radius_m = shape_rng.uniform(5.6, 6.6) * _MM
    half_len_m = shape_rng.uniform(16, 21) * _MM
    chamfer_m = shape_rng.uniform(0.8, 1.8) * _MM
    bend_m = shape_rng.uniform(-1.0, 1.0) * _MM
    a, b = local_grid(half_len_m + 4 * _MM, cell_m)
    b_axis = b - bend_m * (a / half_len_m) ** 2
    r_eff = radius_m - np.clip(np.abs(a) - (half_len_m - chamfer_m), 0, None)
    inside = (np.abs(a) < half_len_m) & (np.abs(b_axis) < r_eff)
    height = np.where(inside, radius_m + np.sqrt(np.clip(r_eff**2 - b_axis**2, 0, None)), 0.0)
    base = _jitter_colour(tex_rng, (0.80, 0.64, 0.44), 0.1)
    albedo = _texture(tex_rng, a.shape, base, 0.06, 6)
    warp = value_noise(tex_rng, a.shape, 4, octaves=2)
    grain = np.sin(2 * np.pi * (b_axis / (tex_rng.uniform(0.8, 1.6) * _MM) + 2.5 * warp))
    albedo *= (1.0 - 0.07 * (grain > 0.6))[..., None]
    placeable = inside & (np.abs(b_axis) < 0.55 * radius_m) & (np.abs(a) < half_len_m - 5 * _MM)
    return ObjectModel(height, np.clip(albedo, 0, 1), placeable, cell_m, specular=0.08)


BUILDERS: dict[str, Callable[[np.random.Generator, np.random.Generator, float], ObjectModel]] = {
    "ring": build_ring,
    "gland": build_gland,
    "biscuit": build_biscuit,
    "peg": build_peg,
}
CLASS_NAMES: tuple[str, ...] = tuple(BUILDERS)
