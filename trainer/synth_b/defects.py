"""Family B's defects, applied to a `Surface` in object-frame metres; each returns its exact mask.

Modality matters for a multimodal detector, so every defect type says what it changes:
geometry only (dent, bump: same colour), colour only (stain, scratch: 20 um deep, under the depth noise),
or both (hole, crack: a cavity with a dark floor).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.synth_b.objects import Surface

_MM = 1e-3

MODALITY = {
    "dent": "geometry",
    "bump": "geometry",
    "hole": "both",
    "crack": "both",
    "stain": "colour",
    "scratch": "colour",
}

DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "tread": ("bump", "crack", "hole", "stain"),
    "weave": ("bump", "hole", "scratch", "stain"),
    "sponge": ("crack", "dent", "hole", "stain"),
    "flange": ("bump", "dent", "scratch", "stain"),
}

# Stain tint per class: chalk on dark rubber, dirt on fabric and foam, dark oil on metal.
_STAIN_RGB = {
    "tread": (0.55, 0.53, 0.50),
    "weave": (0.20, 0.16, 0.12),
    "sponge": (0.45, 0.30, 0.15),
    "flange": (0.18, 0.16, 0.12),
}


@dataclass(frozen=True)
class DefectSpec:
    """One drawn defect: kind, centre (u, v) in object metres, size and shape parameters."""

    kind: str
    centre_m: tuple[float, float]
    size_m: float
    depth_m: float
    angle_rad: float
    aspect: float
    wobble: tuple[float, ...]  # shape harmonics / polyline turns, drawn once
    tint_rgb: tuple[float, float, float]


def draw_defect(
    rng: np.random.Generator, class_name: str, kind: str, centre_m: tuple[float, float]
) -> DefectSpec:
    """Sizes are drawn per kind; `centre_m` was picked on the surface's placeable region by the caller."""
    size, depth = {
        "dent": (rng.uniform(1.6, 3.0) * _MM, rng.uniform(0.5, 1.1) * _MM),
        "bump": (rng.uniform(1.4, 2.6) * _MM, rng.uniform(0.5, 1.0) * _MM),
        "hole": (rng.uniform(0.7, 1.4) * _MM, rng.uniform(2.0, 3.0) * _MM),
        "crack": (rng.uniform(4.0, 8.0) * _MM, rng.uniform(0.8, 1.4) * _MM),
        "stain": (rng.uniform(2.0, 3.6) * _MM, 0.0),
        "scratch": (rng.uniform(5.0, 9.0) * _MM, 0.02 * _MM),
    }[kind]
    return DefectSpec(
        kind=kind,
        centre_m=centre_m,
        size_m=float(size),
        depth_m=float(depth),
        angle_rad=float(rng.uniform(0, np.pi)),
        aspect=float(rng.uniform(1.0, 1.7)),
        wobble=tuple(float(x) for x in rng.uniform(-1, 1, 8)),
        tint_rgb=_STAIN_RGB[class_name],
    )


def _local(u: np.ndarray, v: np.ndarray, spec: DefectSpec) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates centred on the defect and rotated into its axes."""
    c, s = np.cos(spec.angle_rad), np.sin(spec.angle_rad)
    du, dv = u - spec.centre_m[0], v - spec.centre_m[1]
    return c * du + s * dv, -s * du + c * dv


def _polyline_distance(a: np.ndarray, b: np.ndarray, spec: DefectSpec, bend: float) -> np.ndarray:
    """Distance (m) to a wobbly polyline of 8 segments along the local a axis, `size_m` long."""
    n = len(spec.wobble)
    xs = np.linspace(-0.5, 0.5, n + 1) * spec.size_m
    ys = np.concatenate([[0.0], np.cumsum(spec.wobble)]) * bend * spec.size_m / n
    ys -= ys.mean()
    best = np.full(a.shape, np.inf)
    for i in range(n):
        p0, p1 = np.array([xs[i], ys[i]]), np.array([xs[i + 1], ys[i + 1]])
        seg = p1 - p0
        t = np.clip(((a - p0[0]) * seg[0] + (b - p0[1]) * seg[1]) / (seg @ seg), 0, 1)
        best = np.minimum(best, np.hypot(a - p0[0] - t * seg[0], b - p0[1] - t * seg[1]))
    return best


def _blob_radius(a: np.ndarray, b: np.ndarray, spec: DefectSpec) -> np.ndarray:
    """Radius of an irregular blob: elliptical distance divided by a harmonic boundary wobble."""
    theta = np.arctan2(b, a)
    wob = 1 + 0.18 * sum(spec.wobble[k] * np.sin((k + 2) * theta + spec.wobble[-1 - k]) for k in range(3))
    return np.hypot(a, b * spec.aspect) / (spec.size_m * wob)


def apply_defect(
    surface: Surface, u: np.ndarray, v: np.ndarray, spec: DefectSpec, pixel_m: float
) -> np.ndarray:
    """Change `surface` in place; return the (H, W) bool mask of the pixels the defect changed.

    `pixel_m` is the footprint of one pixel: thin defects are drawn at least two pixels wide so each is
    resolved and its mask is exactly what changed.
    """
    a, b = _local(u, v, spec)
    on = surface.on_object
    if spec.kind in ("dent", "bump"):
        r = _blob_radius(a, b, spec)
        profile = np.clip(1 - r**2, 0, 1) ** 2
        sign = -1.0 if spec.kind == "dent" else 1.0
        surface.height_m += sign * spec.depth_m * profile * on
        return on & (profile > 0.12)
    if spec.kind == "hole":
        r = np.hypot(a, b * min(spec.aspect, 1.3)) / spec.size_m
        inside = on & (r < 1)
        floor = np.clip(1 - r**6, 0, 1)  # nearly flat floor, steep wall
        surface.height_m -= spec.depth_m * floor * inside
        surface.albedo_rgb[inside] *= 0.35
        return inside
    if spec.kind == "crack":
        half_w = max(0.18 * _MM + 0.04 * _MM * spec.wobble[0], pixel_m)
        d = _polyline_distance(a, b, spec, bend=0.9)
        inside = on & (d < half_w)
        surface.height_m -= spec.depth_m * np.clip(1 - (d / half_w) ** 2, 0, 1) * inside
        surface.albedo_rgb[inside] *= 0.4
        return inside
    if spec.kind == "stain":
        r = _blob_radius(a, b, spec)
        alpha = np.clip((1 - r) / 0.25, 0, 1) * on
        tint = np.asarray(spec.tint_rgb)
        surface.albedo_rgb[:] = surface.albedo_rgb * (1 - alpha[..., None]) + tint * alpha[..., None]
        surface.specular[:] = surface.specular * (1 - 0.5 * alpha)
        return alpha > 0.5
    if spec.kind == "scratch":
        half_w = max(0.08 * _MM, pixel_m)
        d = _polyline_distance(a, b, spec, bend=0.3)
        inside = on & (d < half_w)
        surface.height_m -= spec.depth_m * inside
        lift = np.where(surface.albedo_rgb.mean(axis=-1, keepdims=True) > 0.4, 0.45, 1.9)
        surface.albedo_rgb[inside] = np.clip(surface.albedo_rgb * lift, 0, 1)[inside]
        return inside
    raise ValueError(f"unknown defect kind {spec.kind!r}")
