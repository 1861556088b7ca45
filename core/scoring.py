"""Memory-bank scoring on the station (spec §6): kNN, PatchCore reweighting, map upsampling and blur.

Sits between feature extraction and decision-layer fusion: `score_bank` turns one bank's patch grid into an
image score (under the configured rule, `bank_image_score`) and a (224, 224) anomaly map. numpy + scipy
only, float32, vectorised BLAS.

Background skip (exact): a background patch has no valid points, so its point feature is an exact zero
vector and its normalised query is the constant -mean/scale. Its nearest bank row is computed once per bank
(`MemoryBank.zero_query`), not per frame. A fusion query of a background patch has a constant point half
(UFF maps the zero point feature to a fixed output), so only its rgb half is searched, once per distinct rgb
token (`KnownRows`); the constant half's distances to every bank row are precomputed (`KnownPrefix`).
An optional approximate index (`MemoryBank.index`, see `core.ann`) replaces the exact search of the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from scipy import ndimage

from core.config import ScoreConfig
from core.errors import ConfigError, InputError, ShapeError

__all__ = [
    "BankScore",
    "bank_image_score",
    "KnownPrefix",
    "KnownRows",
    "MemoryBank",
    "NeighbourIndex",
    "gaussian_blur",
    "local_norm_max",
    "nearest_neighbours",
    "nearest_per_patch",
    "normalise_features",
    "reweighted_image_score",
    "score_bank",
    "search_bank",
    "topk_mean",
    "upsample_bilinear",
]


class NeighbourIndex(Protocol):
    """An approximate nearest-neighbour index over a bank's normalised rows (e.g. `core.ann.FaissIndex`)."""

    kind: str

    def search(self, query_nc: np.ndarray) -> np.ndarray:
        """(N, C) float32 normalised queries -> (N,) int64 row of the (approximately) nearest bank row."""
        ...

    def neighbours(self, query_nc: np.ndarray, k: int) -> np.ndarray:
        """(N, C) float32 -> (N, k) int64 ids of the k (approximately) nearest rows, ascending; -1: none."""
        ...


@dataclass(frozen=True, eq=False)
class KnownPrefix:
    """Search state of queries whose first `dims` normalised channels equal `value_d`, built once per bank.

    partial_m: (M,) float32 ||value - b[:dims]||² + ||b[dims:]||², so ranking a query needs only
    -2 q[dims:]·b[dims:]. nn_dist / nn_idx: the nearest bank row when the prefix is the whole query.
    """

    dims: int
    value_d: np.ndarray
    partial_m: np.ndarray
    nn_dist: float
    nn_idx: int


