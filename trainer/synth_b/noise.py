"""Random fields for family B, written independently of trainer/synth: spectrally shaped Gaussian noise.

A field is white noise filtered in the Fourier domain by a power law, which gives fibre, pore and stain
textures with a chosen grain size (in pixels) without the lattice artefacts of value noise.
"""

from __future__ import annotations

import numpy as np


def spectral_noise(
    rng: np.random.Generator, shape_hw: tuple[int, int], grain_px: float, exponent: float = 2.0
) -> np.ndarray:
    """(H, W) float64 noise, zero mean and unit sd, whose features are about `grain_px` pixels across.

    The amplitude spectrum is 1 / (1 + (f * grain_px)^exponent): flat below 1/grain_px, falling above it.
    """
    h, w = shape_hw
    white = rng.standard_normal((h, w))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    radius = np.hypot(fy, fx)
    gain = 1.0 / (1.0 + (radius * max(grain_px, 1.0)) ** exponent)
    gain[0, 0] = 0.0  # zero mean
    field = np.fft.irfft2(np.fft.rfft2(white) * gain, s=(h, w))
    sd = field.std()
    return field / sd if sd > 0 else field


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at edge0 to 1 at edge1 (either order), elementwise."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def rounded_box_sdf(u: np.ndarray, v: np.ndarray, half_u: float, half_v: float, radius: float) -> np.ndarray:
    """Signed distance (same units as u, v) to a rounded rectangle centred at 0; negative inside."""
    qu = np.abs(u) - (half_u - radius)
    qv = np.abs(v) - (half_v - radius)
    outside = np.hypot(np.maximum(qu, 0.0), np.maximum(qv, 0.0))
    return outside + np.minimum(np.maximum(qu, qv), 0.0) - radius
