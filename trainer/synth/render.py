"""Render one simulated structured-light scan: ray-cast an object heightfield on a tilted plane.

Per pixel: intersect the camera ray with the object heightfield (marching in height, then bisection),
test the hit against the projector for occlusion shadows, shade RGB with the projector as the light
(as on sensors whose colour image is lit by their own projector), and add depth noise and dropouts.
Random streams are split by purpose, so a defect never changes the draws of pose, shape or sensor noise.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt

from core.errors import ConfigError
from trainer.synth.camera import HALF_FOV_RAD, Scene, camera_for_size, pixel_rays, pixel_size_m, sample_scene
from trainer.synth.defects import DEFECT_TYPES, apply_defect, defect_ids
from trainer.synth.fields import sample_bilinear, sample_nearest, value_noise
from trainer.synth.shapes import BUILDERS, ObjectModel

_MM = 1e-3
_MARCH_STEP_M = 0.6 * _MM
_OBJECT_MIN_HEIGHT_M = 0.1 * _MM
_DEFECT_RISE_M = 1.5 * _MM  # margin above the defect-free object for raised defects (bumps <= 1 mm)
MIN_SIZE_PX, MAX_SIZE_PX = 32, 2048


@dataclass(frozen=True)
class RenderedScan:
    """One scan. rgb_hwc_u8 (H, W, 3) uint8; xyz_hwc_m (H, W, 3) float32 camera-frame metres, (0,0,0) =
    missing; gt_ids_hw (H, W) uint8 defect id (0 = normal); object_mask_hw (H, W) bool, pixels whose ray
    hits the object (valid or not); plane (4,) float64 (a, b, c, d) of the support plane, unit normal."""

    rgb_hwc_u8: np.ndarray
    xyz_hwc_m: np.ndarray
    gt_ids_hw: np.ndarray
    object_mask_hw: np.ndarray
    plane: np.ndarray


@dataclass(frozen=True)
class Pose:
    """Object placement in plane coordinates: centre (p, q) metres and rotation about the normal."""

    centre_pq_m: np.ndarray
    angle_rad: float

    def to_grid(self, p: np.ndarray, q: np.ndarray, model: ObjectModel) -> tuple[np.ndarray, np.ndarray]:
        """Plane coordinates -> float (row, col) indices of the object grid."""
        c, s = np.cos(self.angle_rad), np.sin(self.angle_rad)
        dp, dq = p - self.centre_pq_m[0], q - self.centre_pq_m[1]
        centre = (model.height_m.shape[0] - 1) / 2
        return (-s * dp + c * dq) / model.cell_m + centre, (c * dp + s * dq) / model.cell_m + centre


@dataclass(frozen=True)
class _Hits:
    """Per-pixel ray hits, all (H, W): depth_m (z), height_m above the plane, row/col on the object grid."""

    depth_m: np.ndarray
    height_m: np.ndarray
    row: np.ndarray
    col: np.ndarray
    on_object: np.ndarray


def _dot(vectors: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """(..., 3) . (3,) -> (...). Written out so no BLAS call (thread-count dependent, slow when shared)."""
    return vectors[..., 0] * direction[0] + vectors[..., 1] * direction[1] + vectors[..., 2] * direction[2]


def _streams(rng_seed: int) -> dict[str, np.random.Generator]:
    names = ("scene", "pose", "shape", "texture", "plane", "sensor")
    children = np.random.SeedSequence(rng_seed).spawn(len(names))
    return {name: np.random.default_rng(child) for name, child in zip(names, children, strict=True)}


def _sample_pose(rng: np.random.Generator, scene: Scene, model: ObjectModel) -> Pose:
    """Random position near the optical axis (keeping the image borders on the plane) and rotation."""
    axis_point = np.array([0.0, 0.0, scene.offset_m / -scene.normal[2]])
    axis_pq = np.array([axis_point @ scene.e1, axis_point @ scene.e2])
    view_half_m = scene.offset_m * np.tan(HALF_FOV_RAD)
    max_shift_m = np.clip(view_half_m - model.half_extent_m - 4 * _MM, 0.0, 8 * _MM)
    radius, angle = max_shift_m * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
    shift = radius * np.array([np.cos(angle), np.sin(angle)])
    return Pose(axis_pq + shift, float(rng.uniform(0, 2 * np.pi)))


def _near_object(
    model: ObjectModel, pose: Pose, distance_m: np.ndarray, start_pq: tuple, end_pq: tuple
) -> np.ndarray:
    """Bool per segment (start -> end, plane coordinates): whether it can pass over the object.

    True when the segment's midpoint lies within half its length of the footprint (`distance_m`: (G, G)
    metres to the nearest object cell); lookups clamp to the grid edge, which only adds candidates.
    """
    mid_p, mid_q = 0.5 * (start_pq[0] + end_pq[0]), 0.5 * (start_pq[1] + end_pq[1])
    half_m = 0.5 * np.hypot(end_pq[0] - start_pq[0], end_pq[1] - start_pq[1])
    row, col = pose.to_grid(mid_p, mid_q, model)
    return sample_nearest(distance_m, row, col) <= half_m + 2 * model.cell_m


def _march(scene: Scene, pose: Pose, model: ObjectModel, rays_n3: np.ndarray, s_max_m: float) -> np.ndarray:
    """Height (N,) where each ray first meets the heightfield (0 where it reaches the bare plane)."""
    ray_n, ray_p, ray_q = _dot(rays_n3, scene.normal), _dot(rays_n3, scene.e1), _dot(rays_n3, scene.e2)

    def below(idx: np.ndarray, s: np.ndarray | float) -> np.ndarray:
        t = (s - scene.offset_m) / ray_n[idx]
        row, col = pose.to_grid(t * ray_p[idx], t * ray_q[idx], model)
        return s <= sample_bilinear(model.height_m, row, col)

    upper = np.full(len(rays_n3), s_max_m)
    lower = np.zeros(len(rays_n3))
    active = np.arange(len(rays_n3))
    for k in range(1, int(np.ceil(s_max_m / _MARCH_STEP_M)) + 1):  # march down; vectorised over rays
        s = max(s_max_m - k * _MARCH_STEP_M, 0.0)
        hit = below(active, s)
        lower[active[hit]] = s
        upper[active[~hit]] = s
        active = active[~hit]
        if len(active) == 0:
            break
    idx = np.arange(len(rays_n3))
    for _ in range(8):  # bisection: `upper` stays above the surface, `lower` on or below it
        mid = 0.5 * (upper + lower)
        hit = below(idx, mid)
        lower = np.where(hit, mid, lower)
        upper = np.where(hit, upper, mid)
    return lower


def cast_rays(
    rays_hw3: np.ndarray, scene: Scene, pose: Pose, model: ObjectModel, distance_m: np.ndarray, s_max_m: float
) -> _Hits:
    """Intersect every pixel ray with plane + object; only rays that can cross the object are marched.

    `s_max_m` (above every surface) fixes the march schedule, so a defect leaves other hits bit-identical.
    """
    ray_n, ray_p, ray_q = _dot(rays_hw3, scene.normal), _dot(rays_hw3, scene.e1), _dot(rays_hw3, scene.e2)
    t_low, t_high = -scene.offset_m / ray_n, (s_max_m - scene.offset_m) / ray_n
    candidate = _near_object(
        model, pose, distance_m, (t_low * ray_p, t_low * ray_q), (t_high * ray_p, t_high * ray_q)
    )
    height_m = np.zeros(ray_n.shape)
    height_m[candidate] = _march(scene, pose, model, rays_hw3[candidate], s_max_m)
    on_object = height_m > _OBJECT_MIN_HEIGHT_M
    height_m = np.where(on_object, height_m, 0.0)
    depth_m = (height_m - scene.offset_m) / ray_n
    row, col = pose.to_grid(depth_m * ray_p, depth_m * ray_q, model)
    return _Hits(depth_m, height_m, row, col, on_object)


def _shadowed(
    points_hw3: np.ndarray,
    hits: _Hits,
    scene: Scene,
    pose: Pose,
    model: ObjectModel,
    distance_m: np.ndarray,
    s_max_m: float,
) -> np.ndarray:
    """(H, W) bool: the projector cannot see the hit point because the object is in the way."""
    points_n3 = points_hw3.reshape(-1, 3)
    towards_n3 = scene.projector_m[None, :] - points_n3
    rise = _dot(towards_n3, scene.normal)  # height gained per unit of the towards vector (> 0)
    p0, q0 = _dot(points_n3, scene.e1), _dot(points_n3, scene.e2)
    dp, dq = _dot(towards_n3, scene.e1), _dot(towards_n3, scene.e2)
    start = hits.height_m.reshape(-1)
    reach = np.clip(s_max_m - start, 0, None) / rise
    candidate = _near_object(model, pose, distance_m, (p0, q0), (p0 + reach * dp, q0 + reach * dq))
    active = np.flatnonzero(candidate & (start < s_max_m))
    shadow = np.zeros(len(start), bool)
    for k in range(1, int(np.ceil(s_max_m / _MARCH_STEP_M)) + 1):
        s = start[active] + k * _MARCH_STEP_M
        lam = (s - start[active]) / rise[active]
        row, col = pose.to_grid(p0[active] + lam * dp[active], q0[active] + lam * dq[active], model)
        blocked = sample_bilinear(model.height_m, row, col) > s + 0.1 * _MM
        shadow[active[blocked]] = True
        active = active[~blocked & (s + _MARCH_STEP_M < s_max_m)]
        if len(active) == 0:
            break
    return shadow.reshape(hits.depth_m.shape)


def _normals(hits: _Hits, scene: Scene, pose: Pose, model: ObjectModel) -> np.ndarray:
    """(H, W, 3) unit surface normals in the camera frame (the plane normal off the object)."""
    grad_b, grad_a = np.gradient(model.height_m, model.cell_m)
    idx = hits.on_object
    ga = sample_bilinear(grad_a, hits.row[idx], hits.col[idx])
    gb = sample_bilinear(grad_b, hits.row[idx], hits.col[idx])
    c, s = np.cos(pose.angle_rad), np.sin(pose.angle_rad)
    normal_p, normal_q = -(c * ga - s * gb), -(s * ga + c * gb)
    normals = np.broadcast_to(scene.normal, hits.depth_m.shape + (3,)).copy()
    obj = normal_p[:, None] * scene.e1 + normal_q[:, None] * scene.e2 + scene.normal
    normals[idx] = obj / np.linalg.norm(obj, axis=1, keepdims=True)
    return normals


def _plane_albedo(rng: np.random.Generator, shape_hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) matte grey support with blotches and fine grain (image-space texture)."""
    base = rng.uniform(0.16, 0.30) * (1.0 + rng.normal(0, 0.04, 3))
    blotch = value_noise(rng, shape_hw, 5, octaves=3)
    grain = value_noise(rng, shape_hw, max(8, min(shape_hw) // 4), octaves=1)
    return base[None, None, :] * (1.0 + 0.10 * blotch + 0.06 * grain)[..., None]


def _shade(
    albedo: np.ndarray,
    normals: np.ndarray,
    points: np.ndarray,
    lit: np.ndarray,
    scene: Scene,
    specular_hw: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Linear radiance (H, W, 3) (ambient + Lambert + Blinn-Phong from the projector light) and the
    highlight alone (H, W), which decides glints independently of the colour."""
    to_light = scene.projector_m - points
    to_light /= np.linalg.norm(to_light, axis=-1, keepdims=True)
    to_eye = -points / np.linalg.norm(points, axis=-1, keepdims=True)
    half = to_light + to_eye
    half /= np.linalg.norm(half, axis=-1, keepdims=True)
    lambert = np.clip(np.sum(normals * to_light, axis=-1), 0, None) * lit
    highlight = specular_hw * np.clip(np.sum(normals * half, axis=-1), 0, None) ** 200 * lit
    return albedo * (0.3 + 0.75 * lambert)[..., None] + highlight[..., None], highlight


def _depth_jumps(depth_m: np.ndarray, jump_m: float) -> np.ndarray:
    """(H, W) bool: a 4-neighbour differs in depth by more than `jump_m` (an occlusion edge)."""
    jumps = np.zeros(depth_m.shape, bool)
    dy = np.abs(np.diff(depth_m, axis=0)) > jump_m
    dx = np.abs(np.diff(depth_m, axis=1)) > jump_m
    jumps[1:] |= dy
    jumps[:-1] |= dy
    jumps[:, 1:] |= dx
    jumps[:, :-1] |= dx
    return jumps


def _dropouts(
    rng: np.random.Generator,
    hits: _Hits,
    normals: np.ndarray,
    points: np.ndarray,
    scene: Scene,
    glint_hw: np.ndarray,
) -> np.ndarray:
    """(H, W) bool of missing points: grazing angles, occlusion edges, glints and random speckle."""
    to_eye = -points / np.linalg.norm(points, axis=-1, keepdims=True)
    to_proj = scene.projector_m - points
    to_proj /= np.linalg.norm(to_proj, axis=-1, keepdims=True)
    grazing = np.minimum(np.sum(normals * to_eye, -1), np.sum(normals * to_proj, -1))
    uniform = rng.uniform(size=(3,) + hits.depth_m.shape)
    drop = uniform[0] < np.clip((0.35 - grazing) / 0.25, 0, 0.95)
    drop |= _depth_jumps(hits.depth_m, 1.5 * _MM) & (uniform[1] < 0.6)
    drop |= uniform[2] < 0.002 + 0.25 * glint_hw
    return drop


def _measure_xyz(rng: np.random.Generator, hits: _Hits, rays: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32: depth with depth- and angle-dependent noise, back-projected through the rays."""
    cos_view = np.abs(np.sum(normals * rays, -1)) / np.linalg.norm(rays, axis=-1)
    sigma_m = 0.12 * _MM * (hits.depth_m / 0.4) ** 2 * (1.0 + 2.0 * (1.0 - cos_view))
    ripple_m = 0.04 * _MM * value_noise(rng, hits.depth_m.shape, 6, octaves=2)  # fringe-phase bias
    depth_m = hits.depth_m + ripple_m + sigma_m * rng.standard_normal(hits.depth_m.shape)
    return (depth_m[..., None] * rays).astype(np.float32)


def _camera_image(rng: np.random.Generator, radiance: np.ndarray, cam_shape: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8: exposure, white balance, vignetting and read noise applied to the radiance."""
    gain = rng.uniform(0.9, 1.1) * (1.0 + rng.normal(0, 0.02, 3))
    rows, cols = np.mgrid[0 : cam_shape[0], 0 : cam_shape[1]]
    radius2 = ((rows - cam_shape[0] / 2) ** 2 + (cols - cam_shape[1] / 2) ** 2) / (0.25 * sum(cam_shape) ** 2)
    image = radiance * gain * (1.0 - 0.25 * radius2)[..., None]
    image = image + rng.normal(0, 0.008, image.shape)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def _validate(class_name: str, defect: str | None, width_px: int, height_px: int) -> None:
    if class_name not in BUILDERS:
        raise ConfigError(f"unknown synthetic class {class_name!r}; known: {', '.join(BUILDERS)}")
    if defect is not None and defect not in DEFECT_TYPES[class_name]:
        known = ", ".join(DEFECT_TYPES[class_name])
        raise ConfigError(f"class {class_name!r} has no defect {defect!r}; known: {known}")
    for size in (width_px, height_px):
        if not MIN_SIZE_PX <= size <= MAX_SIZE_PX:
            raise ConfigError(f"image sides must lie in [{MIN_SIZE_PX}, {MAX_SIZE_PX}] px, got {size}")


def render_sample(
    class_name: str, rng_seed: int, defect: str | None = None, width_px: int = 400, height_px: int = 400
) -> RenderedScan:
    """Render one scan of `class_name`, with `defect` (a name from DEFECT_TYPES) or normal when None.

    The same seed gives the same pose, shape, texture and sensor noise with or without a defect, so a
    defect's effect is the difference of the two renders. Raises ConfigError for unknown names or sizes.
    """
    _validate(class_name, defect, width_px, height_px)
    streams = _streams(rng_seed)
    cam = camera_for_size(width_px, height_px)
    rays = pixel_rays(cam)
    scene = sample_scene(streams["scene"])
    pixel_m = pixel_size_m(cam, scene.offset_m)
    model = BUILDERS[class_name](
        streams["shape"], streams["texture"], float(np.clip(0.7 * pixel_m, 1e-4, 1.5e-3))
    )
    pose = _sample_pose(streams["pose"], scene, model)
    changed = np.zeros(model.height_m.shape, bool)
    s_max_m = float(model.height_m.max()) + _DEFECT_RISE_M  # from the defect-free shape, see cast_rays
    if defect is not None:
        defect_rng = np.random.default_rng([rng_seed, zlib.crc32(defect.encode())])
        model, changed = apply_defect(model, defect, defect_rng, pixel_m)
    distance_m = distance_transform_edt(model.height_m <= 0) * model.cell_m
    hits = cast_rays(rays, scene, pose, model, distance_m, s_max_m)
    points = hits.depth_m[..., None] * rays
    normals = _normals(hits, scene, pose, model)
    shadow = _shadowed(points, hits, scene, pose, model, distance_m, s_max_m)
    albedo = _plane_albedo(streams["plane"], hits.depth_m.shape)
    idx = hits.on_object
    albedo[idx] = sample_bilinear(model.albedo_rgb, hits.row[idx], hits.col[idx])
    specular_hw = np.where(idx, model.specular, 0.0)
    radiance, highlight = _shade(albedo, normals, points, (~shadow).astype(float), scene, specular_hw)
    glint = np.clip(2.0 * highlight - 0.3, 0, 1)  # saturated fringes: no depth there
    sensor = streams["sensor"]
    xyz = _measure_xyz(sensor, hits, rays, normals)
    missing = shadow | _dropouts(sensor, hits, normals, points, scene, glint)
    xyz[missing] = 0.0
    rgb = _camera_image(sensor, radiance, hits.depth_m.shape)
    gt = np.zeros(hits.depth_m.shape, np.uint8)
    if defect is not None:
        gt[idx & sample_nearest(changed, hits.row, hits.col)] = defect_ids(class_name)[defect]
    return RenderedScan(rgb, xyz, gt, idx.copy(), scene.plane_coefficients)
