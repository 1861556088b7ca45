"""Family B's scanner: a fringe-projection sensor with a Bayer colour camera, modelled in image space.

Differences from trainer/synth's sensor, on purpose: a narrower lens with an off-centre principal point,
the projector on one fixed side (shadows fall to one side only), depth noise growing with z^2 and with
grazing incidence, a periodic fringe-phase error, depth quantisation, flying pixels at depth jumps,
dropouts on dark albedo, specular glints and steep slopes, speckle and clustered holes, and a Bayer mosaic
with bilinear demosaicing, vignetting and shot noise on the RGB side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_dilation, convolve, maximum_filter, minimum_filter

from trainer.synth_b.noise import spectral_noise

_MM = 1e-3
FOV_LONG_M_AT_300MM = 0.064  # the longer image side spans 64 mm at the nominal 0.30 m standoff
PROJECTOR_TAN = 0.28  # horizontal offset / height of the projector ray (~16 degrees), from the left


@dataclass(frozen=True)
class Camera:
    """Pinhole intrinsics in pixels for a (width_px, height_px) frame."""

    width_px: int
    height_px: int
    f_px: float
    cx_px: float
    cy_px: float

    def rays(self) -> np.ndarray:
        """(H, W, 3) float64 ray directions with z = 1."""
        xs = (np.arange(self.width_px) - self.cx_px) / self.f_px
        ys = (np.arange(self.height_px) - self.cy_px) / self.f_px
        rays = np.ones((self.height_px, self.width_px, 3))
        rays[..., 0] = xs[None, :]
        rays[..., 1] = ys[:, None]
        return rays

    def to_parameters(self) -> dict[str, float | int | str]:
        """camera_parameters.json, MVTec-style keys (focal length in metres, pixel pitch 3.45 um)."""
        pitch = 3.45e-6
        return {
            "camera_type": "pinhole",
            "focus": self.f_px * pitch,
            "sx": pitch,
            "sy": pitch,
            "kappa": 0.0,
            "cx": self.cx_px,
            "cy": self.cy_px,
            "image_width": self.width_px,
            "image_height": self.height_px,
        }


def camera_for_frame(width_px: int, height_px: int) -> Camera:
    """Fixed field of view over the longer side; the principal point sits 1.5 % off centre (calibrated)."""
    f_px = max(width_px, height_px) * 0.30 / FOV_LONG_M_AT_300MM
    return Camera(width_px, height_px, f_px, 0.515 * (width_px - 1), 0.49 * (height_px - 1))


@dataclass(frozen=True)
class Plane:
    """Support plane n . X + d = height above the plane; n (3,) is the unit normal towards the camera.

    e1, e2 (3,) span the plane, chosen close to the camera's x and y axes so image axes ~ plane axes.
    """

    normal: np.ndarray
    d_m: float
    e1: np.ndarray
    e2: np.ndarray


def draw_plane(rng: np.random.Generator) -> Plane:
    """0.28-0.32 m standoff, tilt up to 3 degrees in any direction."""
    tilt, azimuth = np.deg2rad(rng.uniform(0.0, 3.0)), rng.uniform(0, 2 * np.pi)
    normal = -np.array([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), np.cos(tilt)])
    e1 = np.array([1.0, 0.0, 0.0]) - normal[0] * normal
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(normal, e1)
    if e2[1] < 0:
        e2 = -e2
    return Plane(normal, float(rng.uniform(0.28, 0.32)), e1, e2)


def depth_at_height(rays: np.ndarray, plane: Plane, height_m: np.ndarray) -> np.ndarray:
    """(H, W) ray parameter t (= z, rays have z = 1) of the point at `height_m` above the plane."""
    n_dot_r = rays @ plane.normal
    return (height_m - plane.d_m) / n_dot_r


def shadow_mask(height_m: np.ndarray, pixel_m: float) -> np.ndarray:
    """(H, W) bool: points the projector (on the left) cannot see, by a running horizon along each row.

    A point at column x is lit unless some point to its left rises above the projector ray through it:
    h(x') - (x - x') * pixel / tan > h(x), i.e. g(x') > g(x) for g = h + x * pixel / tan.
    """
    cols = np.arange(height_m.shape[1]) * (pixel_m / PROJECTOR_TAN)
    g = height_m + cols[None, :]
    horizon = np.maximum.accumulate(g, axis=1)
    horizon = np.concatenate([np.full((g.shape[0], 1), -np.inf), horizon[:, :-1]], axis=1)
    return horizon > g + 0.15 * _MM


def measure_depth(rng: np.random.Generator, t_m: np.ndarray, cos_incidence: np.ndarray) -> np.ndarray:
    """Noisy depth: z^2 and grazing-angle scaled Gaussian noise, fringe-phase ripple, slow warp, 5 um steps,
    and flying pixels (mixtures of foreground and background) at depth jumps over 1.5 mm."""
    h, w = t_m.shape
    sigma = 0.025 * _MM * (t_m / 0.30) ** 2 / np.clip(cos_incidence, 0.3, 1.0)
    ripple = 0.012 * _MM * np.sin(2 * np.pi * np.arange(w) / 9.0 + rng.uniform(0, 2 * np.pi))[None, :]
    warp = 0.03 * _MM * spectral_noise(rng, (h, w), grain_px=max(h, w) / 3)
    t = t_m + sigma * rng.standard_normal((h, w)) + ripple + warp
    lo, hi = minimum_filter(t_m, size=3), maximum_filter(t_m, size=3)
    flying = (hi - lo > 1.5 * _MM) & (rng.random((h, w)) < 0.35)
    mix = rng.uniform(0.15, 0.85, (h, w))
    t = np.where(flying, lo + mix * (hi - lo), t)
    return np.round(t / (5e-6)) * 5e-6


def dropouts(
    rng: np.random.Generator,
    shadow: np.ndarray,
    albedo_lum: np.ndarray,
    glint: np.ndarray,
    cos_view: np.ndarray,
) -> np.ndarray:
    """(H, W) bool missing pixels: shadow (one pixel wider: the fringe decoder fails at its edge), dark
    surfaces, saturating glints, steep slopes, speckle and clustered holes."""
    h, w = shadow.shape
    missing = binary_dilation(shadow, iterations=1)
    missing |= (albedo_lum < 0.08) & (rng.random((h, w)) < 0.5)
    missing |= rng.random((h, w)) < np.clip((glint - 0.2) / 0.3, 0.0, 0.9)  # saturated fringes
    missing |= cos_view < 0.22
    missing |= rng.random((h, w)) < 0.002
    missing |= spectral_noise(rng, (h, w), grain_px=5.0) > 3.0
    return missing


_BAYER_G = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]]) / 4.0
_BAYER_RB = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 4.0


def colour_image(rng: np.random.Generator, radiance_rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 from linear radiance: vignetting, exposure, an RGGB mosaic with shot and read
    noise, bilinear demosaicing, then gamma 1/2.2."""
    h, w, _ = radiance_rgb.shape
    yy, xx = np.mgrid[0:h, 0:w]
    r2 = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (0.5 * max(h, w)) ** 2
    gain = rng.uniform(0.92, 1.08) * np.clip(rng.normal(1.0, 0.03, 3), 0.9, 1.1)
    linear = radiance_rgb * gain * (1 - 0.18 * r2)[..., None]
    masks = np.zeros((h, w, 3), bool)
    masks[0::2, 0::2, 0] = True
    masks[0::2, 1::2, 1] = True
    masks[1::2, 0::2, 1] = True
    masks[1::2, 1::2, 2] = True
    mosaic = (linear * masks).sum(axis=-1)
    electrons = 4000.0
    # Shot noise as a Gaussian of the Poisson's sd: a fixed number of draws per pixel, so a defect (a change
    # of radiance) never shifts the noise of the pixels after it, as Poisson rejection sampling would.
    shot = np.sqrt(np.clip(mosaic, 0, 2) / electrons)
    mosaic = mosaic + shot * rng.standard_normal((h, w)) + rng.normal(0, 0.004, (h, w))
    out = np.empty((h, w, 3))
    for c, kernel in ((0, _BAYER_RB), (1, _BAYER_G), (2, _BAYER_RB)):
        out[..., c] = convolve(mosaic * masks[..., c], kernel, mode="mirror")
    srgb = np.clip(out, 0, 1) ** (1 / 2.2)
    return np.round(srgb * 255).astype(np.uint8)
