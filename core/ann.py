"""Approximate nearest-neighbour search over a memory bank with faiss (IVF-Flat or HNSW), for the station.

Built and tuned in the trainer (`trainer/ann.py`), shipped in the bundle as a faiss index file (hashed and
signed like every file), loaded here. `FaissIndex.search` returns only row ids: `core.scoring` recomputes
the distance to the row found exactly, so an approximate search can only pick a slightly farther row (a
recall miss), never report a wrong distance. faiss is imported lazily: a station without an index never
needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigError, CorruptFileError

__all__ = ["INDEX_KINDS", "FaissIndex", "IvfLists", "load_index"]

INDEX_KINDS = ("ivf-flat", "hnsw")


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as err:  # the bundle asks for an index but faiss-cpu is not installed
        raise ConfigError(
            "this bundle ships an ANN index; install faiss-cpu (the `edge` extra has it)"
        ) from err
    return faiss


class IvfLists:
    """IVF search done as BLAS blocks: the faiss index's centroids and lists, rows stored list by list.

    faiss scans each (query, list) pair with per-vector SIMD loops; on 1152-1920-d features on 2 cores
    that measured ~4x slower than OpenBLAS GEMMs (faiss search of 500 queries, nprobe 32 of 547 lists over
    75k x 1152: 11 s vs ~1 s here, same lists visited, machine under load). Results equal faiss's up to
    float ties: the same lists are probed and every row in them is compared.

    The rows are NOT copied: each list's rows are a read-only numpy view of the faiss index's own list
    storage (an ArrayInvertedLists vector per list), so the index and this search share one copy of the
    bank (an official-size bank is ~1 GB; a list-ordered copy doubled it). The views live as long as the
    index object, which `FaissIndex` holds; nothing adds to or removes from a loaded index.
    """

    def __init__(self, ivf: Any, nprobe: int) -> None:
        faiss = _faiss()
        nlist, dim = int(ivf.nlist), int(ivf.d)
        self.centroids_lc = np.asarray(ivf.quantizer.reconstruct_n(0, nlist), dtype=np.float32).reshape(
            nlist, dim
        )
        self.cent_sq_l = np.einsum("lc,lc->l", self.centroids_lc, self.centroids_lc)
        invlists = ivf.invlists
        sizes = np.array([invlists.list_size(i) for i in range(nlist)], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self._ivf = ivf  # keeps the list storage the views below point into alive
        ids, sq, self.rows_of_list = [], [], {}
        for i in np.flatnonzero(sizes):
            n = int(sizes[i])
            ids.append(faiss.rev_swig_ptr(invlists.get_ids(int(i)), n).astype(np.int64))
            codes_u8 = faiss.rev_swig_ptr(invlists.get_codes(int(i)), n * dim * 4)  # a view, no copy
            rows_mc = codes_u8.view(np.float32).reshape(n, dim)
            rows_mc.flags.writeable = False
            self.rows_of_list[int(i)] = rows_mc
            sq.append(np.einsum("mc,mc->m", rows_mc, rows_mc))
        empty = np.empty(0, np.int64)
        self.ids_m = np.concatenate(ids) if ids else empty
        self.sq_m = np.concatenate(sq) if sq else np.empty(0, np.float32)
        self.nprobe = min(nprobe, nlist)

    def search(self, query_nc: np.ndarray, nprobe: int | None = None) -> np.ndarray:
        """(N, C) -> (N,) nearest row id among the nprobe nearest lists of each query (-1: all empty)."""
        probe = self.nprobe if nprobe is None else min(nprobe, self.centroids_lc.shape[0])
        coarse = (-2.0 * query_nc) @ self.centroids_lc.T + self.cent_sq_l
        probes = np.argpartition(coarse, probe - 1, axis=1)[:, :probe]
        pair_q = np.repeat(np.arange(query_nc.shape[0]), probe)
        pair_l = probes.reshape(-1)
        order = np.argsort(pair_l, kind="stable")
        pair_q, pair_l = pair_q[order], pair_l[order]
        starts = np.flatnonzero(np.r_[True, pair_l[1:] != pair_l[:-1]])
        ends = np.r_[starts[1:], pair_l.size]
        best = np.full(query_nc.shape[0], np.inf, np.float32)
        best_id = np.full(query_nc.shape[0], -1, np.int64)
        for a, b in zip(starts, ends, strict=True):
            list_no = int(pair_l[a])
            lo, hi = self.offsets[list_no], self.offsets[list_no + 1]
            if hi == lo:
                continue
            qs = pair_q[a:b]
            ranking = (-2.0 * query_nc[qs]) @ self.rows_of_list[list_no].T
            ranking += self.sq_m[lo:hi]
            arg = np.argmin(ranking, axis=1)
            val = ranking[np.arange(qs.size), arg]
            better = val < best[qs]
            best[qs[better]] = val[better]
            best_id[qs[better]] = self.ids_m[lo + arg[better]]
        return best_id


@dataclass
class FaissIndex:
    """A faiss index over normalised bank rows; `params` holds the search knob (nprobe or ef_search).

    IVF-Flat indexes are searched with `IvfLists` (BLAS blocks over the same lists) unless
    `engine="faiss"`; HNSW always runs in faiss.
    """

    index: Any
    kind: str
    params: dict[str, int]
    engine: str = "numpy"

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ConfigError(f"unknown ANN index kind {self.kind!r}; known: {', '.join(INDEX_KINDS)}")
        self._lists: IvfLists | None = None
        self.set_params(self.params)

    def set_params(self, params: dict[str, int]) -> None:
        """Apply the search parameter: nprobe (IVF lists visited) or ef_search (HNSW candidate list)."""
        faiss = _faiss()
        self.params = dict(params)
        if self.kind == "ivf-flat":
            ivf = faiss.extract_index_ivf(self.index)
            ivf.nprobe = int(params["nprobe"])
            if self.engine == "numpy":
                if self._lists is None:
                    self._lists = IvfLists(ivf, ivf.nprobe)
                self._lists.nprobe = min(int(params["nprobe"]), int(ivf.nlist))
        else:
            self.index.hnsw.efSearch = int(params["ef_search"])

    @property
    def rows(self) -> int:
        return int(self.index.ntotal)

    def search(self, query_nc: np.ndarray) -> np.ndarray:
        """(N, C) float32 -> (N,) int64 id of the nearest row found."""
        if query_nc.shape[0] == 0:
            return np.empty(0, np.int64)
        query = np.ascontiguousarray(query_nc, dtype=np.float32)
        if self._lists is not None:
            idx_n = self._lists.search(query)
        else:
            idx_n = self.index.search(query, 1)[1][:, 0]
        missing = np.flatnonzero(idx_n < 0)
        if missing.size:
            # Every probed list was empty (k-means leaves empty lists where the bank has duplicate rows, as a
            # full-fraction bank of a plain surface does): those queries probe every list instead, so a normal
            # frame is always scored. Only an index with no rows at all finds nothing.
            idx_n = np.array(idx_n, dtype=np.int64)
            idx_n[missing] = self._search_every_list(query[missing])
            if (idx_n < 0).any():
                raise ConfigError(f"{self.kind} index holds no rows; nothing to search")
        return idx_n.astype(np.int64, copy=False)

    def _search_every_list(self, query_nc: np.ndarray) -> np.ndarray:
        if self.kind != "ivf-flat":  # HNSW answers -1 only when the graph has no rows
            return np.full(query_nc.shape[0], -1, np.int64)
        if self._lists is not None:
            return self._lists.search(query_nc, nprobe=self._lists.centroids_lc.shape[0])
        ivf = _faiss().extract_index_ivf(self.index)
        probe = ivf.nprobe
        ivf.nprobe = int(ivf.nlist)
        try:
            return np.asarray(self.index.search(query_nc, 1)[1][:, 0], dtype=np.int64)
        finally:
            ivf.nprobe = probe

    def neighbours(self, query_nc: np.ndarray, k: int) -> np.ndarray:
        """(N, C) float32 -> (N, k) int64 ids of the k nearest rows found, ascending (-1: not found).

        Run by faiss itself: it serves the few single queries a frame makes (the image score's reweighting
        looks up the neighbours of one bank row), where faiss' per-list loops cost under a millisecond.
        """
        if k < 1:
            raise ConfigError(f"neighbours needs k >= 1, got {k}")
        query = np.ascontiguousarray(query_nc, dtype=np.float32)
        return np.asarray(self.index.search(query, k)[1], dtype=np.int64)

    def save(self, path: Path) -> None:
        _faiss().write_index(self.index, str(path))


def load_index(path: str | Path, kind: str, params: dict[str, int], rows: int, dim: int) -> FaissIndex:
    """Read a faiss index file and check it covers exactly the bank it ships with (rows x dim)."""
    faiss = _faiss()
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as err:  # faiss raises RuntimeError for unreadable or truncated files
        raise CorruptFileError(f"unreadable faiss index: {err}", Path(path)) from None
    if int(index.ntotal) != rows or int(index.d) != dim:
        raise CorruptFileError(
            f"faiss index is {index.ntotal}x{index.d}, its bank is {rows}x{dim}", Path(path)
        )
    return FaissIndex(index, kind, params)
