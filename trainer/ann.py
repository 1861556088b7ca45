"""Per-bank choice between exact search and a faiss ANN index, by a recall@1 target on held-out normals.

Sits after bank construction in the trainer: `choose_index` leaves small banks exact (BLAS is faster there)
and for a large bank builds an IVF-Flat (or HNSW) index, then raises its search parameter until recall@1
against exact search reaches the target on held-out normal patches (the queries a station sees most).
The index is written next to the bank and shipped in the bundle; `core.ann` loads it on the station.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np

from core.ann import INDEX_KINDS, FaissIndex
from core.errors import ConfigError
from core.model import FrameScorer
from core.scan import PatchFeatures
from core.scoring import MemoryBank, nearest_neighbours, normalise_features

__all__ = [
    "AnnChoice",
    "AnnConfig",
    "attach_indexes",
    "build_index",
    "choose_index",
    "held_out_queries",
    "index_entry",
    "recall_at_1",
]

log = logging.getLogger("m3dm.trainer")

_IVF_NPROBES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
_HNSW_EFS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@dataclass(frozen=True)
class AnnConfig:
    """When a bank gets an index, and which.

    recall_target: recall@1 vs exact on held-out normal patches. Banks under exact_below_rows rows, or under
    exact_below_floats (rows x dim, what exact search costs), stay exact without a trial. min_speedup: an
    index meeting the target is kept only if it searches the held-out queries at least this much faster
    than exact BLAS (timed here, best of 3); 0 keeps it whatever it costs. On 2 cores a 15,680 x 768 DINO
    bank measured exact 135-159 ms and IVF 50 ms per frame, so the timing decides, not a row count.
    """

    recall_target: float = 0.99
    exact_below_rows: int = 8000
    # rows x dim: exact cost grows with it, so small hand-made-descriptor banks (12.5k x ~60) skip the trial
    exact_below_floats: int = 4_000_000
    min_speedup: float = 1.25
    kind: str = "ivf-flat"
    max_queries: int = 4000
    hnsw_m: int = 32
    lists_per_sqrt_rows: float = 4.0  # IVF lists = this x sqrt(rows)
    train_rows_per_list: int = 64  # k-means sample (faiss caps at 256/list); fewer trains faster
    kmeans_iterations: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.recall_target <= 1:
            raise ConfigError("ANN recall target must lie in (0, 1]")
        if self.kind not in INDEX_KINDS:
            raise ConfigError(f"unknown ANN kind {self.kind!r}; known: {', '.join(INDEX_KINDS)}")


@dataclass
class AnnChoice:
    """What a bank searches with: index None means exact; recall_at_1 measured on the held-out queries."""

    index: FaissIndex | None
    recall_at_1: float
    reason: str
    params: dict[str, int] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "exact" if self.index is None else self.index.kind


def build_index(bank_mc: np.ndarray, kind: str, cfg: AnnConfig) -> FaissIndex:
    """An untuned faiss index over (M, C) normalised rows (search parameter set to its smallest value)."""
    rows, dim = bank_mc.shape
    data = np.ascontiguousarray(bank_mc, dtype=np.float32)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m)
        index.hnsw.efConstruction = 80
        index.add(data)
        return FaissIndex(index, kind, {"ef_search": _HNSW_EFS[0]})
    # ~4·sqrt(M) lists is faiss' usual choice; k-means wants >= 39 rows per list, so never more than M/39.
    nlist = max(1, min(int(cfg.lists_per_sqrt_rows * math.sqrt(rows)), rows // 39))
    quantiser = faiss.IndexFlatL2(dim)
    index = faiss.IndexIVFFlat(quantiser, dim, nlist)
    index.cp.seed = cfg.seed
    index.cp.niter = cfg.kmeans_iterations
    sample = min(rows, max(39, cfg.train_rows_per_list) * nlist)
    pick = np.random.default_rng(cfg.seed).choice(rows, sample, replace=False) if sample < rows else None
    index.train(data if pick is None else data[np.sort(pick)])
    index.add(data)
    return FaissIndex(index, kind, {"nprobe": 1})


def recall_at_1(index: FaissIndex, queries_nc: np.ndarray, bank: MemoryBank, exact_idx: np.ndarray) -> float:
    """Share of queries whose approximate nearest row is the exact one (or an exactly equidistant row)."""
    found = index.search(queries_nc)
    d_found = np.linalg.norm(queries_nc - bank.feats_mc[found], axis=1)
    d_exact = np.linalg.norm(queries_nc - bank.feats_mc[exact_idx], axis=1)
    return float(np.mean((found == exact_idx) | (d_found <= d_exact * (1 + 1e-6))))


def _sample(queries_nc: np.ndarray, cfg: AnnConfig) -> np.ndarray:
    if queries_nc.shape[0] <= cfg.max_queries:
        return np.ascontiguousarray(queries_nc, dtype=np.float32)
    pick = np.random.default_rng(cfg.seed).choice(queries_nc.shape[0], cfg.max_queries, replace=False)
    return np.ascontiguousarray(queries_nc[np.sort(pick)], dtype=np.float32)


def _speedup(index: FaissIndex, queries_nc: np.ndarray, bank: MemoryBank, repeats: int = 3) -> float:
    """Exact-search time over index-search time on the same queries, best of `repeats` each."""

    def best_s(search) -> float:  # noqa: ANN001 - a zero-argument callable
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            search()
            times.append(time.perf_counter() - start)
        return min(times)

    exact_s = best_s(lambda: nearest_neighbours(queries_nc, bank.feats_mc, bank_sq_norms=bank.sq_norms_m))
    return exact_s / max(best_s(lambda: index.search(queries_nc)), 1e-9)


def choose_index(bank: MemoryBank, queries_nc: np.ndarray, cfg: AnnConfig) -> AnnChoice:
    """Exact for small banks; otherwise the cheapest search parameter meeting the recall target.

    Args:
        bank: the bank (normalised rows).
        queries_nc: held-out normal patches, already normalised into the bank's space (foreground only:
            background patches never reach the search).
        cfg: target and limits.
    """
    rows = bank.feats_mc.shape[0]
    if rows < cfg.exact_below_rows:
        return AnnChoice(None, 1.0, f"{rows} rows < {cfg.exact_below_rows}: exact BLAS search")
    if rows * bank.dim < cfg.exact_below_floats:
        return AnnChoice(None, 1.0, f"{rows}x{bank.dim} < {cfg.exact_below_floats} floats: exact BLAS search")
    if queries_nc.shape[0] == 0:
        return AnnChoice(None, 1.0, "no held-out queries to measure recall on: exact search")
    queries = _sample(queries_nc, cfg)
    exact_idx = nearest_neighbours(queries, bank.feats_mc, k=1, bank_sq_norms=bank.sq_norms_m)[1][:, 0]
    index = build_index(bank.feats_mc, cfg.kind, cfg)
    key, values = ("nprobe", _IVF_NPROBES) if cfg.kind == "ivf-flat" else ("ef_search", _HNSW_EFS)
    recall = 0.0
    for value in values:
        index.set_params({key: value})
        recall = recall_at_1(index, queries, bank, exact_idx)
        if recall >= cfg.recall_target:
            speedup = _speedup(index, queries, bank) if cfg.min_speedup > 0 else math.inf
            if speedup < cfg.min_speedup:
                log.info(
                    "bank %s: %s %s=%d only %.2fx faster than exact: exact search",
                    bank.name,
                    cfg.kind,
                    key,
                    value,
                    speedup,
                )
                return AnnChoice(None, 1.0, f"{cfg.kind} only {speedup:.2f}x faster than exact: exact search")
            log.info("bank %s: %s %s=%d recall@1 %.4f", bank.name, cfg.kind, key, value, recall)
            return AnnChoice(index, recall, f"{cfg.kind} {key}={value}", {key: value})
    log.warning(
        "bank %s: %s misses recall %.3f at %s=%d (%.4f); using exact search",
        bank.name,
        cfg.kind,
        cfg.recall_target,
        key,
        values[-1],
        recall,
    )
    return AnnChoice(None, 1.0, f"{cfg.kind} could not reach recall {cfg.recall_target}: exact search")


def held_out_queries(scorer: FrameScorer, features: list[PatchFeatures]) -> dict[str, np.ndarray]:
    """Raw held-out query rows per bank as the station searches them: every rgb patch, foreground only for
    point and fusion (background patches never reach the search). An RGB-only scorer: rgb rows alone."""
    if scorer.rgb_only:
        return {"rgb": np.concatenate([f.rgb_hwc.reshape(-1, f.rgb_hwc.shape[-1]) for f in features])}
    rows: dict[str, list[np.ndarray]] = {"rgb": [], "point": [], "fusion": []}
    for feats in features:
        point = feats.point_hwc.reshape(-1, feats.point_hwc.shape[-1])
        fg = point.any(axis=1)
        fused = scorer.fused_features(feats)
        rows["rgb"].append(feats.rgb_hwc.reshape(-1, feats.rgb_hwc.shape[-1]))
        rows["point"].append(point[fg])
        rows["fusion"].append(fused.reshape(-1, fused.shape[-1])[fg])
    return {name: np.concatenate(parts) for name, parts in rows.items()}


def attach_indexes(
    banks: dict[str, MemoryBank], queries_raw: dict[str, np.ndarray], cfg: AnnConfig
) -> tuple[dict[str, MemoryBank], dict[str, AnnChoice]]:
    """Banks with the chosen index attached (unchanged where exact) and the choice per bank."""
    out, choices = {}, {}
    for name, bank in banks.items():
        choice = choose_index(bank, normalise_features(queries_raw[name], bank), cfg)
        choices[name] = choice
        out[name] = bank if choice.index is None else replace(bank, index=choice.index)
    return out, choices


def index_entry(choice: AnnChoice, bank_name: str, model_dir: Path) -> dict | None:
    """Write the index next to the bank; the model.json entry describing it (None for exact search)."""
    if choice.index is None:
        return None
    rel = f"banks/{bank_name}.faiss"
    (model_dir / "banks").mkdir(parents=True, exist_ok=True)
    choice.index.save(model_dir / rel)
    return {"file": rel, "kind": choice.kind, "params": choice.params, "recall_at_1": choice.recall_at_1}