@dataclass(frozen=True)
class KnownRows:
    """Query rows (indices into the g·g grid) whose normalised prefix is `prefix.value_d`.

    group_n: (K,) ids; rows with the same id have identical queries (e.g. the same rgb token under a
    2x-upsampled fusion grid), so each group is searched once. None: every row is its own group.
    """

    rows_n: np.ndarray
    prefix: KnownPrefix
    group_n: np.ndarray | None = None


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
    index: NeighbourIndex | None = field(default=None, repr=False)
    # (K,) float32 distance scale of training normals per bank row (K = M) or grid position (K = g·g),
    # for the "local_norm" image-score rule; its inverse is taken once here, not per frame.
    local_scale_k: np.ndarray | None = field(default=None, repr=False)
    sq_norms_m: np.ndarray = field(init=False, repr=False)
    zero_query: KnownPrefix = field(init=False, repr=False)
    local_inv_k: np.ndarray | None = field(init=False, repr=False)

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
        inv = None
        if self.local_scale_k is not None:
            scale = np.asarray(self.local_scale_k, dtype=np.float32)
            if scale.ndim != 1 or scale.shape[0] not in (feats.shape[0], self.grid**2):
                raise ShapeError(
                    f"local scale must be ({feats.shape[0]},) per row or ({self.grid**2},) per position, "
                    f"got {scale.shape}",
                    self.name,
                )
            if not (np.isfinite(scale).all() and (scale > 0).all()):
                raise ConfigError(f"bank {self.name!r}: local scales must be finite and > 0")
            inv = (1.0 / scale).astype(np.float32)
            object.__setattr__(self, "local_scale_k", scale)
        object.__setattr__(self, "local_inv_k", inv)
        # A background patch's raw feature is exactly zero; its search result is fixed for this bank.
        object.__setattr__(self, "zero_query", self.known_prefix(np.zeros(feats.shape[1], np.float32)))

    @property
    def dim(self) -> int:
        return int(self.feats_mc.shape[1])

    def known_prefix(self, raw_prefix_d: np.ndarray) -> KnownPrefix:
        """Precompute the search of queries whose first D raw channels are `raw_prefix_d` (D <= C).

        Normalised with the same float32 operations as `normalise_features`, so the constant is bit-equal
        to what a full per-frame computation would produce for that prefix.
        """
        raw = np.asarray(raw_prefix_d, dtype=np.float32).reshape(-1)
        dims = raw.shape[0]
        if not 0 < dims <= self.dim or not np.isfinite(raw).all():
            raise ShapeError(
                f"known prefix must be finite with 1..{self.dim} channels, got {dims}", self.name
            )
        scale = np.broadcast_to(np.asarray(self.feat_scale, np.float32), (self.dim,))
        value = ((raw - self.feat_mean_c[:dims]) / scale[:dims]).astype(np.float32, copy=False)
        head = self.feats_mc[:, :dims].astype(np.float64) - value.astype(np.float64)
        partial = np.einsum("md,md->m", head, head)
        if dims < self.dim:
            tail = self.feats_mc[:, dims:]
            partial += np.einsum("mc,mc->m", tail, tail, dtype=np.float64)
        nn_idx = int(np.argmin(partial))
        nn_dist = float(np.sqrt(partial[nn_idx])) if dims == self.dim else float("nan")
        if dims == self.dim:  # the exact recomputation `nearest_neighbours` does for any query
            diff = value - self.feats_mc[nn_idx]
            nn_dist = float(np.sqrt(np.einsum("c,c->", diff, diff)).astype(np.float32))
        return KnownPrefix(dims, value, partial.astype(np.float32), nn_dist, nn_idx)


@dataclass(frozen=True, eq=False)
class BankScore:
    """One bank's result: image_score (normalised-space distance), patch_dist_hw (g, g), map_hw (S, S) f32.

    query_nc (g·g, C) normalised queries and nearest_n (g·g,) bank rows: what `bank_image_score` reads, so a
    caller can apply another rule to the same search (bench/image_score_rules.py) without searching again.
    """

    image_score: float
    patch_dist_hw: np.ndarray
    map_hw: np.ndarray
    query_nc: np.ndarray | None = field(default=None, repr=False)
    nearest_n: np.ndarray | None = field(default=None, repr=False)


# float32 error of a ranking value ||b||² - 2q·b (or its known-prefix form), relative to ||q||² + max ||b||²:
# rows whose ranking lies within this band of the minimum are re-ranked by exact distance, so near-ties
# resolve the same way whichever blocking or decomposition computed the ranking.
_RERANK_REL = 16 * float(np.finfo(np.float32).eps)
_RERANK_MAX_CANDIDATES = 64  # per query on average; beyond that (a degenerate bank) keep the plain argmin


