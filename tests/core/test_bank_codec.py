"""Bank codecs: decode error bounds, exact/ADC search, sizes, file round trips, budget choice."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

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


# ------------------------------------------------------------------ load errors name the file at fault


def _refused(exc_type: type[Exception], message: str, fn: Callable[..., object], *args: object) -> Exception:
    """The error `fn(*args)` raises, whose whole text must be `message` (the reason a station logs)."""
    with pytest.raises(exc_type, match=f"^{re.escape(message)}$") as info:
        fn(*args)
    return info.value


def _load_refused(exc_type: type[Exception], root: Path, spec: BankSpec, reason: str) -> None:
    err = _refused(exc_type, f"{root / spec.path}: {reason}", load_encoded_bank, root, spec)
    assert err.path == str(root / spec.path)  # type: ignore[attr-defined]


def test_each_load_error_names_its_file_and_reason(tmp_path, bank_mc) -> None:
    _load_refused(CorruptFileError, tmp_path, BankSpec("none.npy", "fp32", 1, 48, 28), "bank file missing")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CorruptFileError, match="bad.npz: cannot read bank: BadZipFile: ") as garbage:
        load_encoded_bank(tmp_path, BankSpec("bad.npz", "int8", 1, 48, 28))
    assert garbage.value.path == str(tmp_path / "bad.npz")
    np.savez(tmp_path / "nocodes.npz", data=bank_mc)
    no_codes = BankSpec("nocodes.npz", "int8", 1024, 48, 28)
    _load_refused(CorruptFileError, tmp_path, no_codes, "bank file has no 'codes' array (encoding int8)")
    np.savez(tmp_path / "noscale.npz", codes=np.zeros((1024, 48), np.uint8))
    no_scale = BankSpec("noscale.npz", "int8", 1024, 48, 28)
    _load_refused(ShapeError, tmp_path, no_scale, "scale and offset are required for int8 and only for int8")
    save_encoded_bank(encode_bank(bank_mc, "fp16"), tmp_path / "rgb.npy")
    wrong = BankSpec("rgb.npy", "fp16", 1024, 47, 28)
    _load_refused(ShapeError, tmp_path, wrong, "bank is 1024x48, manifest says 1024x47")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_float_bank_holding_nan_or_inf_is_refused(tmp_path, dtype) -> None:
    rows = np.ones((4, 3), dtype)
    rows[2, 1] = np.inf if dtype == np.float16 else np.nan
    np.save(tmp_path / "bank.npy", rows)
    spec = BankSpec("bank.npy", "fp16" if dtype == np.float16 else "fp32", 4, 3, 2)
    _load_refused(CorruptFileError, tmp_path, spec, "bank holds NaN or inf")


# ------------------------------------------------------------------------------ search edge cases


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8", "pq"])
def test_nearest_one_is_the_exact_argmin_over_decoded_rows(bank_mc, queries_nc, encoding: str) -> None:
    encoded = encode_bank(bank_mc, encoding, pq_m=6 if encoding == "pq" else None)
    dist, idx = nearest(encoded, queries_nc)  # default k = 1
    ref_dist, ref_idx = exact_knn(decode(encoded), queries_nc, 1)
    assert dist.shape == idx.shape == (300, 1)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-3)


def test_k_may_be_every_row_and_comes_back_fully_sorted() -> None:
    rows = clustered(40, 8, seed=3)
    queries = clustered(5, 8, seed=4)
    encoded = encode_bank(rows, "int8")
    for k in (39, 40):  # argpartition just below M, and the whole-bank branch
        dist, idx = nearest(encoded, queries, k=k)
        ref_dist, ref_idx = exact_knn(decode(encoded), queries, k)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-3)
        assert dist.shape == (5, k) and np.all(np.diff(dist, axis=1) >= 0)


def test_a_query_on_a_bank_row_is_at_distance_zero(bank_mc) -> None:
    for encoding, pq_m in (("fp32", None), ("pq", 6)):
        encoded = encode_bank(bank_mc, encoding, pq_m=pq_m)
        rows = decode(encoded)[:20]
        dist, idx = nearest(encoded, rows)
        # |q|² - 2q·x + |x|² (|x|² ~ 450) cancels to float32 rounding (< 0.01 here), clamped at 0, not at 1
        assert np.all(dist[:, 0] < 0.05)
        assert np.all(np.linalg.norm(decode(encoded)[idx[:, 0]] - rows, axis=1) == 0)
        if encoding == "pq":
            adc = adc_distances(encoded, rows)
            assert adc.dtype == np.float32 and adc.shape == (20, 1024)
            assert np.all(adc[np.arange(20), idx[:, 0]] < 0.05)


def test_float64_queries_search_exactly_like_their_float32_cast(bank_mc, queries_nc) -> None:
    encoded = encode_bank(bank_mc, "int8")
    as64 = nearest(encoded, queries_nc.astype(np.float64) + 1e-9, k=2)
    as32 = nearest(encoded, (queries_nc.astype(np.float64) + 1e-9).astype(np.float32), k=2)
    assert np.array_equal(as64[0], as32[0]) and np.array_equal(as64[1], as32[1])


def test_adc_distances_refuses_a_bank_without_codebooks(bank_mc) -> None:
    for encoding in ("fp32", "int8"):
        with pytest.raises(ShapeError, match=f"adc_distances needs a pq bank, got {encoding}"):
            adc_distances(encode_bank(bank_mc, encoding), bank_mc[:2])


def test_a_search_decodes_one_row_block_at_a_time(monkeypatch) -> None:
    import tracemalloc

    encoded = encode_bank(clustered(20_000, 48, seed=5), "int8")  # 3.8 MB once decoded to float32
    monkeypatch.setattr(bank_codec, "_ROW_BLOCK", 500)  # 96 kB per block
    queries = clustered(2, 48, seed=6)
    tracemalloc.start()
    try:
        nearest(encoded, queries)
        _, peak_b = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_b < 1_000_000, f"search allocated {peak_b / 1e6:.1f} MB for a 0.96 MB int8 bank"


# ------------------------------------------------------------------------------- layout validation

_INT8_SIDE = {"scale": np.ones(3, np.float32), "offset": np.zeros(3, np.float32)}
_BOOKS = np.zeros((2, 256, 4), np.float32)  # m = 2 sub-quantisers of 4 dims: C = 8

_AFFINE = "scale and offset are required for int8 and only for int8"
_NEED_BOOKS = "codebooks are required for pq and only for pq"
_BOOKS_M2 = "pq codebooks must be float32 (m=2, 256, C/m)"
_U8_43 = np.zeros((4, 3), np.uint8)
_U8_42 = np.zeros((4, 2), np.uint8)
_BAD_LAYOUTS = [
    ("bf16", _U8_43, {}, "unknown bank encoding 'bf16'; known: ('fp32', 'fp16', 'int8', 'pq')"),
    ("fp32", np.zeros(3, np.float32), {}, "fp32 bank data must be non-empty 2-D float32"),
    ("fp32", np.zeros((4, 3), np.float64), {}, "fp32 bank data must be non-empty 2-D float32"),
    ("fp16", np.zeros((0, 3), np.float16), {}, "fp16 bank data must be non-empty 2-D float16"),
    ("int8", np.zeros((4, 3), np.int8), _INT8_SIDE, "int8 bank data must be non-empty 2-D uint8"),
    ("int8", _U8_43, {"scale": np.ones(3, np.float32)}, _AFFINE),
    ("fp32", np.zeros((4, 3), np.float32), _INT8_SIDE, _AFFINE),
    (
        "int8",
        _U8_43,
        _INT8_SIDE | {"scale": np.ones(4, np.float32)},
        "int8 scale must be finite float32 of shape (3,)",
    ),
    (
        "int8",
        _U8_43,
        _INT8_SIDE | {"offset": np.zeros(3)},
        "int8 offset must be finite float32 of shape (3,)",
    ),
    (
        "int8",
        _U8_43,
        _INT8_SIDE | {"scale": np.array([1, np.inf, 1], np.float32)},
        "int8 scale must be finite float32 of shape (3,)",
    ),
    ("pq", _U8_42, {}, _NEED_BOOKS),
    ("int8", _U8_43, _INT8_SIDE | {"codebooks": _BOOKS}, _NEED_BOOKS),
    ("pq", _U8_43, {"codebooks": _BOOKS}, "pq codebooks must be float32 (m=3, 256, C/m)"),
    ("pq", _U8_42, {"codebooks": np.zeros((2, 128, 4), np.float32)}, _BOOKS_M2),
    ("pq", _U8_42, {"codebooks": _BOOKS[:, :, 0]}, _BOOKS_M2),
    ("pq", _U8_42, {"codebooks": _BOOKS.astype(np.float16)}, _BOOKS_M2),
]


@pytest.mark.parametrize(("encoding", "data", "side", "message"), _BAD_LAYOUTS)
def test_each_malformed_layout_is_refused_with_its_reason(encoding, data, side, message) -> None:
    sides = [side.get(n) for n in ("scale", "offset", "codebooks")]
    _refused(ShapeError, message, bank_codec.EncodedBank, encoding, data, *sides)


def test_the_smallest_valid_banks_are_accepted_and_decode_to_float32() -> None:
    banks = [
        bank_codec.EncodedBank("fp32", np.ones((1, 3), np.float32)),  # one row is a bank
        bank_codec.EncodedBank("fp16", np.ones((1, 3), np.float16)),
        bank_codec.EncodedBank("int8", np.full((1, 3), 2, np.uint8), **_INT8_SIDE),
        bank_codec.EncodedBank("pq", np.zeros((1, 2), np.uint8), codebooks=_BOOKS + 1.0),
    ]
    for bank in banks:
        rows = decode(bank)
        assert rows.dtype == np.float32 and rows.shape == (1, bank.dim)
        np.testing.assert_array_equal(rows, np.full((1, bank.dim), 1.0 if bank.encoding != "int8" else 2.0))
    assert [b.dim for b in banks] == [3, 3, 3, 8]


def test_size_needs_pq_m_for_pq_and_a_known_encoding() -> None:
    _refused(ShapeError, "pq size needs pq_m", encoded_size_bytes, 10, 8, "pq")
    unknown = "unknown bank encoding 'bf16'; known: ('fp32', 'fp16', 'int8', 'pq')"
    _refused(ShapeError, unknown, encoded_size_bytes, 10, 8, "bf16")
    assert encoded_size_bytes(10, 8, "pq", 2) == 10 * 2 + 256 * 8 * 4
    assert encoded_size_bytes(10, 8, "int8") == 80 + 64
