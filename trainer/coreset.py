"""Memory-bank construction for training (spec §6): random projection + greedy k-centre coreset.

Sits after training-feature extraction: each bank's rows are normalised with their own statistics and
subsampled to a size computed from that bank's own row count (fixing M3DM's sizing quirk,
spec "10 things" #5).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.random_projection import johnson_lindenstrauss_min_dim

from core.config import CoresetConfig
from core.errors import ConfigError, ShapeError
from core.scoring import MemoryBank

__all__ = ["build_memory_bank", "check_device", "coreset_size", "feature_stats", "greedy_coreset"]

_STATS_CHUNK_ROWS = 65536
log = logging.getLogger("m3dm.trainer")


def coreset_size(n_rows: int, fraction: float, max_rows: int | None = None) -> int:
    """Rows kept for a bank of n_rows: int(fraction · n_rows), clamped to [1, min(n_rows, max_rows)].

    max_rows None (the default) means no cap: the bank keeps the method's own fraction.
    """
    if n_rows <= 0 or not 0 < fraction <= 1 or (max_rows is not None and max_rows <= 0):
        raise ConfigError(f"bad coreset sizing: n_rows={n_rows}, fraction={fraction}, max_rows={max_rows}")
    wanted = max(1, min(int(n_rows * fraction), n_rows))
    return wanted if max_rows is None else min(wanted, max_rows)


def _project(feats_mc: np.ndarray, eps: float, seed: int, device: str) -> torch.Tensor:
    """(N, C) -> (N, d) float32 Gaussian random projection to the JL dimension d (no-op when d >= C)."""
    n_rows, dim = feats_mc.shape
    target_dim = int(johnson_lindenstrauss_min_dim(n_rows, eps=eps))
    feats = torch.from_numpy(np.ascontiguousarray(feats_mc, dtype=np.float32))
    if target_dim >= dim:
        return feats.to(device)
    generator = torch.Generator().manual_seed(seed)
    proj_cd = torch.randn(dim, target_dim, generator=generator) / np.sqrt(target_dim)
    proj_cd = proj_cd.to(device)
    chunks = [
        feats[i : i + _STATS_CHUNK_ROWS].to(device) @ proj_cd for i in range(0, n_rows, _STATS_CHUNK_ROWS)
    ]
    return torch.cat(chunks)


def _centred(proj_nd: torch.Tensor) -> torch.Tensor:
    """Subtract the row mean: distances stay, float32 cancellation in ||x||² - 2x·c + ||c||² shrinks."""
    return proj_nd - proj_nd.mean(dim=0, keepdim=True)


@torch.no_grad()
def greedy_coreset(
    feats_mc: np.ndarray, target_rows: int, eps: float = 0.9, seed: int = 0, device: str = "cpu"
) -> np.ndarray:
    """Greedy k-centre selection (PatchCore), starting at row 0, on a JL random projection.

    Args:
        feats_mc: (N, C) float32 features.
        target_rows: rows to select, 1..N.
        eps: Johnson-Lindenstrauss distortion; the projection dim is capped at C.
        seed: projection seed.
        device: torch device for the projection and the selection loop.

    Returns:
        (target_rows,) int64 row indices in selection order (farthest-first).
    """
    if feats_mc.ndim != 2 or feats_mc.shape[0] == 0:
        raise ShapeError(f"coreset input must be (N>0, C), got {feats_mc.shape}")
    if not 1 <= target_rows <= feats_mc.shape[0]:
        raise ConfigError(f"target_rows={target_rows} must lie in [1, {feats_mc.shape[0]}]")
    check_device(device)
    proj_nd = _centred(_project(feats_mc, eps, seed, device))
    if proj_nd.device.type == "cpu":
        # numpy's per-call overhead is microseconds; torch's CPU thread pool costs ms per tiny op when
        # the cores are shared (measured 8 ms/round on a 6k-row toy bank).
        return _greedy_numpy(proj_nd.numpy(), target_rows)
    return _greedy_torch(proj_nd, target_rows)


def check_device(device: str) -> None:
    """ConfigError for a device torch cannot use here, before any work (not a CUDA traceback mid-fit)."""
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ConfigError(f"coreset device {device!r} is not a torch device: {err}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"coreset device {device!r} asked for, but torch sees no CUDA device here")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"coreset device {device!r}: only cpu and cuda are supported")


def _greedy_numpy(proj_nd: np.ndarray, target_rows: int) -> np.ndarray:
    """Farthest-first rounds on (N, d) float32: squared distances ||x||² - 2x·c + ||c||², one matvec each."""
    sq_norms_n = np.einsum("nd,nd->n", proj_nd, proj_nd)
    chosen = np.zeros(target_rows, dtype=np.int64)
    min_sq_n = sq_norms_n - 2.0 * (proj_nd @ proj_nd[0]) + sq_norms_n[0]
    for step in range(1, target_rows):
        centre = int(np.argmax(min_sq_n))
        chosen[step] = centre
        sq_n = proj_nd @ proj_nd[centre]
        sq_n *= -2.0
        sq_n += sq_norms_n
        sq_n += sq_norms_n[centre]
        np.minimum(min_sq_n, sq_n, out=min_sq_n)
    return chosen


def _greedy_torch(proj_nd: torch.Tensor, target_rows: int) -> np.ndarray:
    """_greedy_numpy on an accelerator tensor (same arithmetic, fused addmv)."""
    sq_norms_n = (proj_nd * proj_nd).sum(dim=1)
    chosen = torch.zeros(target_rows, dtype=torch.int64)
    min_sq_n = torch.addmv(sq_norms_n, proj_nd, proj_nd[0], alpha=-2.0).add_(sq_norms_n[0])
    sq_n = torch.empty_like(min_sq_n)
    for step in range(1, target_rows):
        centre = int(torch.argmax(min_sq_n))
        chosen[step] = centre
        torch.addmv(sq_norms_n, proj_nd, proj_nd[centre], alpha=-2.0, out=sq_n).add_(sq_norms_n[centre])
        torch.minimum(min_sq_n, sq_n, out=min_sq_n)
    return chosen.numpy()


def _stack_rows(feats: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """(N, C) float32 from one array or a list of (..., C) arrays."""
    parts = [feats] if isinstance(feats, np.ndarray) else list(feats)
    if not parts:
        raise ShapeError("no training features given")
    dim = parts[0].shape[-1]
    if any(p.shape[-1] != dim for p in parts):
        raise ShapeError("training feature arrays disagree on the channel count")
    rows = np.concatenate([np.asarray(p, dtype=np.float32).reshape(-1, dim) for p in parts])
    if not np.isfinite(rows).all():
        raise ShapeError("training features contain NaN or inf")
    return rows


def feature_stats(feats_mc: np.ndarray, per_dim: bool = False) -> tuple[np.ndarray, float | np.ndarray]:
    """Per-channel mean (C,) float32 and a scale: the std of all centred elements, or per channel (C,).

    Chunked float64 so a bank of ~1M rows never needs a float64 copy.
    """
    n_rows = feats_mc.shape[0]
    mean_c = np.zeros(feats_mc.shape[1])
    for i in range(0, n_rows, _STATS_CHUNK_ROWS):
        mean_c += feats_mc[i : i + _STATS_CHUNK_ROWS].sum(axis=0, dtype=np.float64)
    mean_c /= n_rows
    sq_sum_c = np.zeros(feats_mc.shape[1])
    for i in range(0, n_rows, _STATS_CHUNK_ROWS):
        centred = feats_mc[i : i + _STATS_CHUNK_ROWS].astype(np.float64) - mean_c
        sq_sum_c += np.einsum("nc,nc->c", centred, centred)
    if per_dim:
        std_c = np.sqrt(sq_sum_c / n_rows)
        # A constant channel carries no information; leave it unscaled rather than divide by zero.
        return mean_c.astype(np.float32), np.where(std_c > 0, std_c, 1.0).astype(np.float32)
    scale = np.sqrt(sq_sum_c.sum() / feats_mc.size)
    # A constant bank has no spread to normalise by; keep distances in raw units then.
    return mean_c.astype(np.float32), float(scale) if scale > 0 else 1.0


def build_memory_bank(
    name: str,
    feats: np.ndarray | Sequence[np.ndarray],
    grid: int,
    fraction: float,
    cfg: CoresetConfig,
    device: str = "cpu",
    per_dim: bool = False,
) -> MemoryBank:
    """Normalise a bank with its own statistics (all rows) and keep a greedy coreset of it.

    Args:
        name: bank name ("rgb", "point", "fusion").
        feats: (N, C) rows, or a list of per-image (..., C) arrays.
        grid: query grid side for this bank (28 or 56).
        fraction: share of this bank's own rows to keep (capped at cfg.max_rows when that is set).
        cfg: coreset settings (projection eps, cap, seed).
        device: torch device for the selection.

    Returns:
        The MemoryBank with normalised rows in selection order.
    """
    rows_nc = _stack_rows(feats)
    mean_c, scale = feature_stats(rows_nc, per_dim)
    scale_f32 = np.asarray(scale, dtype=np.float32)
    target = coreset_size(rows_nc.shape[0], fraction, cfg.max_rows)
    wanted = coreset_size(rows_nc.shape[0], fraction)
    if target < wanted:
        log.warning(
            "bank %s: --max-bank-rows %d binds: keeping %d of %d rows (%.2f%%) instead of the %.0f%% asked",
            name,
            cfg.max_rows,
            target,
            rows_nc.shape[0],
            100 * target / rows_nc.shape[0],
            100 * fraction,
        )
    # Selection is translation- and uniform-scale-equivariant, so with a scalar scale select on raw rows and
    # normalise only the kept ones; a per-channel scale changes the geometry, so select in normalised space.
    select_on = ((rows_nc - mean_c) / scale_f32).astype(np.float32) if per_dim else rows_nc
    idx = greedy_coreset(select_on, target, eps=cfg.projection_eps, seed=cfg.seed, device=device)
    kept = ((rows_nc[idx] - mean_c) / scale_f32).astype(np.float32)
    return MemoryBank(name=name, feats_mc=kept, grid=grid, feat_mean_c=mean_c, feat_scale=scale)
