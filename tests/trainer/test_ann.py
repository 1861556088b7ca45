"""trainer.ann / core.ann: the per-bank index meets its recall target on fresh queries, ships as a file."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from core.ann import load_index
from core.config import ScoreConfig
from core.errors import CorruptFileError
from core.scoring import MemoryBank, nearest_neighbours, score_bank
from trainer.ann import AnnConfig, choose_index, recall_at_1


def _clustered(rng: np.random.Generator, rows: int, centres_kc: np.ndarray) -> np.ndarray:
    """Feature-like rows: a mixture of anisotropic clusters (real patch features are far from uniform)."""
    labels = rng.integers(0, centres_kc.shape[0], rows)
    return (centres_kc[labels] + rng.normal(size=(rows, centres_kc.shape[1])) * 0.6).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[MemoryBank, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, 48)) * 2.0
    bank = MemoryBank("point", _clustered(rng, 24000, centres), 28, np.zeros(48, np.float32), 1.0)
    return bank, _clustered(rng, 3000, centres), _clustered(rng, 3000, centres)


@pytest.mark.parametrize("kind", ["ivf-flat", "hnsw"])
def test_index_meets_recall_target_on_fresh_queries(data, kind: str) -> None:
    bank, tune, fresh = data
    choice = choose_index(
        bank, tune, AnnConfig(recall_target=0.95, kind=kind, min_speedup=0.0, exact_below_floats=0)
    )
    assert choice.index is not None and choice.kind == kind
    assert choice.recall_at_1 >= 0.95
    exact = nearest_neighbours(fresh, bank.feats_mc, k=1)[1][:, 0]
    # Fresh queries from the same distribution: recall within sampling noise of the target.
    assert recall_at_1(choice.index, fresh, bank, exact) >= 0.93


def test_small_banks_stay_exact(data) -> None:
    bank, tune, _ = data
    choice = choose_index(bank, tune, AnnConfig(exact_below_rows=30000))
    assert choice.index is None and choice.kind == "exact" and choice.recall_at_1 == 1.0


def test_index_file_round_trip_and_scoring_with_it(data, tmp_path) -> None:
    bank, tune, fresh = data
    choice = choose_index(bank, tune, AnnConfig(recall_target=0.97, min_speedup=0.0, exact_below_floats=0))
    assert choice.index is not None
    choice.index.save(tmp_path / "point.faiss")
    loaded = load_index(tmp_path / "point.faiss", choice.kind, choice.params, *bank.feats_mc.shape)
    np.testing.assert_array_equal(loaded.search(fresh[:200]), choice.index.search(fresh[:200]))
    with pytest.raises(CorruptFileError, match="faiss index is 24000x48, its bank is 10x48"):
        load_index(tmp_path / "point.faiss", choice.kind, choice.params, 10, 48)
    (tmp_path / "bad.faiss").write_bytes(b"not an index")
    with pytest.raises(CorruptFileError, match="unreadable faiss index"):
        load_index(tmp_path / "bad.faiss", choice.kind, choice.params, *bank.feats_mc.shape)
    approx_bank = MemoryBank(bank.name, bank.feats_mc, 28, bank.feat_mean_c, 1.0, index=loaded)
    query = fresh[: 28 * 28].reshape(28, 28, 48)
    approx, exact = score_bank(query, approx_bank, ScoreConfig()), score_bank(query, bank, ScoreConfig())
    # A miss can only find a farther row; the distance itself is exact, and most patches agree.
    assert (approx.patch_dist_hw >= exact.patch_dist_hw - 1e-5).all()
    assert np.mean(np.abs(approx.patch_dist_hw - exact.patch_dist_hw) < 1e-5) >= 0.95


def test_an_index_ships_in_the_signed_bundle_and_the_station_searches_with_it(fleet_bundle, tmp_path) -> None:
    import json
    import shutil

    from edge.model_store import load_banks, load_model_info, read_model_json
    from edge.station_model import open_bundle, replay_golden
    from trainer.ann import index_entry
    from trainer.bundle_build import build_model_bundle
    from trainer.model_io import write_model_json

    model = tmp_path / "model"
    shutil.copytree(fleet_bundle["model"], model)
    bank = load_banks(load_model_info(model))["point"]
    rng = np.random.default_rng(0)
    queries = bank.feats_mc[rng.integers(0, bank.feats_mc.shape[0], 500)] + rng.normal(
        0, 0.05, (500, bank.dim)
    )
    choice = choose_index(
        bank,
        queries.astype(np.float32),
        AnnConfig(exact_below_rows=0, recall_target=0.9, min_speedup=0.0, exact_below_floats=0),
    )
    raw = read_model_json(model)
    raw.pop("format")
    raw["banks"]["point"]["index"] = index_entry(choice, "point", model)
    write_model_json(model, raw)
    summary = build_model_bundle(
        model, fleet_bundle["keys"], tmp_path / "bundle", "1.0.1", 2, 30, None, None, fleet_bundle["data"]
    )
    manifest = json.loads((Path(summary["path"]) / "manifest.json").read_text())
    spec = manifest["banks"]["point"]
    assert spec["index_path"] == "banks/point.faiss" and spec["index_path"] in manifest["files"]
    station = open_bundle(Path(summary["path"]), fleet_bundle["keys"], backend="ort")
    assert station.scorer.banks["point"].index is not None and station.scorer.banks["rgb"].index is None
    assert all(r.ok for r in replay_golden(station))
    # A tampered index file fails verification like any other file.
    (Path(summary["path"]) / "banks" / "point.faiss").write_bytes(b"x")
    with pytest.raises(Exception, match="(?i)hash|sha|digest"):
        open_bundle(Path(summary["path"]), fleet_bundle["keys"], backend="ort")


def test_blas_ivf_search_visits_the_same_lists_as_faiss(data) -> None:
    from core.ann import FaissIndex

    bank, tune, fresh = data
    choice = choose_index(bank, tune, AnnConfig(recall_target=0.9, min_speedup=0.0, exact_below_floats=0))
    assert choice.index is not None and choice.index.engine == "numpy"
    in_faiss = FaissIndex(choice.index.index, "ivf-flat", choice.params, engine="faiss")
    agree = np.mean(choice.index.search(fresh) == in_faiss.search(fresh))
    assert agree >= 0.999  # only exact float ties may differ


def test_an_index_that_is_not_faster_than_exact_is_not_shipped(data) -> None:
    bank, tune, _ = data
    # No index searches a million times faster than BLAS: the trial must fall back to exact.
    choice = choose_index(bank, tune, AnnConfig(recall_target=0.9, exact_below_floats=0, min_speedup=1e6))
    assert choice.index is None and choice.kind == "exact"
    assert re.fullmatch(r"ivf-flat only \d+\.\d\dx faster than exact: exact search", choice.reason)


def test_banks_too_small_to_be_worth_an_index_skip_the_trial(data) -> None:
    bank, tune, _ = data  # 24,000 x 48 = 1.15M floats
    choice = choose_index(bank, tune, AnnConfig(exact_below_floats=1_200_000, min_speedup=0.0))
    assert choice.index is None and choice.reason == "24000x48 < 1200000 floats: exact BLAS search"
    choice = choose_index(bank, tune, AnnConfig(exact_below_floats=1_100_000, min_speedup=0.0))
    assert choice.index is not None
