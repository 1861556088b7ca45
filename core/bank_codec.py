"""Compressed memory banks on the station: load, decode, and nearest-neighbour search (numpy only).

Encodings (the trainer writes them, `trainer.bank_encode`): "fp32", "fp16" (.npy of the rows);
"int8" (.npz: `codes` uint8 (M,C) with per-dimension `scale` and `offset`, x ~ offset + scale * code);
"pq" (.npz: `codes` uint8 (M,m) and `codebooks` f32 (m,256,C/m), product quantisation).
Searches return Euclidean distances and sit under core.scoring's kNN step.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import CorruptFileError, ShapeError
from protocol.manifest import BankSpec

__all__ = [
    "ENCODINGS",
    "PQ_CENTROIDS",
    "EncodedBank",
    "adc_distances",
    "decode",
    "encoded_size_bytes",
    "load_encoded_bank",
    "nearest",
]

ENCODINGS = ("fp32", "fp16", "int8", "pq")
PQ_CENTROIDS = 256  # one uint8 code per sub-quantiser
_CHUNK_BYTES = 64 * 2**20  # distance matrix per query chunk, bounds a station's peak RAM
_ROW_BLOCK = 4096  # rows decoded at once


@dataclass(frozen=True, eq=False)
class EncodedBank:
    """A memory bank of `rows` x `dim` features in one encoding.

    Attributes:
        encoding: "fp32" | "fp16" | "int8" | "pq".
        data: fp32/fp16: (M, C) rows; int8: (M, C) uint8 codes; pq: (M, m) uint8 codes.
        scale: int8 only, (C,) f32 step per dimension.
        offset: int8 only, (C,) f32 value of code 0 per dimension.
        codebooks: pq only, (m, 256, C/m) f32 sub-quantiser centroids.
    """

    encoding: str
    data: np.ndarray
    scale: np.ndarray | None = None
    offset: np.ndarray | None = None
    codebooks: np.ndarray | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def rows(self) -> int:
        return int(self.data.shape[0])

    @property
    def dim(self) -> int:
        if self.encoding == "pq":
            assert self.codebooks is not None
            return int(self.codebooks.shape[0] * self.codebooks.shape[2])
        return int(self.data.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes held: codes plus scales/offsets/codebooks (what a station keeps in memory)."""
        extras = (self.scale, self.offset, self.codebooks)
        return int(self.data.nbytes + sum(a.nbytes for a in extras if a is not None))


_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.uint8, "pq": np.uint8}


def _validate(bank: EncodedBank) -> None:
    """Raise ShapeError unless arrays have the dtypes/shapes the encoding needs."""
    if bank.encoding not in ENCODINGS:
        raise ShapeError(f"unknown bank encoding {bank.encoding!r}; known: {ENCODINGS}")
    if bank.data.ndim != 2 or bank.data.dtype != _DTYPES[bank.encoding] or bank.data.shape[0] == 0:
        raise ShapeError(f"{bank.encoding} bank data must be non-empty 2-D {_DTYPES[bank.encoding].__name__}")
    need_affine, need_books = bank.encoding == "int8", bank.encoding == "pq"
    if need_affine != (bank.scale is not None and bank.offset is not None):
        raise ShapeError("scale and offset are required for int8 and only for int8")
    if need_books != (bank.codebooks is not None):
        raise ShapeError("codebooks are required for pq and only for pq")
    if need_affine:
        assert bank.scale is not None and bank.offset is not None
        for name, arr in (("scale", bank.scale), ("offset", bank.offset)):
            if arr.shape != (bank.data.shape[1],) or arr.dtype != np.float32 or not np.isfinite(arr).all():
                raise ShapeError(f"int8 {name} must be finite float32 of shape ({bank.data.shape[1]},)")
    if need_books:
        assert bank.codebooks is not None
        books = bank.codebooks
        if (
            books.ndim != 3
            or books.shape[:2] != (bank.data.shape[1], PQ_CENTROIDS)
            or books.dtype != np.float32
        ):
            raise ShapeError(f"pq codebooks must be float32 (m={bank.data.shape[1]}, 256, C/m)")


