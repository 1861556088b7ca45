"""Render one family-B scan: pose an object on the plane, find where each pixel's ray meets its surface,
light it for the colour camera and measure it with the fringe-projection sensor.

Random streams are split by purpose (frame, pose, shape, defect, sensor, colour), so adding a defect never
changes the pose, the shape or the noise of the same sample.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from core.errors import ConfigError
from trainer.synth_b.defects import DEFECT_TYPES, DefectSpec, apply_defect, draw_defect
from trainer.synth_b.noise import spectral_noise
from trainer.synth_b.objects import BUILDERS, FRAMES_AT_400, ROTATION_RAD, Instance, Surface, draw_instance
from trainer.synth_b.sensor import (
    Camera,
    Plane,
    camera_for_frame,
    colour_image,
    depth_at_height,
    draw_plane,
    dropouts,
    measure_depth,
    shadow_mask,
)

_MM = 1e-3
_PARALLAX_STEPS = 1  # fixed-point steps from the plane hit to the surface hit along each ray
MIN_SIZE_PX, MAX_SIZE_PX = 64, 1600


@dataclass(frozen=True)
class ScanB:
    """rgb_hwc_u8 (H, W, 3) uint8; xyz_hwc_m (H, W, 3) float32 camera-frame metres, (0, 0, 0) = missing;
    gt_hw_u8 (H, W) uint8 0 or 255, as the real data set's masks; camera; modality of the defect or None."""

    rgb_hwc_u8: np.ndarray
    xyz_hwc_m: np.ndarray
    gt_hw_u8: np.ndarray
    camera: Camera
    defect: str | None


def frames_for(class_name: str, size_px: int) -> tuple[tuple[int, int], ...]:
    """The (width, height) frames of a class when its largest frame's longer side is `size_px`."""
    scale = size_px / 400
    return tuple((8 * round(w * scale / 8), 8 * round(h * scale / 8)) for w, h in FRAMES_AT_400[class_name])


def _streams(rng_seed: int) -> dict[str, np.random.Generator]:
    names = ("frame", "pose", "shape", "defect", "sensor", "colour", "background")
    children = np.random.SeedSequence([rng_seed, zlib.crc32(b"family-b")]).spawn(len(names))
    return {n: np.random.default_rng(c) for n, c in zip(names, children, strict=True)}


def _plane_coords(points: np.ndarray, plane: Plane) -> tuple[np.ndarray, np.ndarray]:
    return points @ plane.e1, points @ plane.e2


