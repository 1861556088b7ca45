"""core.ann.IvfLists: the same neighbours as faiss's own IVF search, without a second copy of the bank."""

from __future__ import annotations

import gc
import sys
import tracemalloc
from pathlib import Path

import faiss
import numpy as np
import pytest

from core.ann import FaissIndex, IvfLists, load_index
from core.errors import ConfigError, CorruptFileError


def ivf_flat(rows_mc: np.ndarray, nlist: int) -> faiss.IndexIVFFlat:
    quantizer = faiss.IndexFlatL2(rows_mc.shape[1])
    index = faiss.IndexIVFFlat(quantizer, rows_mc.shape[1], nlist)
    index.train(rows_mc)
    index.add(rows_mc)
    return index


def test_ivf_lists_find_what_faiss_finds_and_hold_no_copy_of_the_rows() -> None:
    rng = np.random.default_rng(0)
    rows_mc = rng.standard_normal((20_000, 128)).astype(np.float32)
    queries_nc = rng.standard_normal((300, 128)).astype(np.float32)
    index = ivf_flat(rows_mc, nlist=64)
    tracemalloc.start()
    try:
        lists = IvfLists(index, nprobe=8)
        _, peak_b = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # ids, norms and centroids only (~12 bytes a row); a copy of the rows alone would be 512 bytes a row
    assert peak_b < 0.1 * rows_mc.nbytes, f"IvfLists allocated {peak_b / 1e6:.1f} MB for a 10 MB bank"
    assert all(not r.flags.owndata and not r.flags.writeable for r in lists.rows_of_list.values())
    ours = FaissIndex(index, "ivf-flat", {"nprobe": 8}).search(queries_nc)
    theirs = FaissIndex(index, "ivf-flat", {"nprobe": 8}, engine="faiss").search(queries_nc)
    # same lists probed, every row in them compared: equal up to float ties (checked by distance)
    d_ours = ((rows_mc[ours] - queries_nc) ** 2).sum(axis=1)
    d_theirs = ((rows_mc[theirs] - queries_nc) ** 2).sum(axis=1)
    np.testing.assert_allclose(d_ours, d_theirs, rtol=1e-5)
    assert (ours == theirs).mean() > 0.99


def _small_bank(rows: int = 2000, dim: int = 16, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, dim)).astype(np.float32), rng.standard_normal((50, dim)).astype(
        np.float32
    )


def _exact_nearest(rows_mc: np.ndarray, queries_nc: np.ndarray) -> np.ndarray:
    return ((queries_nc[:, None] - rows_mc[None]) ** 2).sum(-1).argmin(axis=1)


def test_probing_every_list_is_exact_and_nprobe_is_capped_at_the_list_count() -> None:
    rows_mc, queries_nc = _small_bank()
    index = FaissIndex(ivf_flat(rows_mc, nlist=8), "ivf-flat", {"nprobe": 1})
    lists = index._lists
    assert lists is not None and lists.nprobe == 1 and index.rows == 2000
    index.set_params({"nprobe": 100})
    assert index._lists is lists and lists.nprobe == 8 and index.params == {"nprobe": 100}
    assert faiss.extract_index_ivf(index.index).nprobe == 100
    got = index.search(queries_nc)
    assert got.dtype == np.int64 and got.shape == (50,)
    np.testing.assert_array_equal(got, _exact_nearest(rows_mc, queries_nc))
    assert IvfLists(faiss.extract_index_ivf(index.index), nprobe=99).nprobe == 8


def test_one_probe_searches_only_the_nearest_list() -> None:
    rows_mc, queries_nc = _small_bank()
    index = FaissIndex(ivf_flat(rows_mc, nlist=8), "ivf-flat", {"nprobe": 1})
    theirs = FaissIndex(index.index, "ivf-flat", {"nprobe": 1}, engine="faiss")
    assert theirs._lists is None
    np.testing.assert_array_equal(index.search(queries_nc), theirs.search(queries_nc))
    # one list of eight: some queries' nearest row lies in another list, so nprobe is really 1
    assert (index.search(queries_nc) != _exact_nearest(rows_mc, queries_nc)).any()


