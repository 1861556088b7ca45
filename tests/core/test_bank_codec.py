"""Bank codecs: decode error bounds, exact/ADC search, sizes, file round trips, budget choice."""

from __future__ import annotations

import numpy as np
import pytest

import core.bank_codec as bank_codec
from core.bank_codec import adc_distances, decode, encoded_size_bytes, load_encoded_bank, nearest
from core.errors import ConfigError, CorruptFileError, ShapeError
from protocol.manifest import BankSpec
from trainer.bank_encode import (
    bank_suffix,
    choose_encoding_for_budget,
    default_pq_m,
    encode_bank,
    save_encoded_bank,
)


def clustered(rows: int, dim: int, seed: int) -> np.ndarray:
    """Rows around 32 centres, like patch features of a few part regions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 3.0, (32, dim))
    return (centres[rng.integers(0, 32, rows)] + rng.normal(0.0, 0.5, (rows, dim))).astype(np.float32)


@pytest.fixture(scope="module")
def bank_mc() -> np.ndarray:
    return clustered(1024, 48, seed=0)


@pytest.fixture(scope="module")
def queries_nc() -> np.ndarray:
    return clustered(300, 48, seed=1)


def exact_knn(rows_mc: np.ndarray, queries_nc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    dist = np.linalg.norm(
        queries_nc[:, None, :].astype(np.float64) - rows_mc[None].astype(np.float64), axis=-1
    )
    idx = np.argsort(dist, axis=1)[:, :k]
    return np.take_along_axis(dist, idx, axis=1), idx


def test_fp16_decode_error_within_half_ulp(bank_mc: np.ndarray) -> None:
    error = np.abs(decode(encode_bank(bank_mc, "fp16")) - bank_mc)
    assert np.all(error <= np.abs(bank_mc) * 2.0**-11 + 1e-7)


def test_int8_decode_error_within_half_step(bank_mc: np.ndarray) -> None:
    encoded = encode_bank(bank_mc, "int8")
    error = np.abs(decode(encoded) - bank_mc)
    assert np.all(error <= encoded.scale[None, :] * 0.5 + 1e-5)
    assert np.allclose(encoded.offset, bank_mc.min(axis=0))


def test_fp32_nearest_matches_exact_search(bank_mc: np.ndarray, queries_nc: np.ndarray) -> None:
    dist, idx = nearest(encode_bank(bank_mc, "fp32"), queries_nc, k=3)
    ref_dist, ref_idx = exact_knn(bank_mc, queries_nc, 3)
    assert np.array_equal(idx, ref_idx)
    assert np.allclose(dist, ref_dist, rtol=1e-4, atol=1e-3)
    assert dist.dtype == np.float32 and idx.dtype == np.int64 and np.all(np.diff(dist, axis=1) >= 0)


def test_nearest_is_identical_across_chunk_sizes(monkeypatch, bank_mc, queries_nc) -> None:
    encoded = encode_bank(bank_mc, "int8")
    whole = nearest(encoded, queries_nc, k=2)
    monkeypatch.setattr(bank_codec, "_CHUNK_BYTES", 4096 * 7)  # 7 queries per chunk
    monkeypatch.setattr(bank_codec, "_ROW_BLOCK", 100)
    chunked = nearest(encoded, queries_nc, k=2)
    assert np.array_equal(whole[1], chunked[1])
    assert np.allclose(whole[0], chunked[0], rtol=1e-5)


def test_pq_adc_equals_distance_to_decoded_rows(bank_mc, queries_nc) -> None:
    encoded = encode_bank(bank_mc, "pq", pq_m=6, seed=0)
    decoded = decode(encoded)
    adc = adc_distances(encoded, queries_nc)
    exact = np.linalg.norm(queries_nc[:, None, :] - decoded[None], axis=-1)
    assert np.allclose(adc, exact, rtol=1e-4, atol=1e-3)
    dist, idx = nearest(encoded, queries_nc, k=3)
    assert np.allclose(dist, np.take_along_axis(adc, idx, axis=1), rtol=1e-4, atol=1e-3)
    assert np.allclose(dist[:, 0], adc.min(axis=1), rtol=1e-4, atol=1e-3)


def test_pq_distances_stay_close_to_true_distances(bank_mc, queries_nc) -> None:
    dist, _ = nearest(encode_bank(bank_mc, "pq", pq_m=6), queries_nc, k=1)
    ref_dist, _ = exact_knn(bank_mc, queries_nc, 1)
    assert np.median(np.abs(dist[:, 0] - ref_dist[:, 0]) / ref_dist[:, 0]) < 0.25


def test_pq_encoding_is_deterministic(bank_mc: np.ndarray) -> None:
    first, second = encode_bank(bank_mc, "pq", seed=3), encode_bank(bank_mc, "pq", seed=3)
    assert np.array_equal(first.data, second.data) and np.array_equal(first.codebooks, second.codebooks)


def test_sizes_int8_4x_and_pq_at_least_8x() -> None:
    feats = clustered(4096, 96, seed=2)
    sizes = {enc: encode_bank(feats, enc).nbytes for enc in ("fp32", "fp16", "int8", "pq")}
    assert sizes["fp32"] == feats.nbytes and sizes["fp16"] * 2 == sizes["fp32"]
    assert sizes["fp32"] / sizes["int8"] >= 3.99
    assert sizes["fp32"] / sizes["pq"] >= 8.0
    for enc, size in sizes.items():
        assert encoded_size_bytes(4096, 96, enc, default_pq_m(96)) == size


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8", "pq"])
def test_save_and_load_round_trip(tmp_path, bank_mc, encoding: str) -> None:
    encoded = encode_bank(bank_mc, encoding)
    relpath = f"banks/rgb{bank_suffix(encoding)}"
    save_encoded_bank(encoded, tmp_path / relpath)
    spec = BankSpec(relpath, encoding, 1024, 48, 28, pq_m=default_pq_m(48) if encoding == "pq" else None)
    loaded = load_encoded_bank(tmp_path, spec)
    assert loaded.encoding == encoding and loaded.nbytes == encoded.nbytes
    assert np.array_equal(decode(loaded), decode(encoded))


def test_load_rejects_wrong_shape_garbage_and_pickles(tmp_path, bank_mc) -> None:
    save_encoded_bank(encode_bank(bank_mc, "fp32"), tmp_path / "rgb.npy")
    with pytest.raises(ShapeError, match="manifest says 999x48"):
        load_encoded_bank(tmp_path, BankSpec("rgb.npy", "fp32", 999, 48, 28))
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CorruptFileError, match="bad.npz"):
        load_encoded_bank(tmp_path, BankSpec("bad.npz", "int8", 1024, 48, 28))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CorruptFileError, match="obj.npy"):
        load_encoded_bank(tmp_path, BankSpec("obj.npy", "fp32", 1, 48, 28))


def test_nearest_rejects_bad_queries(bank_mc: np.ndarray) -> None:
    encoded = encode_bank(bank_mc, "fp16")
    with pytest.raises(ShapeError, match=r"queries must be \(N, 48\), got \(4, 47\)"):
        nearest(encoded, np.zeros((4, 47), np.float32))
    with pytest.raises(ShapeError, match="queries hold NaN or inf"):
        nearest(encoded, np.full((4, 48), np.nan, np.float32))
    with pytest.raises(ShapeError, match=r"k must lie in \[1, 1024\], got 0"):
        nearest(encoded, np.zeros((4, 48), np.float32), k=0)


def test_choose_encoding_for_budget_prefers_least_compression() -> None:
    banks = {"rgb": (10000, 768), "point": (10000, 1152), "fusion": np.zeros((10000, 1920), np.float32)}
    assert set(choose_encoding_for_budget(banks, 1000).values()) == {"fp32"}
    # 148.5 MiB in fp32; 100 MiB forces compression of the biggest banks first
    chosen = choose_encoding_for_budget(banks, 100)
    assert chosen["fusion"] != "fp32" and chosen["rgb"] == "fp32"
    assert choose_encoding_for_budget(banks, 10) == {"fusion": "pq", "point": "pq", "rgb": "pq"}
    with pytest.raises(ConfigError, match="budget"):
        choose_encoding_for_budget(banks, 1)
    assert choose_encoding_for_budget({"tiny": (100, 48)}, 0.005) == {"tiny": "int8"}  # too few rows for pq


def test_choose_encoding_for_budget_uses_int8_everywhere_before_any_pq() -> None:
    # The demo's weight-free banks (2.95 MiB fp32): 1 MiB is reachable without PQ, which the old
    # largest-bank-first rule spent on the fusion bank (costing up to 0.5 AUPRO).
    banks = {"rgb": (3136, 35), "point": (12544, 9), "fusion": (12544, 44)}
    assert choose_encoding_for_budget(banks, 1.0) == {"fusion": "int8", "point": "fp16", "rgb": "fp16"}
    assert "pq" not in choose_encoding_for_budget(banks, 0.75).values()
