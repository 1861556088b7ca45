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

__all__ = ["INDEX_KINDS", "FaissIndex", "load_index"]

INDEX_KINDS = ("ivf-flat", "hnsw")


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as err:  # the bundle asks for an index but faiss-cpu is not installed
        raise ConfigError(
            "this bundle ships an ANN index; install faiss-cpu (the `edge` extra has it)"
        ) from err
    return faiss


@dataclass
class FaissIndex:
    """A faiss index over normalised bank rows; `params` holds the search knob (nprobe or ef_search)."""

    index: Any
    kind: str
    params: dict[str, int]

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ConfigError(f"unknown ANN index kind {self.kind!r}; known: {', '.join(INDEX_KINDS)}")
        self.set_params(self.params)

    def set_params(self, params: dict[str, int]) -> None:
        """Apply the search parameter: nprobe (IVF lists visited) or ef_search (HNSW candidate list)."""
        faiss = _faiss()
        self.params = dict(params)
        if self.kind == "ivf-flat":
            faiss.extract_index_ivf(self.index).nprobe = int(params["nprobe"])
        else:
            self.index.hnsw.efSearch = int(params["ef_search"])

    @property
    def rows(self) -> int:
        return int(self.index.ntotal)

    def search(self, query_nc: np.ndarray) -> np.ndarray:
        """(N, C) float32 -> (N,) int64 id of the nearest row found."""
        if query_nc.shape[0] == 0:
            return np.empty(0, np.int64)
        _, idx_nk = self.index.search(np.ascontiguousarray(query_nc, dtype=np.float32), 1)
        idx_n = idx_nk[:, 0]
        if (idx_n < 0).any():  # fewer rows reachable than asked (tiny lists): faiss pads with -1
            raise ConfigError(f"{self.kind} index found no neighbour for some queries; raise {self.params}")
        return idx_n.astype(np.int64, copy=False)

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
