"""Local distance scales of a bank (the "local_norm" image-score rule, issue 15), fitted on training normals.

A normal patch in a specular highlight or on an edge lies farther from its nearest bank row than a normal
patch of plain surface, so its raw distance says less. The scale of a bank row (or grid position) is the
root mean square of the nearest-neighbour distances training normals get there, each training image
scored *without its own rows* (leave one image out: a bank row that a patch of this image reproduces
exactly is masked for that image's patches), which is what a new normal part meets. Sparse keys are
shrunk toward the bank-wide scale with `prior` pseudo-hits, and no scale falls below `floor` times it, so
a key seen once cannot blow a distance up.

numpy only; trainer.model_io writes the (K,) float32 result beside the bank, the bundle ships it hashed and
signed, and the station divides by it (core.scoring.local_norm_max).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from core.errors import ConfigError
from core.scoring import MemoryBank, normalise_features, search_bank

__all__ = [
    "LocalScaleConfig",
    "attach_local_scales",
    "fit_local_scale",
    "leave_one_image_out_distances",
    "local_scales",
]


@dataclass(frozen=True)
class LocalScaleConfig:
    """prior: pseudo-hits at the bank-wide scale per key; floor: least scale, as a share of the bank-wide one;
    patches_per_image: training patches scored per image (seeded sample; None = all)."""

    prior: float = 4.0
    floor: float = 0.25
    patches_per_image: int | None = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prior <= 0 or not 0 < self.floor <= 1:
            raise ConfigError("local scale prior must be > 0 and floor in (0, 1]")


def _own_rows(query_pc: np.ndarray, bank: MemoryBank) -> np.ndarray:
    """Bank rows that some patch of this image reproduces (distance ~0): the rows it contributed."""
    dist_p, idx_p = search_bank(query_pc, bank)
    tol = 1e-5 * (1.0 + float(np.sqrt(bank.sq_norms_m.max())))
    return np.unique(idx_p[dist_p <= tol])


def _masked_nearest(
    query_pc: np.ndarray, bank: MemoryBank, masked_r: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(P,) distance and row of each query's nearest bank row outside `masked_r`."""
    ranking = (-2.0 * query_pc) @ bank.feats_mc.T
    ranking += bank.sq_norms_m
    ranking[:, masked_r] = np.inf
    idx_p = np.argmin(ranking, axis=1)
    diff = query_pc - bank.feats_mc[idx_p]
    return np.sqrt(np.einsum("pc,pc->p", diff, diff)).astype(np.float32), idx_p.astype(np.int64)


def leave_one_image_out_distances(
    feats_nhwc: np.ndarray, bank: MemoryBank, cfg: LocalScaleConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leave-one-image-out nearest distances of training patches: dist, nearest row, position, each (L,)."""
    n, g = feats_nhwc.shape[0], feats_nhwc.shape[1]
    if feats_nhwc.shape[1:3] != (bank.grid, bank.grid) or n < 2:
        raise ConfigError(f"bank {bank.name!r}: need >= 2 training grids of {bank.grid}x{bank.grid}")
    rng = np.random.default_rng(cfg.seed)
    per_image = g * g if cfg.patches_per_image is None else min(g * g, cfg.patches_per_image)
    dists, rows, positions = [], [], []
    for image_hwc in feats_nhwc:
        query = normalise_features(image_hwc.reshape(g * g, -1), bank)
        own = _own_rows(query, bank)
        if own.size >= bank.feats_mc.shape[0]:
            continue  # every row came from this image: nothing to leave it out against
        pos = np.sort(rng.choice(g * g, per_image, replace=False)) if per_image < g * g else np.arange(g * g)
        dist_p, idx_p = _masked_nearest(query[pos], bank, own)
        dists.append(dist_p)
        rows.append(idx_p)
        positions.append(pos)
    if not dists:
        raise ConfigError(f"bank {bank.name!r}: every bank row comes from one image; no local scale")
    return np.concatenate(dists), np.concatenate(rows), np.concatenate(positions)


def local_scales(dist_l: np.ndarray, key_l: np.ndarray, n_keys: int, cfg: LocalScaleConfig) -> np.ndarray:
    """(n_keys,) float32: per-key RMS distance, shrunk toward the global RMS, floored at floor·global."""
    dist_sq = dist_l.astype(np.float64) ** 2
    global_ms = float(dist_sq.mean())
    if not global_ms > 0:
        raise ConfigError("training normals all sit on bank rows; no local scale can be fitted")
    hits_k = np.bincount(key_l, minlength=n_keys).astype(np.float64)
    sum_sq_k = np.bincount(key_l, weights=dist_sq, minlength=n_keys)
    scale_k = np.sqrt((sum_sq_k + cfg.prior * global_ms) / (hits_k + cfg.prior))
    return np.maximum(scale_k, cfg.floor * np.sqrt(global_ms)).astype(np.float32)


def fit_local_scale(feats_nhwc: np.ndarray, bank: MemoryBank, key: str, cfg: LocalScaleConfig) -> np.ndarray:
    """The bank's (K,) local scales, K = bank rows (key "row") or grid positions (key "position")."""
    dist_l, row_l, pos_l = leave_one_image_out_distances(feats_nhwc, bank, cfg)
    if key == "row":
        return local_scales(dist_l, row_l, bank.feats_mc.shape[0], cfg)
    return local_scales(dist_l, pos_l, bank.grid**2, cfg)


def attach_local_scales(
    banks: dict[str, MemoryBank], grids: dict[str, np.ndarray], key: str, cfg: LocalScaleConfig | None = None
) -> dict[str, MemoryBank]:
    """Each bank with its local scales fitted on its (N, g, g, C) training grids (`grids[name]`)."""
    cfg = cfg or LocalScaleConfig()
    return {
        name: replace(bank, local_scale_k=fit_local_scale(grids[name], bank, key, cfg))
        for name, bank in banks.items()
    }
