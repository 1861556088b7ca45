"""Memory-bank scoring on the station (spec §6): exact kNN, PatchCore reweighting, map upsampling and blur.

Sits between feature extraction and decision-layer fusion: `score_bank` turns one bank's patch grid into an
image score and a (224, 224) anomaly map. numpy + scipy only, float32, vectorised BLAS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from core.config import ScoreConfig
from core.errors import ConfigError, InputError, ShapeError

__all__ = [
    "BankScore",
    "MemoryBank",
    "gaussian_blur",
    "nearest_neighbours",
    "normalise_features",
    "reweighted_image_score",
    "score_bank",
    "upsample_bilinear",
]


@dataclass(frozen=True, eq=False)
class MemoryBank:
    """A coreset memory bank in its own normalised feature space.

    feats_mc: (M, C) float32 rows already normalised as (raw - feat_mean_c) / feat_scale.
    grid: side of the square patch grid queries come on (28 for rgb, 56 for point/fusion).
    feat_mean_c: (C,) float32 and feat_scale: a scalar (M3DM-style, for network features) or a (C,)
    per-channel std (for hand-made descriptors whose channels have unrelated units), fitted on this bank's
    own training rows before subsampling (the original used the xyz mean and rgb std for every bank, spec
    §5; we do not).
    """

    name: str
    feats_mc: np.ndarray
    grid: int
    feat_mean_c: np.ndarray
    feat_scale: float | np.ndarray
    sq_norms_m: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        feats = np.ascontiguousarray(self.feats_mc, dtype=np.float32)
        mean = np.asarray(self.feat_mean_c, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[0] == 0:
            raise ShapeError(f"bank feats must be (M>0, C), got {feats.shape}", self.name)
        if mean.shape != (feats.shape[1],):
            raise ShapeError(f"feat_mean_c {mean.shape} does not match C={feats.shape[1]}", self.name)
        scale = np.asarray(self.feat_scale, dtype=np.float32)
        if scale.shape not in ((), (feats.shape[1],)):
            raise ShapeError(
                f"feat_scale must be a scalar or ({feats.shape[1]},), got {scale.shape}", self.name
            )
        if not (np.isfinite(scale).all() and (scale > 0).all()) or self.grid <= 0:
            raise ConfigError(f"bank {self.name!r}: feat_scale must be > 0 and grid positive")
        if not np.isfinite(feats).all():
            raise ShapeError("bank feats contain NaN or inf", self.name)
        object.__setattr__(self, "feats_mc", feats)
        object.__setattr__(self, "feat_mean_c", mean)
        object.__setattr__(self, "feat_scale", float(scale) if scale.ndim == 0 else scale)
        object.__setattr__(self, "sq_norms_m", np.einsum("mc,mc->m", feats, feats))

    @property
    def dim(self) -> int:
        return int(self.feats_mc.shape[1])


@dataclass(frozen=True, eq=False)
class BankScore:
    """One bank's result: image_score (normalised-space distance), patch_dist_hw (g, g), map_hw (S, S) f32."""

    image_score: float
    patch_dist_hw: np.ndarray
    map_hw: np.ndarray