def argmin_rerank(
    ranking_nm: np.ndarray, magnitude_n: np.ndarray, query_nc: np.ndarray, bank_mc: np.ndarray
) -> np.ndarray:
    """(N,) argmin of each ranking row, with rows inside the float32 error band re-ranked exactly.

    `ranking_nm` is written to and restored (the argmin cells), so callers pass their own temporary.
    """
    count = ranking_nm.shape[0]
    if not ranking_nm.flags.writeable:
        ranking_nm = ranking_nm.copy()
    idx_n = np.argmin(ranking_nm, axis=1)
    every = np.arange(count)
    best_n = ranking_nm[every, idx_n]
    band_n = best_n + _RERANK_REL * magnitude_n
    # Only rows with a runner-up inside the band need the exact re-rank. The runner-up comes from one
    # vectorised min with each argmin masked; listing every in-band cell of the whole (N, M) matrix with
    # nonzero() cost ~20 ms a frame on m3dm-free, and almost every row has a single candidate.
    ranking_nm[every, idx_n] = np.inf
    second_n = ranking_nm.min(axis=1)
    ranking_nm[every, idx_n] = best_n
    ambiguous = np.flatnonzero(second_n <= band_n)
    if ambiguous.size == 0:
        return idx_n
    sub_rows, cols = np.nonzero(ranking_nm[ambiguous] <= band_n[ambiguous, None])
    if count - ambiguous.size + sub_rows.size > _RERANK_MAX_CANDIDATES * count:
        return idx_n
    rows = ambiguous[sub_rows]
    diff = query_nc[rows].astype(np.float64) - bank_mc[cols]
    dist_sq = np.einsum("nc,nc->n", diff, diff)
    order = np.lexsort((cols, dist_sq, rows))  # per row: smallest exact distance, then lowest index
    first = np.ones(order.size, dtype=bool)
    first[1:] = rows[order][1:] != rows[order][:-1]
    idx_n[rows[order][first]] = cols[order][first]
    return idx_n


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
    if chunk_rows < 1:  # a zero step would leave idx_nk unfilled (uninitialised indices), so refuse it
        raise ConfigError(f"chunk_rows={chunk_rows} must be >= 1")
    b_sq = np.einsum("mc,mc->m", bank, bank) if bank_sq_norms is None else bank_sq_norms
    b_sq_max = float(b_sq.max())
    idx_nk = np.empty((query.shape[0], k), dtype=np.int64)
    for start in range(0, query.shape[0], chunk_rows):
        q = query[start : start + chunk_rows]
        # ||q||² is constant per row, so ranking needs only ||b||² - 2 q·b; scaling the small q block and
        # adding in place keeps it to one pass over the (chunk, M) product (memory-bound at small C).
        partial = (-2.0 * q) @ bank.T
        partial += b_sq
        if k == 1:
            q_sq = np.einsum("nc,nc->n", q, q)
            idx_nk[start : start + len(q), 0] = argmin_rerank(partial, q_sq + b_sq_max, q, bank)
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
    index: NeighbourIndex | None = None,
) -> float:
    """PatchCore-reweighted image score (spec §6), w·s* with w = 1 - exp(s*/D) / Σ exp(d_j/D).

    Args:
        query_nc: (N, C) test patches (same space as the bank).
        bank_mc: (M, C) bank, M >= k.
        dist_n: (N,) nearest-neighbour distance per patch; idx_n: (N,) its bank row.
        k: neighbours of m* considered, m* itself included (M3DM: 3).
        bank_sq_norms: (M,) cached ||b||², computed when None.
        index: the bank's approximate index, if it has one: the neighbours of m* are then looked up in it
            (about 1 ms) instead of by an exact pass over the whole bank (16-25 ms on an official-size
            bank, every frame), at the index's own recall, like every other search of that bank.

    Returns:
        The image anomaly score (float).
    """
    if k < 2:
        raise ConfigError(f"reweighting needs k >= 2, got {k}")
    patch = int(np.argmax(dist_n))
    s_star = float(dist_n[patch])
    m_star = bank_mc[idx_n[patch]][None, :]
    support = index.neighbours(m_star, k)[0] if index is not None else None
    if support is None or (support < 0).any():  # no index, or it found fewer than k rows: exact
        support = nearest_neighbours(m_star, bank_mc, k=k, bank_sq_norms=bank_sq_norms)[1][0]
    # The first neighbour of m* is m* itself; distances from the test patch to the other k-1.
    diff = bank_mc[support[1:]].astype(np.float64) - query_nc[patch].astype(np.float64)
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