def encoded_size_bytes(rows: int, dim: int, encoding: str, pq_m: int | None = None) -> int:
    """Bytes an encoded bank takes (codes + side arrays), without building it."""
    if encoding == "fp32":
        return rows * dim * 4
    if encoding == "fp16":
        return rows * dim * 2
    if encoding == "int8":
        return rows * dim + 2 * dim * 4
    if encoding == "pq":
        if pq_m is None:
            raise ShapeError("pq size needs pq_m")
        return rows * pq_m + PQ_CENTROIDS * dim * 4
    raise ShapeError(f"unknown bank encoding {encoding!r}; known: {ENCODINGS}")


# -------------------------------------------------------------------------------------------- load


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Arrays of one .npy ("data") or .npz file, never unpickling; bad files raise CorruptFileError."""
    try:
        # our own handle: numpy leaks the one it opens when a damaged .npz fails to parse
        with path.open("rb") as handle:
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                return {"data": loaded}
            with loaded:
                return {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CorruptFileError(f"cannot read bank: {type(exc).__name__}: {exc}", path) from None


def load_encoded_bank(bundle_dir: str | Path, spec: BankSpec) -> EncodedBank:
    """Load the bank `spec.path` (relative to `bundle_dir`) and check it against the manifest's spec."""
    path = Path(bundle_dir) / spec.path
    if not path.is_file():
        raise CorruptFileError("bank file missing", path)
    arrays = _read_arrays(path)
    key = "codes" if spec.encoding in ("int8", "pq") else "data"
    if key not in arrays:
        raise CorruptFileError(f"bank file has no {key!r} array (encoding {spec.encoding})", path)
    try:
        bank = EncodedBank(
            spec.encoding,
            arrays[key],
            scale=arrays.get("scale"),
            offset=arrays.get("offset"),
            codebooks=arrays.get("codebooks"),
        )
    except ShapeError as exc:
        raise ShapeError(str(exc), path) from None
    if (bank.rows, bank.dim) != (spec.rows, spec.dim):
        raise ShapeError(f"bank is {bank.rows}x{bank.dim}, manifest says {spec.rows}x{spec.dim}", path)
    if bank.encoding in ("fp32", "fp16") and not np.isfinite(bank.data).all():
        raise CorruptFileError("bank holds NaN or inf", path)
    return bank


# ------------------------------------------------------------------------------------ decode/search


