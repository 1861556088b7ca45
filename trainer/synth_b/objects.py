"""Family B's object classes: surfaces as functions of object-frame coordinates (metres on the plane).

Each builder maps (u_m, v_m) grids to a `Surface`: height above the support plane, albedo, specular
strength and exponent, and where a defect centre may go. Being functions (not rasters) lets the renderer
evaluate them wherever a pixel's ray lands, at any resolution and pose. Written separately from
trainer/synth: other objects, other materials (rubber tread, woven fabric, open-cell foam, machined metal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from trainer.synth_b.noise import rounded_box_sdf, smoothstep

_MM = 1e-3


@dataclass
class Surface:
    """Per-pixel surface, all (H, W): height_m above the plane (0 = plane), albedo_rgb (H, W, 3) in [0, 1],
    specular strength in [0, 1], shininess (Blinn-Phong exponent), on_object and placeable bool masks."""

    height_m: np.ndarray
    albedo_rgb: np.ndarray
    specular: np.ndarray
    shininess: float
    on_object: np.ndarray
    placeable: np.ndarray


@dataclass(frozen=True)
class Instance:
    """Per-scan shape parameters drawn once (shape stream): scale, colour jitter and a texture table."""

    scale: float
    colour_gain: np.ndarray  # (3,)
    table: np.ndarray  # (64, 64, 4) uniform [0, 1) values for hashed cell features


def draw_instance(rng: np.random.Generator) -> Instance:
    return Instance(
        scale=float(rng.uniform(0.94, 1.06)),
        colour_gain=np.clip(rng.normal(1.0, 0.04, 3), 0.85, 1.15),
        table=rng.random((64, 64, 4)),
    )


def _side_wall(sdf_m: np.ndarray, wall_m: float) -> np.ndarray:
    """1 inside the outline, 0 outside, with a rounded shoulder `wall_m` wide (steep, as moulded parts)."""
    return smoothstep(0.0, -wall_m, sdf_m)


def _tread(u: np.ndarray, v: np.ndarray, inst: Instance) -> Surface:
    """Rubber tread block, portrait: chevron grooves and a centre groove cut 2 mm into a 12 mm slab."""
    s = inst.scale
    sdf = rounded_box_sdf(u, v, 13 * _MM * s, 19 * _MM * s, 4 * _MM * s)
    body = _side_wall(sdf, 1.2 * _MM)
    period = 4.2 * _MM * s
    phase = np.mod((v + 0.65 * np.abs(u)) / period, 1.0)
    chevron = smoothstep(0.0, 0.06, phase) * smoothstep(0.32, 0.26, phase)  # groove 1/4 of the period
    centre = smoothstep(0.8 * _MM, 0.5 * _MM, np.abs(u))
    groove = np.maximum(chevron * (np.abs(u) > 1.4 * _MM), centre) * (sdf < -1.5 * _MM)
    height = body * 12 * _MM - groove * 2.0 * _MM
    grey = 0.13 + 0.015 * np.sin(u / (0.7 * _MM)) * np.sin(v / (0.9 * _MM))  # moulding grain
    albedo = np.repeat((grey * (1 - 0.25 * groove))[..., None], 3, axis=2) * inst.colour_gain
    on = body > 0.02
    return Surface(height, albedo, np.where(on, 0.12, 0.04), 14.0, on, sdf < -2.5 * _MM)


def _weave(u: np.ndarray, v: np.ndarray, inst: Instance) -> Surface:
    """Woven cushion: plain weave of 1.6 mm yarns (over-under) on a domed 7 mm pad, two yarn colours."""
    s = inst.scale
    half = 17 * _MM * s
    sdf = rounded_box_sdf(u, v, half, half, 6 * _MM * s)
    body = _side_wall(sdf, 1.5 * _MM)
    pitch = 1.6 * _MM
    iu, iv = np.floor(u / pitch), np.floor(v / pitch)
    fu, fv = u / pitch - iu - 0.5, v / pitch - iv - 0.5  # position within the yarn cell, [-0.5, 0.5)
    over = np.where(np.mod(iu + iv, 2) == 0, 1.0, -1.0)  # warp on top on one checker colour
    warp = np.sqrt(np.clip(1 - (2 * fv) ** 2, 0, 1)) * (0.6 + 0.4 * over * np.cos(np.pi * fu))
    weft = np.sqrt(np.clip(1 - (2 * fu) ** 2, 0, 1)) * (0.6 - 0.4 * over * np.cos(np.pi * fv))
    texture = 0.4 * _MM * np.maximum(warp, weft)
    r2 = (u**2 + v**2) / half**2
    height = body * (7 * _MM + 2 * _MM * np.clip(1 - r2, 0, 1) + texture)
    warp_rgb = np.array([0.62, 0.52, 0.36])
    weft_rgb = np.array([0.45, 0.30, 0.22])
    fibre = (
        1
        + 0.08 * np.sin(u / (0.09 * _MM) + 3 * iv) * (warp >= weft)
        + 0.08 * np.sin(v / (0.09 * _MM) + 3 * iu) * (warp < weft)
    )
    albedo = np.where((warp >= weft)[..., None], warp_rgb, weft_rgb) * fibre[..., None] * inst.colour_gain
    on = body > 0.02
    return Surface(height, albedo, np.where(on, 0.06, 0.04), 8.0, on, sdf < -3 * _MM)


def _worley_pores(u: np.ndarray, v: np.ndarray, cell_m: float, table: np.ndarray, layer: int) -> np.ndarray:
    """Depth fraction in [0, 1] of jittered-grid pores (one per cell, hashed into `table`), for 1-d u, v."""
    iu, iv = np.floor(u / cell_m).astype(np.int64), np.floor(v / cell_m).astype(np.int64)
    flat = table.reshape(-1, table.shape[-1])
    best = np.zeros(u.shape)
    for du in (-1, 0, 1):
        for dv in (-1, 0, 1):
            cu, cv = iu + du, iv + dv
            cell = np.mod(cu * 7 + layer, 64) * 64 + np.mod(cv * 13 + 3 * layer, 64)
            pu = (cu + flat[cell, 0]) * cell_m
            pv = (cv + flat[cell, 1]) * cell_m
            radius = (0.18 + 0.32 * flat[cell, 2]) * cell_m
            d2 = ((u - pu) ** 2 + (v - pv) ** 2) / radius**2
            np.maximum(best, 1 - d2, out=best)
    return np.sqrt(best)


def _sponge(u: np.ndarray, v: np.ndarray, inst: Instance) -> Surface:
    """Open-cell foam block, landscape, 15 mm tall: two scales of pores, yellow, matte."""
    s = inst.scale
    sdf = rounded_box_sdf(u, v, 19 * _MM * s, 13 * _MM * s, 5 * _MM * s)
    body = _side_wall(sdf, 1.5 * _MM)
    top = sdf < -0.8 * _MM  # pores only where they show: the top face (and far cheaper)
    pores = np.zeros(u.shape)
    ut, vt = u[top], v[top]
    big = _worley_pores(ut, vt, 2.2 * _MM, inst.table, 0)
    small = _worley_pores(ut + 0.37 * _MM, vt - 0.21 * _MM, 1.0 * _MM, inst.table, 1)
    pores[top] = np.maximum(big, 0.8 * small)
    height = body * (15 * _MM - 1.6 * _MM * pores)
    foam = np.array([0.86, 0.70, 0.30]) * inst.colour_gain
    albedo = foam * (1 - 0.45 * pores)[..., None]
    on = body > 0.02
    return Surface(height, albedo, np.where(on, 0.02, 0.04), 4.0, on, sdf < -3 * _MM)


def _flange(u: np.ndarray, v: np.ndarray, inst: Instance) -> Surface:
    """Machined flange: 8 mm disc, 12 mm boss, bore and six bolt holes through, lathe rings, specular."""
    s = inst.scale
    rho = np.hypot(u, v)
    angle = np.arctan2(v, u)
    disc = smoothstep(20 * _MM * s, 19.6 * _MM * s, rho)
    boss = smoothstep(11 * _MM * s, 10.7 * _MM * s, rho)
    bore = smoothstep(4.3 * _MM * s, 4.6 * _MM * s, rho)
    bolt_angle = np.mod(angle + np.pi / 6, np.pi / 3) - np.pi / 6  # six holes
    bolt_d = np.hypot(rho * np.cos(bolt_angle) - 15.5 * _MM * s, rho * np.sin(bolt_angle))
    bolt = smoothstep(1.6 * _MM * s, 1.8 * _MM * s, bolt_d)
    lathe = 0.015 * _MM * np.sin(2 * np.pi * rho / (0.6 * _MM))
    height = (disc * 8 * _MM + boss * 4 * _MM + disc * lathe) * bore * bolt
    ring = 1 + 0.04 * np.sin(2 * np.pi * rho / (1.3 * _MM))
    albedo = np.array([0.33, 0.34, 0.36]) * ring[..., None] * inst.colour_gain
    on = height > 0.5 * _MM
    placeable = (rho < 19 * _MM * s) & (rho > 5.5 * _MM * s) & (bolt_d > 2.6 * _MM * s)
    placeable &= np.abs(rho - 10.85 * _MM * s) > 0.8 * _MM
    return Surface(height, albedo, np.where(on, 0.5, 0.04), 60.0, on, placeable)


Builder = Callable[[np.ndarray, np.ndarray, Instance], Surface]

BUILDERS: dict[str, Builder] = {"tread": _tread, "weave": _weave, "sponge": _sponge, "flange": _flange}

# (width, height) frames per class at size 400 (the longer side); each scan draws one. Not all square, and
# several resolutions per class, as the real data set's classes differ in size.
FRAMES_AT_400: dict[str, tuple[tuple[int, int], ...]] = {
    "tread": ((300, 400), (240, 320)),
    "weave": ((400, 400), (352, 352)),
    "sponge": ((400, 300), (320, 240)),
    "flange": ((400, 400), (360, 360), (320, 320)),
}

# Rotation range about the plane normal per class (radians): elongated parts lie roughly aligned.
ROTATION_RAD: dict[str, float] = {"tread": 0.25, "weave": np.pi, "sponge": 0.25, "flange": np.pi}

CLASS_NAMES: tuple[str, ...] = tuple(BUILDERS)