def test_an_empty_query_and_queries_that_reach_only_empty_lists() -> None:
    rows_mc, _ = _small_bank()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(16), 16, 4)
    ivf.train(rows_mc)
    _, list_of_row = ivf.quantizer.search(rows_mc, 1)
    ivf.add(rows_mc[list_of_row[:, 0] == 0])  # every row of list 0, nothing in lists 1..3
    centroids = ivf.quantizer.reconstruct_n(0, 4)
    for engine in ("numpy", "faiss"):
        index = FaissIndex(ivf, "ivf-flat", {"nprobe": 1}, engine=engine)
        empty = index.search(np.zeros((0, 16), np.float32))
        assert empty.shape == (0,) and empty.dtype == np.int64
        assert index.search(centroids[:1]).shape == (1,)  # the populated list answers
        # Queries whose one probed list is empty fall back to every list: the nearest row of list 0.
        kept_mc = rows_mc[list_of_row[:, 0] == 0]
        np.testing.assert_array_equal(index.search(centroids[1:]), _exact_nearest(kept_mc, centroids[1:]))
        assert index.params == {"nprobe": 1} and faiss.extract_index_ivf(ivf).nprobe == 1  # knob restored


def test_hnsw_runs_in_faiss_with_its_ef_search() -> None:
    rows_mc, queries_nc = _small_bank()
    hnsw = faiss.IndexHNSWFlat(16, 16)
    hnsw.add(rows_mc)
    index = FaissIndex(hnsw, "hnsw", {"ef_search": 256})
    assert index._lists is None and hnsw.hnsw.efSearch == 256 and index.rows == 2000
    got = index.search(queries_nc.astype(np.float64))  # any float input is searched as float32
    assert got.dtype == np.int64
    assert (got == _exact_nearest(rows_mc, queries_nc)).mean() > 0.95
    index.set_params({"ef_search": 17})
    assert hnsw.hnsw.efSearch == 17


def test_unknown_index_kind() -> None:
    rows_mc, _ = _small_bank(rows=300)
    with pytest.raises(ConfigError, match=r"^unknown ANN index kind 'flat'; known: ivf-flat, hnsw$"):
        FaissIndex(ivf_flat(rows_mc, nlist=2), "flat", {"nprobe": 1})


def test_load_index_checks_the_file_and_the_bank_it_covers(tmp_path: Path) -> None:
    rows_mc, queries_nc = _small_bank()
    saved = FaissIndex(ivf_flat(rows_mc, nlist=8), "ivf-flat", {"nprobe": 8})
    path = tmp_path / "point.faiss"
    saved.save(path)
    loaded = load_index(str(path), "ivf-flat", {"nprobe": 8}, rows=2000, dim=16)
    assert loaded.kind == "ivf-flat" and loaded.params == {"nprobe": 8} and loaded.rows == 2000
    np.testing.assert_array_equal(loaded.search(queries_nc), saved.search(queries_nc))
    for rows, dim in ((1999, 16), (2000, 15)):
        with pytest.raises(
            CorruptFileError, match=rf"point.faiss: faiss index is 2000x16, its bank is {rows}x{dim}$"
        ):
            load_index(path, "ivf-flat", {"nprobe": 8}, rows=rows, dim=dim)
    (tmp_path / "bad.faiss").write_bytes(b"not an index")
    with pytest.raises(CorruptFileError, match="bad.faiss: unreadable faiss index: ") as caught:
        load_index(tmp_path / "bad.faiss", "ivf-flat", {"nprobe": 8}, rows=2000, dim=16)
    assert caught.value.path == str(tmp_path / "bad.faiss")


def test_without_faiss_the_error_names_the_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from core import ann

    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    with pytest.raises(
        ConfigError, match=r"^this bundle ships an ANN index; install faiss-cpu \(the `edge` extra has it\)$"
    ):
        ann._faiss()


def _lists_of_a_dropped_index(rows_mc: np.ndarray) -> IvfLists:
    return IvfLists(ivf_flat(rows_mc, nlist=4), nprobe=4)  # the caller keeps no reference to the index


def test_the_list_views_keep_their_index_alive() -> None:
    # lists of ~1.3 MB each: freed storage would be unmapped, not left in place by chance
    rows_mc = np.random.default_rng(5).standard_normal((20_000, 64)).astype(np.float32)
    lists = _lists_of_a_dropped_index(rows_mc)
    gc.collect()
    _ = [np.ones((5_000, 64), np.float32) for _ in range(8)]  # reuse any memory that was released
    got = np.concatenate([lists.rows_of_list[i] for i in sorted(lists.rows_of_list)])
    np.testing.assert_array_equal(got, rows_mc[lists.ids_m])
    queries = rows_mc[[0, 7, 19_999]] + 1e-3
    np.testing.assert_array_equal(lists.search(queries), [0, 7, 19_999])