def _exact_distances(query_nc: np.ndarray, bank_mc: np.ndarray, idx_n: np.ndarray) -> np.ndarray:
    """(N,) float32 ||q - bank[idx]||, computed directly (no cancellation)."""
    diff = query_nc - bank_mc[idx_n]
    return np.sqrt(np.einsum("nc,nc->n", diff, diff)).astype(np.float32)


def search_bank(
    query_nc: np.ndarray, bank: MemoryBank, chunk_rows: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest bank row of each normalised query: the bank's index when it has one, else exact BLAS.

    Returns dist_n (N,) float32 (exact distance to the row found) and idx_n (N,) int64.
    """
    if query_nc.shape[0] == 0:
        return np.empty(0, np.float32), np.empty(0, np.int64)
    if bank.index is None:
        dist_nk, idx_nk = nearest_neighbours(
            query_nc, bank.feats_mc, k=1, bank_sq_norms=bank.sq_norms_m, chunk_rows=chunk_rows
        )
        return dist_nk[:, 0], idx_nk[:, 0]
    idx_n = np.asarray(bank.index.search(np.ascontiguousarray(query_nc, np.float32)), dtype=np.int64)
    return _exact_distances(query_nc, bank.feats_mc, idx_n), idx_n


def _search_known(
    query_nc: np.ndarray, bank: MemoryBank, known: KnownRows, chunk_rows: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest rows for the known-prefix rows: a constant, or one rest-only search per group."""
    prefix, count = known.prefix, known.rows_n.shape[0]
    if prefix.dims == bank.dim:
        return np.full(count, prefix.nn_dist, np.float32), np.full(count, prefix.nn_idx, np.int64)
    if known.group_n is None:
        first, inverse = np.arange(count), np.arange(count)
    else:
        _, first, inverse = np.unique(known.group_n, return_index=True, return_inverse=True)
    reps = query_nc[known.rows_n[first]]
    if bank.index is not None:
        dist, idx = search_bank(reps, bank)
        return dist[inverse], idx[inverse]
    tail_mc = bank.feats_mc[:, prefix.dims :]
    partial_max = float(prefix.partial_m.max())
    idx = np.empty(reps.shape[0], np.int64)
    for start in range(0, reps.shape[0], chunk_rows):
        # ||q - b||² = partial_m + ||q_tail||² - 2 q_tail·b_tail; ||q_tail||² is constant per row.
        tail = reps[start : start + chunk_rows, prefix.dims :]
        ranking = (-2.0 * tail) @ tail_mc.T
        ranking += prefix.partial_m
        magnitude = np.einsum("nc,nc->n", tail, tail) + partial_max
        block = reps[start : start + chunk_rows]
        idx[start : start + chunk_rows] = argmin_rerank(ranking, magnitude, block, bank.feats_mc)
    dist = _exact_distances(reps, bank.feats_mc, idx)
    return dist[inverse], idx[inverse]


def nearest_per_patch(
    query_nc: np.ndarray, bank: MemoryBank, known: KnownRows | None
) -> tuple[np.ndarray, np.ndarray]:
    """(N,) distances and bank rows for normalised queries; known rows skip the general search."""
    count = query_nc.shape[0]
    if known is None or known.rows_n.size == 0:
        return search_bank(query_nc, bank)
    dist_n, idx_n = np.empty(count, np.float32), np.empty(count, np.int64)
    todo = np.ones(count, dtype=bool)
    todo[known.rows_n] = False
    rest = np.flatnonzero(todo)
    dist_n[rest], idx_n[rest] = search_bank(query_nc[rest], bank)
    dist_n[known.rows_n], idx_n[known.rows_n] = _search_known(query_nc, bank, known)
    return dist_n, idx_n


def topk_mean(dist_n: np.ndarray, fraction: float) -> float:
    """Mean of the ceil(fraction·N) largest patch distances (at least one)."""
    count = dist_n.shape[0]
    k = min(count, max(1, int(np.ceil(fraction * count))))
    return float(np.partition(dist_n, count - k)[count - k :].astype(np.float64).mean())


def local_norm_max(dist_n: np.ndarray, idx_n: np.ndarray, bank: MemoryBank, key: str) -> float:
    """max over patches of distance / the training normals' scale there (per nearest row or position)."""
    inv = bank.local_inv_k
    if inv is None:
        raise ConfigError(f"bank {bank.name!r} has no local scales; the local_norm rule needs them")
    expected = bank.feats_mc.shape[0] if key == "row" else dist_n.shape[0]
    if inv.shape[0] != expected:
        raise ConfigError(
            f"bank {bank.name!r}: local scales are ({inv.shape[0]},), the {key!r} key needs ({expected},)"
        )
    per_patch = dist_n * (inv[idx_n] if key == "row" else inv)
    return float(per_patch.max())


def bank_image_score(
    cfg: ScoreConfig,
    query_nc: np.ndarray,
    bank: MemoryBank,
    dist_n: np.ndarray,
    idx_n: np.ndarray,
    map_hw: np.ndarray,
) -> float:
    """One bank's image score under cfg.image_rule, from its normalised queries, nearest distances and rows
    and its blurred (S, S) map. The one place the rule is applied (station and trainer alike)."""
    rule = cfg.image_rule
    if rule == "max_patch":
        return reweighted_image_score(
            query_nc,
            bank.feats_mc,
            dist_n,
            idx_n,
            k=cfg.reweight_k,
            bank_sq_norms=bank.sq_norms_m,
            index=bank.index,
        )
    if rule == "max_blurred_map":
        return float(map_hw.max())
    if rule == "topk_mean":
        return topk_mean(dist_n, cfg.topk_fraction)
    if rule == "local_norm":
        return local_norm_max(dist_n, idx_n, bank, cfg.local_key)
    raise ConfigError(f"unknown image_rule {rule!r}")


def score_bank(
    query_hwc: np.ndarray,
    bank: MemoryBank,
    cfg: ScoreConfig,
    known: KnownRows | None = None,
    skip_background: bool = True,
) -> BankScore:
    """Score one (g, g, C) patch grid against its bank: image score, (g, g) distances, blurred map.

    Background patches are scored as in the original (the same distances), but without searching for
    them: all-zero raw rows use the bank's precomputed `zero_query` unless `known` names the rows with a
    known prefix (the fusion bank). `skip_background=False` searches every row (the reference path).
    """
    g = bank.grid
    if query_hwc.shape != (g, g, bank.dim):
        raise ShapeError(f"bank {bank.name!r} expects ({g}, {g}, {bank.dim}) features, got {query_hwc.shape}")
    raw_nc = query_hwc.reshape(g * g, bank.dim)
    query = normalise_features(raw_nc, bank)
    if not np.isfinite(query).all():
        raise InputError(f"features for bank {bank.name!r} contain NaN or inf")
    if not skip_background:
        known = None
    elif known is None:
        zero_rows = np.flatnonzero(~raw_nc.any(axis=1))
        known = KnownRows(zero_rows, bank.zero_query) if zero_rows.size else None
    dist_n, idx_n = nearest_per_patch(query, bank, known)
    patch_dist_hw = dist_n.reshape(g, g)
    map_hw = gaussian_blur(upsample_bilinear(patch_dist_hw, cfg.output_size), cfg.blur_sigma_px)
    image_score = bank_image_score(cfg, query, bank, dist_n, idx_n, map_hw)
    return BankScore(image_score, patch_dist_hw, map_hw, query_nc=query, nearest_n=idx_n)
