"""Memory-bank compression for the bundle: encode float32 banks and pick encodings that fit a size budget.

Sits between the coreset (float32 banks in the model dir) and `trainer.bundle`; stations decode and search
with `core.bank_codec`. PQ is trained with a batched, seeded numpy k-means (same input, same codes).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from core.bank_codec import ENCODINGS, PQ_CENTROIDS, EncodedBank, encoded_size_bytes
from core.errors import ConfigError, ShapeError

__all__ = ["bank_suffix", "choose_encoding_for_budget", "default_pq_m", "encode_bank", "save_encoded_bank"]

_PQ_SUB_DIM = 8  # dims per sub-quantiser: 8 keeps ADC error small at 32x fewer code bytes than fp32
_PQ_ITERATIONS = 12
_PQ_MAX_TRAIN_ROWS = 16 * PQ_CENTROIDS  # k-means sees at most this many rows; all rows get encoded


def default_pq_m(dim: int) -> int:
    """Sub-quantiser count: dim / d_sub for the smallest divisor d_sub >= 8 of dim (1152 -> 144)."""
    sub = next(s for s in range(min(_PQ_SUB_DIM, dim), dim + 1) if dim % s == 0)
    return dim // sub


def _encode_int8(feats_mc: np.ndarray) -> EncodedBank:
    """Per-dimension min/max affine uint8 codes; error per value <= scale / 2."""
    low_c = feats_mc.min(axis=0)
    span_c = feats_mc.max(axis=0) - low_c
    scale_c = np.where(span_c > 0, span_c / 255.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint((feats_mc - low_c) / scale_c), 0, 255).astype(np.uint8)
    return EncodedBank("int8", codes, scale=scale_c, offset=low_c.astype(np.float32))


def _assign(x_mns: np.ndarray, books_mks: np.ndarray) -> np.ndarray:
    """Nearest centroid per sub-space and row: (m, N) int64, sub-spaces in groups to bound memory."""
    group = max(1, 2**27 // (x_mns.shape[1] * PQ_CENTROIDS * 4))
    out = np.empty(x_mns.shape[:2], np.int64)
    for g in range(0, len(x_mns), group):
        x, books = x_mns[g : g + group], books_mks[g : g + group]
        # |x|^2 is constant per row, so argmin needs only |c|^2 - 2 x.c
        scores = (books**2).sum(-1)[:, None, :] - 2.0 * np.matmul(x, books.transpose(0, 2, 1))
        out[g : g + group] = scores.argmin(-1)
    return out


def _kmeans_subspaces(x_mns: np.ndarray, seed: int, iterations: int) -> np.ndarray:
    """Lloyd k-means with 256 centroids in every sub-space at once: (m, N, s) -> codebooks (m, 256, s)."""
    m, n, sub = x_mns.shape
    rng = np.random.default_rng(seed)
    books = x_mns[:, rng.choice(n, PQ_CENTROIDS, replace=False)].copy()
    for _ in range(iterations):
        flat = (_assign(x_mns, books) + np.arange(m)[:, None] * PQ_CENTROIDS).ravel()
        counts = np.bincount(flat, minlength=m * PQ_CENTROIDS).reshape(m, PQ_CENTROIDS, 1)
        sums = np.stack(
            [np.bincount(flat, x_mns[..., d].ravel(), m * PQ_CENTROIDS) for d in range(sub)], axis=-1
        ).reshape(m, PQ_CENTROIDS, sub)
        # an empty cluster keeps its centroid rather than collapsing to the origin
        books = np.where(counts > 0, sums / np.maximum(counts, 1), books).astype(np.float32)
    return books


def _encode_pq(feats_mc: np.ndarray, pq_m: int, seed: int) -> EncodedBank:
    """Product quantisation: pq_m sub-quantisers x 256 centroids (numpy k-means), one uint8 code each."""
    rows, dim = feats_mc.shape
    if dim % pq_m:
        raise ConfigError(f"pq_m={pq_m} must divide the feature dim {dim}")
    if rows < PQ_CENTROIDS:
        raise ConfigError(f"pq needs at least {PQ_CENTROIDS} rows to train 256 centroids, got {rows}")
    x_mns = np.ascontiguousarray(feats_mc.reshape(rows, pq_m, dim // pq_m).transpose(1, 0, 2))
    train = x_mns[:, np.random.default_rng(seed).permutation(rows)[:_PQ_MAX_TRAIN_ROWS]]
    books = _kmeans_subspaces(np.ascontiguousarray(train), seed, _PQ_ITERATIONS)
    codes = _assign(x_mns, books).T.astype(np.uint8)
    return EncodedBank("pq", np.ascontiguousarray(codes), codebooks=books)


def encode_bank(feats_mc: np.ndarray, encoding: str, pq_m: int | None = None, seed: int = 0) -> EncodedBank:
    """Encode a float32 bank.

    Args:
        feats_mc: (M, C) float32 bank rows, finite.
        encoding: "fp32" | "fp16" | "int8" | "pq".
        pq_m: pq sub-quantisers (must divide C); default `default_pq_m(C)`.
        seed: k-means seed for pq.

    Returns:
        The EncodedBank (see core.bank_codec for each layout).
    """
    feats_mc = np.ascontiguousarray(feats_mc, dtype=np.float32)
    if feats_mc.ndim != 2 or feats_mc.shape[0] == 0 or not np.isfinite(feats_mc).all():
        raise ShapeError(f"bank must be a finite, non-empty (M, C) array, got shape {feats_mc.shape}")
    if encoding == "fp32":
        return EncodedBank("fp32", feats_mc)
    if encoding == "fp16":
        if np.abs(feats_mc).max() > np.finfo(np.float16).max:
            raise ShapeError("bank values overflow float16")
        return EncodedBank("fp16", feats_mc.astype(np.float16))
    if encoding == "int8":
        return _encode_int8(feats_mc)
    if encoding == "pq":
        return _encode_pq(feats_mc, pq_m or default_pq_m(feats_mc.shape[1]), seed)
    raise ConfigError(f"unknown bank encoding {encoding!r}; known: {ENCODINGS}")


def bank_suffix(encoding: str) -> str:
    """File suffix of a bank in this encoding: plain rows as .npy, codes with side arrays as .npz."""
    return ".npy" if encoding in ("fp32", "fp16") else ".npz"


def save_encoded_bank(bank: EncodedBank, path: str | Path) -> Path:
    """Write `bank` where `core.bank_codec.load_encoded_bank` reads it; the suffix must match the encoding."""
    path = Path(path)
    if path.suffix != bank_suffix(bank.encoding):
        raise ConfigError(f"{path}: a {bank.encoding} bank is stored as {bank_suffix(bank.encoding)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if bank.encoding in ("fp32", "fp16"):
        np.save(path, bank.data, allow_pickle=False)
    elif bank.encoding == "int8":
        np.savez(path, codes=bank.data, scale=bank.scale, offset=bank.offset)
    else:
        np.savez(path, codes=bank.data, codebooks=bank.codebooks)
    return path


def _shape(bank: np.ndarray | tuple[int, int]) -> tuple[int, int]:
    rows, dim = bank.shape if isinstance(bank, np.ndarray) else bank
    return int(rows), int(dim)


def choose_encoding_for_budget(
    banks: Mapping[str, np.ndarray | tuple[int, int]], budget_mb: float
) -> dict[str, str]:
    """Least compression that fits: step banks along fp32 -> fp16 -> int8 -> pq, the least-compressed first.

    Among the banks at the lowest step the largest moves first. No bank moves to a lossier step while another
    can still take the current one: measured on our banks, int8 costs ~0 I-AUROC and PQ up to 0.5 AUPRO, so
    int8 everywhere beats PQ on the biggest bank.

    Args:
        banks: name -> (M, C) bank array or its (rows, dim) shape.
        budget_mb: total for all banks, in MiB (2**20 bytes).

    Returns:
        name -> encoding. Raises ConfigError if even pq everywhere does not fit.
    """
    shapes = {name: _shape(bank) for name, bank in banks.items()}
    budget_bytes = budget_mb * 2**20
    steps = {
        name: ["fp32", "fp16", "int8"] + (["pq"] if rows >= PQ_CENTROIDS else [])
        for name, (rows, _) in shapes.items()
    }
    level = dict.fromkeys(shapes, 0)

    def size(name: str) -> int:
        rows, dim = shapes[name]
        return encoded_size_bytes(rows, dim, steps[name][level[name]], default_pq_m(dim))

    while sum(size(name) for name in shapes) > budget_bytes:
        movable = [name for name in sorted(shapes) if level[name] + 1 < len(steps[name])]
        if not movable:
            total_mb = sum(size(name) for name in shapes) / 2**20
            raise ConfigError(
                f"banks need {total_mb:.3f} MiB even fully compressed; budget is {budget_mb} MiB"
            )
        level[min(movable, key=lambda name: (level[name], -size(name)))] += 1
    return {name: steps[name][level[name]] for name in sorted(shapes)}
