"""core.ann.IvfLists: the same neighbours as faiss's own IVF search, without a second copy of the bank."""

from __future__ import annotations

import tracemalloc

import faiss
import numpy as np

from core.ann import FaissIndex, IvfLists


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
