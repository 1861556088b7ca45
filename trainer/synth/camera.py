"""Sensor geometry of the simulated structured-light scanner: pinhole camera, projector and support plane.

Everything is in the camera frame (metres, +z along the optical axis). The renderer casts one ray per
pixel through these intrinsics and back-projects the measured depth along the same rays, so xyz files
hold camera-frame points as MVTec 3D-AD does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Similar to MVTec 3D-AD's sensor: 3.75 um pixels, a 9.6 degree field of view.
PIXEL_PITCH_M = 3.75e-6
HALF_FOV_RAD = np.deg2rad(4.8)  # across the shorter image side


@dataclass(frozen=True)
class PinholeCamera:
    """Pinhole intrinsics in pixels (no distortion); pixel centres sit at integer coordinates."""

    width_px: int
    height_px: int
    fx_px: float
    fy_px: float
    cx_px: float
    cy_px: float

    def to_parameters(self) -> dict[str, float | int | str]:
        """The calibration/camera_parameters.json content: MVTec-style keys plus explicit pixel intrinsics."""
        return {
            "camera_type": "pinhole",
            "focus": self.fx_px * PIXEL_PITCH_M,  # focal length in metres
            "sx": PIXEL_PITCH_M,
            "sy": PIXEL_PITCH_M,
            "kappa": 0.0,
            "cx": self.cx_px,
            "cy": self.cy_px,
            "fx_px": self.fx_px,
            "fy_px": self.fy_px,
            "image_width": self.width_px,
            "image_height": self.height_px,
        }


def camera_for_size(width_px: int, height_px: int) -> PinholeCamera:
    """A camera whose field of view over the shorter side is fixed, so geometry scales with resolution."""
    focal_px = 0.5 * min(width_px, height_px) / np.tan(HALF_FOV_RAD)
    return PinholeCamera(width_px, height_px, focal_px, focal_px, (width_px - 1) / 2, (height_px - 1) / 2)


def pixel_rays(cam: PinholeCamera) -> np.ndarray:
    """(H, W, 3) float64 ray directions scaled to z = 1, so a point at depth z is z * ray."""
    cols = (np.arange(cam.width_px) - cam.cx_px) / cam.fx_px
    rows = (np.arange(cam.height_px) - cam.cy_px) / cam.fy_px
    rays = np.empty((cam.height_px, cam.width_px, 3))
    rays[..., 0] = cols[None, :]
    rays[..., 1] = rows[:, None]
    rays[..., 2] = 1.0
    return rays


def pixel_size_m(cam: PinholeCamera, depth_m: float) -> float:
    """Footprint of one pixel on a fronto-parallel surface at `depth_m`, in metres."""
    return depth_m / cam.fx_px


@dataclass(frozen=True)
class Scene:
    """Support plane and projector of one capture, camera frame.

    The plane is normal . X + offset_m = 0 with the unit normal pointing at the camera (offset_m > 0 is the
    camera's distance to the plane). e1/e2 span the plane; plane coordinates (p, q) of a point X are
    (X . e1, X . e2), and its height above the plane is normal . X + offset_m.
    """

    normal: np.ndarray  # (3,)
    offset_m: float
    e1: np.ndarray  # (3,)
    e2: np.ndarray  # (3,)
    projector_m: np.ndarray  # (3,) projector (and light) position

    @property
    def plane_coefficients(self) -> np.ndarray:
        """(4,) float64 (a, b, c, d) with unit normal."""
        return np.array([*self.normal, self.offset_m])


def sample_scene(rng: np.random.Generator) -> Scene:
    """Camera 0.33-0.45 m above a plane tilted 1.5-4.5 degrees; projector ~10 cm beside the camera."""
    distance_m = rng.uniform(0.33, 0.45)
    tilt = np.deg2rad(rng.uniform(1.5, 4.5))
    azimuth = rng.uniform(0, 2 * np.pi)
    normal = np.array([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), -np.cos(tilt)])
    e1 = np.cross(np.array([0.0, 1.0, 0.0]), normal)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(normal, e1)
    baseline_angle = rng.uniform(-0.3, 0.3)
    baseline_m = rng.uniform(0.08, 0.11)
    projector = np.array([baseline_m * np.cos(baseline_angle), baseline_m * np.sin(baseline_angle), 0.0])
    return Scene(normal, float(distance_m), e1, e2, projector)