# 512 lists: numpy's argpartition of a row that long leaves the smallest first only when asked for it
@pytest.mark.parametrize(("nlist", "nprobe"), [(64, 1), (64, 2), (64, 3), (512, 1)])
def test_few_probes_among_many_lists_match_faiss_exactly(nlist: int, nprobe: int) -> None:
    rows_mc, queries_nc = _small_bank(rows=12_000, dim=8, seed=3)
    ivf = ivf_flat(rows_mc, nlist=nlist)
    ours = FaissIndex(ivf, "ivf-flat", {"nprobe": nprobe})
    theirs = FaissIndex(ivf, "ivf-flat", {"nprobe": nprobe}, engine="faiss")
    np.testing.assert_array_equal(ours.search(queries_nc), theirs.search(queries_nc))
    assert (ours.search(queries_nc) != _exact_nearest(rows_mc, queries_nc)).any()  # probing is partial


def _ivf_with_rows_in(
    rows_mc: np.ndarray, nlist: int, lists: tuple[int, ...]
) -> tuple[faiss.IndexIVFFlat, np.ndarray]:
    """An IVF index trained on every row that holds only the rows of `lists` (ids 0.. in row order)."""
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(rows_mc.shape[1]), rows_mc.shape[1], nlist)
    ivf.train(rows_mc)
    _, list_of_row = ivf.quantizer.search(rows_mc, 1)
    kept_mc = rows_mc[np.isin(list_of_row[:, 0], lists)]
    ivf.add(kept_mc)
    return ivf, kept_mc


def test_an_empty_list_is_skipped_and_the_later_lists_still_searched() -> None:
    rows_mc, queries_nc = _small_bank()
    ivf, kept_mc = _ivf_with_rows_in(rows_mc, nlist=4, lists=(1, 2, 3))  # list 0 (probed first) is empty
    got = FaissIndex(ivf, "ivf-flat", {"nprobe": 4}).search(queries_nc)
    np.testing.assert_array_equal(got, _exact_nearest(kept_mc, queries_nc))


def test_ivf_lists_answer_int64_ids_and_minus_one_where_nothing_is_reachable() -> None:
    rows_mc, _ = _small_bank()
    ivf, kept_mc = _ivf_with_rows_in(rows_mc, nlist=4, lists=(0,))
    centroids = ivf.quantizer.reconstruct_n(0, 4)
    got = IvfLists(ivf, nprobe=1).search(np.vstack([kept_mc[:2], centroids[1:]]))
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [0, 1, -1, -1, -1])  # faiss's own padding value
    every_list = IvfLists(ivf, nprobe=1).search(centroids[1:], nprobe=4)  # the fallback FaissIndex uses
    np.testing.assert_array_equal(every_list, _exact_nearest(kept_mc, centroids[1:]))


def test_an_index_with_no_rows_has_empty_lists_and_finds_nothing() -> None:
    rows_mc, queries_nc = _small_bank()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(16), 16, 4)
    ivf.train(rows_mc)  # trained, nothing added
    lists = IvfLists(ivf, nprobe=2)
    assert lists.ids_m.shape == (0,) and lists.ids_m.dtype == np.int64
    assert lists.sq_m.shape == (0,) and lists.sq_m.dtype == np.float32
    assert lists.rows_of_list == {} and list(lists.offsets) == [0, 0, 0, 0, 0]
    np.testing.assert_array_equal(lists.search(queries_nc[:3]), [-1, -1, -1])
    for engine in ("numpy", "faiss"):
        with pytest.raises(ConfigError, match=r"^ivf-flat index holds no rows; nothing to search$"):
            FaissIndex(ivf, "ivf-flat", {"nprobe": 4}, engine=engine).search(queries_nc)


@pytest.mark.parametrize("engine", ["numpy", "faiss"])
def test_row_zero_is_a_neighbour_like_any_other(engine: str) -> None:
    rows_mc, _ = _small_bank()
    index = FaissIndex(ivf_flat(rows_mc, nlist=8), "ivf-flat", {"nprobe": 8}, engine=engine)
    np.testing.assert_array_equal(index.search(rows_mc[:3] + 1e-4), [0, 1, 2])


def test_neighbours_are_ascending_and_one_neighbour_is_allowed() -> None:
    rows_mc, queries_nc = _small_bank()
    index = FaissIndex(ivf_flat(rows_mc, nlist=8), "ivf-flat", {"nprobe": 8})  # every list: exact
    one = index.neighbours(queries_nc, 1)
    assert one.shape == (50, 1) and one.dtype == np.int64
    np.testing.assert_array_equal(one[:, 0], _exact_nearest(rows_mc, queries_nc))
    five = index.neighbours(queries_nc[:4].astype(np.float64), 5)
    dist_nm = ((queries_nc[:4, None] - rows_mc[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(five, np.argsort(dist_nm, axis=1)[:, :5])