def nearest_neighbours(
    query_nc: np.ndarray,
    bank_mc: np.ndarray,
    k: int = 1,
    bank_sq_norms: np.ndarray | None = None,
    chunk_rows: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest bank rows per query row, Euclidean.

    Args:
        query_nc: (N, C) float32 queries.
        bank_mc: (M, C) float32 bank, M >= k.
        k: neighbours per query.
        bank_sq_norms: (M,) cached ||b||², computed when None.
        chunk_rows: queries per BLAS block (bounds the (chunk, M) temporary).

    Returns:
        dist_nk (N, k) float32 ascending, idx_nk (N, k) int64.
    """
    query = np.ascontiguousarray(query_nc, dtype=np.float32)
    bank = np.ascontiguousarray(bank_mc, dtype=np.float32)
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ShapeError(f"query {query.shape} and bank {bank.shape} must be (N, C) and (M, C)")
    if not 1 <= k <= bank.shape[0]:
        raise ConfigError(f"k={k} must lie in [1, bank rows={bank.shape[0]}]")
    b_sq = np.einsum("mc,mc->m", bank, bank) if bank_sq_norms is None else bank_sq_norms
    idx_nk = np.empty((query.shape[0], k), dtype=np.int64)
    for start in range(0, query.shape[0], max(1, chunk_rows)):
        q = query[start : start + chunk_rows]
        # ||q||² is constant per row, so ranking needs only ||b||² - 2 q·b; scaling the small q block and
        # adding in place keeps it to one pass over the (chunk, M) product (memory-bound at small C).
        partial = (-2.0 * q) @ bank.T
        partial += b_sq
        if k == 1:
            idx_nk[start : start + len(q), 0] = np.argmin(partial, axis=1)
        else:
            top = np.argpartition(partial, k - 1, axis=1)[:, :k]
            order = np.argsort(np.take_along_axis(partial, top, axis=1), axis=1, kind="stable")
            idx_nk[start : start + len(q)] = np.take_along_axis(top, order, axis=1)
    # Recompute the chosen distances directly: the expanded form loses precision to cancellation
    # (and would not give exact 0 for identical rows); this costs only N·k·C.
    diff = query[:, None, :] - bank[idx_nk]
    dist_nk = np.sqrt(np.einsum("nkc,nkc->nk", diff, diff)).astype(np.float32)
    if k > 1:  # keep ascending order after the exact recomputation
        order = np.argsort(dist_nk, axis=1, kind="stable")
        dist_nk = np.take_along_axis(dist_nk, order, axis=1)
        idx_nk = np.take_along_axis(idx_nk, order, axis=1)
    return dist_nk, idx_nk


def reweighted_image_score(
    query_nc: np.ndarray,
    bank_mc: np.ndarray,
    dist_n: np.ndarray,
    idx_n: np.ndarray,
    k: int = 3,
    bank_sq_norms: np.ndarray | None = None,
) -> float:
    """PatchCore-reweighted image score (spec §6), w·s* with w = 1 - exp(s*/D) / Σ exp(d_j/D).

    Args:
        query_nc: (N, C) test patches (same space as the bank).
        bank_mc: (M, C) bank, M >= k.
        dist_n: (N,) nearest-neighbour distance per patch; idx_n: (N,) its bank row.
        k: neighbours of m* considered, m* itself included (M3DM: 3).
        bank_sq_norms: (M,) cached ||b||², computed when None.

    Returns:
        The image anomaly score (float).
    """
    if k < 2:
        raise ConfigError(f"reweighting needs k >= 2, got {k}")
    patch = int(np.argmax(dist_n))
    s_star = float(dist_n[patch])
    m_star = bank_mc[idx_n[patch]][None, :]
    _, knn_idx = nearest_neighbours(m_star, bank_mc, k=k, bank_sq_norms=bank_sq_norms)
    # The first neighbour of m* is m* itself; distances from the test patch to the other k-1.
    diff = bank_mc[knn_idx[0, 1:]].astype(np.float64) - query_nc[patch].astype(np.float64)
    d_j = np.sqrt(np.einsum("jc,jc->j", diff, diff))
    inv_root_dim = 1.0 / np.sqrt(query_nc.shape[1])
    # exp(a)/Σexp(b_j) = exp(a - m)/Σexp(b_j - m): same value, no overflow for large distances.
    top = max(s_star, float(d_j.max()))
    ratio = np.exp((s_star - top) * inv_root_dim) / np.exp((d_j - top) * inv_root_dim).sum()
    return float((1.0 - ratio) * s_star)


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float64 weights of torch bilinear interpolation, align_corners=False, no antialias."""
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    src = np.maximum(src, 0.0)  # torch clamps negative source coordinates to 0
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    weights = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(weights, (rows, lo), 1.0 - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights


def upsample_bilinear(map_hw: np.ndarray, out_size: int) -> np.ndarray:
    """Resize (h, w) to (out_size, out_size) float32 as torch bilinear F.interpolate(align_corners=False)."""
    if map_hw.ndim != 2:
        raise ShapeError(f"map must be 2-D, got {map_hw.shape}")
    rows = _bilinear_matrix(map_hw.shape[0], out_size)
    cols = _bilinear_matrix(map_hw.shape[1], out_size)
    return (rows @ map_hw.astype(np.float64) @ cols.T).astype(np.float32)


def gaussian_blur(map_hw: np.ndarray, sigma_px: float = 4.0) -> np.ndarray:
    """Separable Gaussian blur in float, truncated at 4σ; (H, W) -> (H, W) float32.

    Borders replicate the edge pixel (scipy mode "nearest"), as PIL's box-blur approximation does. Unlike
    the original we do not quantise the map to uint8 relative to its max before blurring (spec §6).
    """
    if sigma_px <= 0:
        return np.asarray(map_hw, dtype=np.float32).copy()
    out = ndimage.gaussian_filter(
        np.asarray(map_hw, dtype=np.float64), sigma_px, mode="nearest", truncate=4.0
    )
    return out.astype(np.float32)


def normalise_features(feats_nc: np.ndarray, bank: MemoryBank) -> np.ndarray:
    """Map raw (N, C) features into the bank's normalised space, float32."""
    return (
        (np.asarray(feats_nc, dtype=np.float32) - bank.feat_mean_c) / np.asarray(bank.feat_scale, np.float32)
    ).astype(np.float32, copy=False)


def score_bank(query_hwc: np.ndarray, bank: MemoryBank, cfg: ScoreConfig) -> BankScore:
    """Score one (g, g, C) patch grid against its bank: image score, (g, g) distances, blurred map.

    Background patches (all-zero raw rows) are scored like any other, as in the original.
    """
    g = bank.grid
    if query_hwc.shape != (g, g, bank.dim):
        raise ShapeError(f"bank {bank.name!r} expects ({g}, {g}, {bank.dim}) features, got {query_hwc.shape}")
    query = normalise_features(query_hwc.reshape(g * g, bank.dim), bank)
    if not np.isfinite(query).all():
        raise InputError(f"features for bank {bank.name!r} contain NaN or inf")
    dist_nk, idx_nk = nearest_neighbours(query, bank.feats_mc, k=1, bank_sq_norms=bank.sq_norms_m)
    dist_n, idx_n = dist_nk[:, 0], idx_nk[:, 0]
    image_score = reweighted_image_score(
        query, bank.feats_mc, dist_n, idx_n, k=cfg.reweight_k, bank_sq_norms=bank.sq_norms_m
    )
    patch_dist_hw = dist_n.reshape(g, g)
    map_hw = gaussian_blur(upsample_bilinear(patch_dist_hw, cfg.output_size), cfg.blur_sigma_px)
    return BankScore(image_score=image_score, patch_dist_hw=patch_dist_hw, map_hw=map_hw)