def _to_object(
    p: np.ndarray, q: np.ndarray, centre: np.ndarray, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    dp, dq = p - centre[0], q - centre[1]
    return c * dp + s * dq, -s * dp + c * dq


@dataclass(frozen=True)
class _Geometry:
    rays: np.ndarray
    plane: Plane
    centre_pq_m: np.ndarray
    angle_rad: float
    instance: Instance
    pixel_m: float


def _surface(
    geo: _Geometry, class_name: str, spec: DefectSpec | None
) -> tuple[Surface, np.ndarray, np.ndarray, np.ndarray]:
    """Surface at each pixel's ray hit (with the defect), its (u, v) object coordinates and defect mask."""
    height = np.zeros(geo.rays.shape[:2])
    build = BUILDERS[class_name]
    for _ in range(_PARALLAX_STEPS + 1):
        t = depth_at_height(geo.rays, geo.plane, height)
        foot = geo.rays * t[..., None] - height[..., None] * geo.plane.normal  # hit projected onto the plane
        u, v = _to_object(*_plane_coords(foot, geo.plane), geo.centre_pq_m, geo.angle_rad)
        surface = build(u, v, geo.instance)
        mask = np.zeros(height.shape, bool)
        if spec is not None:
            mask = apply_defect(surface, u, v, spec, geo.pixel_m)
        height = surface.height_m
    return surface, u, v, mask


def _normals(height_m: np.ndarray, plane: Plane, pixel_m: float) -> np.ndarray:
    """(H, W, 3) unit surface normals in the camera frame from the height image's gradient."""
    dh_dy, dh_dx = np.gradient(height_m, pixel_m)
    n = plane.normal[None, None, :] - dh_dx[..., None] * plane.e1 - dh_dy[..., None] * plane.e2
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def _background(rng: np.random.Generator, shape_hw: tuple[int, int]) -> np.ndarray:
    """Support surface: dark blue-grey belt with a fine weave and slow blotches."""
    fine = spectral_noise(rng, shape_hw, 2.5)
    slow = spectral_noise(rng, shape_hw, max(shape_hw) / 5)
    grey = 0.22 * (1 + 0.05 * fine + 0.06 * slow)
    return grey[..., None] * np.array([0.95, 1.0, 1.15])


def _shade(
    albedo: np.ndarray, specular: np.ndarray, shininess: float, normals: np.ndarray, view: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Linear radiance (H, W, 3) under a coaxial ring light and a key light from the upper right, and the
    glint strength (H, W) the depth sensor saturates on."""
    key = np.array([0.45, -0.35, -0.82])
    key /= np.linalg.norm(key)
    lights = ((-view, 0.55), (np.broadcast_to(key, normals.shape), 0.45))
    diffuse = np.full(normals.shape[:2], 0.18)
    glint = np.zeros(normals.shape[:2])
    for direction, power in lights:
        n_dot_l = np.clip((normals * direction).sum(-1), 0, None)
        diffuse += power * n_dot_l
        half = direction - view
        half /= np.linalg.norm(half, axis=-1, keepdims=True)
        glint += power * np.clip((normals * half).sum(-1), 0, None) ** shininess
    spec = specular * glint
    return albedo * diffuse[..., None] + spec[..., None], spec


def _pick_centre(
    rng: np.random.Generator, surface: Surface, u: np.ndarray, v: np.ndarray
) -> tuple[float, float]:
    rows, cols = np.nonzero(surface.placeable)
    if len(rows) == 0:
        raise ConfigError("no placeable surface for a defect (frame too small?)")
    i = rng.integers(len(rows))
    return float(u[rows[i], cols[i]]), float(v[rows[i], cols[i]])


def render_scan(class_name: str, rng_seed: int, defect: str | None, size_px: int = 400) -> ScanB:
    """One scan of `class_name`; `defect` is None or one of DEFECT_TYPES[class_name]."""
    if class_name not in BUILDERS:
        raise ConfigError(f"unknown family-B class {class_name!r}; known: {', '.join(BUILDERS)}")
    if defect is not None and defect not in DEFECT_TYPES[class_name]:
        raise ConfigError(
            f"{class_name} has no defect {defect!r}; known: {', '.join(DEFECT_TYPES[class_name])}"
        )
    if not MIN_SIZE_PX <= size_px <= MAX_SIZE_PX:
        raise ConfigError(f"size must lie in [{MIN_SIZE_PX}, {MAX_SIZE_PX}] px, got {size_px}")
    rng = _streams(rng_seed)
    frames = frames_for(class_name, size_px)
    width, height = frames[rng["frame"].integers(len(frames))]
    camera = camera_for_frame(width, height)
    plane = draw_plane(rng["pose"])
    rays = camera.rays()
    pixel_m = plane.d_m / camera.f_px
    centre_px = np.array([camera.cx_px, camera.cy_px])
    p0, q0 = _plane_coords(rays[int(centre_px[1]), int(centre_px[0])] * plane.d_m, plane)
    jitter = rng["pose"].uniform(-2.5, 2.5, 2) * _MM
    angle = float(rng["pose"].uniform(-1, 1) * ROTATION_RAD[class_name])
    geo = _Geometry(rays, plane, np.array([p0, q0]) + jitter, angle, draw_instance(rng["shape"]), pixel_m)

    spec = None
    if defect is not None:
        base, u, v, _ = _surface(geo, class_name, None)
        spec = draw_defect(rng["defect"], class_name, defect, _pick_centre(rng["defect"], base, u, v))
    surface, _, _, mask = _surface(geo, class_name, spec)

    on = surface.on_object
    albedo = np.where(on[..., None], surface.albedo_rgb, _background(rng["background"], (height, width)))
    specular = np.where(on, surface.specular, 0.04)
    t_true = depth_at_height(rays, plane, surface.height_m)
    points = rays * t_true[..., None]
    view = points / np.linalg.norm(points, axis=-1, keepdims=True)
    normals = _normals(surface.height_m, plane, pixel_m)
    radiance, glint = _shade(albedo, specular, surface.shininess if on.any() else 8.0, normals, view)
    cos_view = np.clip(-(normals * view).sum(-1), 0, 1)

    sensor = rng["sensor"]
    t_meas = measure_depth(sensor, t_true, cos_view)
    missing = dropouts(sensor, shadow_mask(surface.height_m, pixel_m), albedo.mean(-1), glint, cos_view)
    xyz = (rays * t_meas[..., None]).astype(np.float32)
    xyz[missing] = 0.0
    rgb = colour_image(rng["colour"], radiance)
    gt = np.where(mask & on, 255, 0).astype(np.uint8)
    return ScanB(rgb, xyz, gt, camera, defect)