def _decode_rows(bank: EncodedBank, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) decoded to float32 (R, C)."""
    codes = bank.data[start:stop]
    if bank.encoding in ("fp32", "fp16"):
        return codes.astype(np.float32, copy=False)
    if bank.encoding == "int8":
        assert bank.scale is not None and bank.offset is not None
        return bank.offset + codes.astype(np.float32) * bank.scale
    assert bank.codebooks is not None
    m = bank.codebooks.shape[0]
    return bank.codebooks[np.arange(m)[None, :], codes].reshape(len(codes), -1)  # (R, m, C/m) -> (R, C)


def decode(bank: EncodedBank) -> np.ndarray:
    """Decoded rows, float32 (M, C). For pq these are the centroid concatenations the ADC measures to."""
    return _decode_rows(bank, 0, bank.rows)


def _top_k(dist2_nm: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k smallest squared distances per row, ascending; returns (Euclidean dist, idx)."""
    if k < dist2_nm.shape[1]:
        idx = np.argpartition(dist2_nm, k - 1, axis=1)[:, :k]
    else:
        idx = np.broadcast_to(np.arange(dist2_nm.shape[1]), dist2_nm.shape).copy()
    part = np.take_along_axis(dist2_nm, idx, axis=1)
    order = np.argsort(part, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    dist = np.sqrt(np.maximum(np.take_along_axis(part, order, axis=1), 0.0))
    return dist.astype(np.float32), idx.astype(np.int64)


def _dist2(bank: EncodedBank, queries_nc: np.ndarray) -> np.ndarray:
    """Squared distances (N, M) as |q|^2 - 2 q.x + |x|^2, decoding one block of rows at a time.

    Only _ROW_BLOCK rows are ever decoded at once, so a compressed bank stays compressed in memory.
    """
    q_sq = np.einsum("nc,nc->n", queries_nc, queries_nc)[:, None]
    dist2 = np.empty((len(queries_nc), bank.rows), np.float32)
    for start in range(0, bank.rows, _ROW_BLOCK):
        rows_rc = _decode_rows(bank, start, start + _ROW_BLOCK)
        rows_sq = np.einsum("rc,rc->r", rows_rc, rows_rc)[None, :]
        dist2[:, start : start + len(rows_rc)] = q_sq - 2.0 * (queries_nc @ rows_rc.T) + rows_sq
    return dist2


def adc_distances(bank: EncodedBank, queries_nc: np.ndarray) -> np.ndarray:
    """Reference ADC for a pq bank via lookup tables: Euclidean distances (N, M) float32.

    Tables (m, N, 256) hold |q_j - c_jk|^2 per sub-space; a row's distance sums its codes' entries. This
    equals the distance to the decoded row; `nearest` gets the same numbers with one GEMM per row block,
    which numpy runs ~10x faster than m gathers of (N, M) each.
    """
    if bank.encoding != "pq" or bank.codebooks is None:
        raise ShapeError(f"adc_distances needs a pq bank, got {bank.encoding}")
    books = bank.codebooks
    m, _, sub = books.shape
    q_mns = np.ascontiguousarray(np.asarray(queries_nc, np.float32).reshape(-1, m, sub).transpose(1, 0, 2))
    cross = np.matmul(q_mns, books.transpose(0, 2, 1))  # (m, N, 256)
    table = (q_mns**2).sum(-1)[:, :, None] - 2.0 * cross + (books**2).sum(-1)[:, None, :]
    codes_mr = np.ascontiguousarray(bank.data.T.astype(np.intp))
    dist2 = np.zeros((q_mns.shape[1], bank.rows), np.float32)
    for j in range(m):  # one vectorised (N, M) gather per sub-quantiser
        dist2 += np.take(table[j], codes_mr[j], axis=1)
    return np.sqrt(np.maximum(dist2, 0.0))


def nearest(bank: EncodedBank, queries_nc: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """k nearest bank rows per query, searched in query chunks and decoded row blocks.

    Every encoding is searched against its decoded rows. For pq that is asymmetric distance computation
    (float query vs quantised rows): the same distances `adc_distances` gets from lookup tables, so no
    re-ranking of candidates is needed (re-ranking with decoded vectors would reproduce these numbers).

    Args:
        bank: the encoded bank, M rows of C dims.
        queries_nc: (N, C) float queries.
        k: neighbours per query, 1 <= k <= M.

    Returns:
        (dist (N, k) float32 Euclidean, ascending; idx (N, k) int64 row indices).
    """
    queries_nc = np.ascontiguousarray(queries_nc, dtype=np.float32)
    if queries_nc.ndim != 2 or queries_nc.shape[1] != bank.dim:
        raise ShapeError(f"queries must be (N, {bank.dim}), got {queries_nc.shape}")
    if not np.isfinite(queries_nc).all():
        raise ShapeError("queries hold NaN or inf")
    if not 1 <= k <= bank.rows:
        raise ShapeError(f"k must lie in [1, {bank.rows}], got {k}")
    chunk = max(1, _CHUNK_BYTES // (bank.rows * 4))
    dists, idxs = [np.zeros((0, k), np.float32)], [np.zeros((0, k), np.int64)]
    for start in range(0, len(queries_nc), chunk):
        dist, idx = _top_k(_dist2(bank, queries_nc[start : start + chunk]), k)
        dists.append(dist)
        idxs.append(idx)
    return np.concatenate(dists), np.concatenate(idxs)
