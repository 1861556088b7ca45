"""The station pipeline on a real signed bundle: scores equal `m3dm eval --bundle`'s, bad files become
ERROR results naming file and reason, backpressure drops are counted, shadow results are flagged."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge.decision import ResultOptions
from edge.metrics import StationMetrics
from edge.model_slot import ModelSlot, Policy
from edge.pipeline import Pipeline, PipelineConfig, Scored
from edge.score_files import collect_results
from edge.sources import Frame, open_source
from protocol.frames import decode, dequantise_map, encode
from protocol.messages import InspectionResult


@pytest.fixture(scope="module")
def model(fleet_bundle: dict):
    from edge.station_model import open_bundle

    return open_bundle(fleet_bundle["bundle"], fleet_bundle["keys"])


@pytest.fixture(scope="module")
def corrupt_set(fleet_bundle: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from trainer.synth.corrupt import write_corrupt_set

    out = tmp_path_factory.mktemp("corrupt")
    return out, write_corrupt_set(out, fleet_bundle["class_name"], seed=5, size_px=224, n_good=3)


def test_station_scores_equal_eval_bundle_scores(fleet_bundle: dict, model) -> None:
    """Same scans, same bundle: the pipeline's image scores equal the trainer's bundle evaluation to 1e-5."""
    from trainer.evaluate import evaluate_class

    data, name = fleet_bundle["data"], fleet_bundle["class_name"]
    _, scored = evaluate_class(data, model.info, model.runners, model.scorer, None)
    expected = {
        f"{ref.defect_type}/{ref.stem}": float(scored.image["rgb+point+fusion"][i])
        for i, ref in enumerate(scored.split.refs)
    }
    results = collect_results(model, open_source(f"folder:{data / name}"))
    got = {s.result.frame_id: s.result for s in results}
    assert set(got) == set(expected) and len(expected) >= 8
    for frame_id, score in expected.items():
        assert got[frame_id].image_score == pytest.approx(score, abs=1e-5), frame_id
    threshold = model.manifest.thresholds.image_threshold
    for frame_id, r in got.items():
        assert r.decision == ("NOK" if r.image_score > threshold else "OK")
        assert r.threshold == threshold and r.threshold_version == 0 and not r.shadow
        assert set(r.latency_ms) == {"capture", "preprocess", "features", "score", "decide", "total"}
        assert r.labels["source_file"].endswith(f"{frame_id.split('/')[1]}.tiff")


def test_results_encode_with_map_for_nok_and_sampled_ok(model, fleet_bundle: dict) -> None:
    data, name = fleet_bundle["data"], fleet_bundle["class_name"]
    results = collect_results(model, open_source(f"folder:{data / name / 'test' / 'good'}"))
    raw = {s.result.frame_id: s for s in results}
    one = next(iter(raw.values()))
    msg, blobs = decode(encode(one.result, one.blobs), InspectionResult)
    assert msg == one.result
    scores = model.score_raw(open_source(f"folder:{data / name / 'test' / 'good'}").__iter__().__next__().raw)
    for s in results:
        r = s.result
        if r.decision == "NOK":
            assert r.anomaly_map is not None and r.thumbnail is not None and r.thumbnail.codec == "jpeg"
        if r.anomaly_map is not None and r.frame_id == "000":
            restored = dequantise_map(r.anomaly_map, s.blobs[r.anomaly_map.blob.frame - 1])
            map_hw = scores.maps["rgb+point+fusion"]
            assert restored.shape == map_hw.shape
            assert np.abs(restored - map_hw).max() <= r.anomaly_map.scale / 2 + 1e-4


def test_bad_files_among_good_ones_become_errors_and_the_loop_goes_on(model, corrupt_set) -> None:
    root, expected = corrupt_set
    results = collect_results(model, open_source(f"folder:{root / expected['folder']}"))
    by_stem = {s.result.frame_id: s.result for s in results}
    assert len(by_stem) == len(expected["cases"])
    for case in expected["cases"]:
        r = by_stem[case["stem"]]
        if case["error"] is None:
            assert r.decision in ("OK", "NOK") and r.image_score is not None, case
            continue
        assert r.decision == "ERROR" and r.image_score is None, (case, r)
        assert r.error_reason.startswith(case["error"]), (case, r.error_reason)
        assert r.error_file.endswith(case["file"]), (case, r.error_file)


class CountingSource:
    """A paced replay (live) that counts what it captured."""

    def __init__(self, uri: str) -> None:
        self.inner = open_source(uri)
        self.live = True
        self.captured = 0

    def stop(self) -> None:
        self.inner.stop()

    def __iter__(self) -> Iterator[Frame]:
        for frame in self.inner:
            self.captured += 1
            yield frame


@pytest.mark.parametrize("policy", ["drop_oldest", "block"])
def test_backpressure(model, fleet_bundle: dict, policy: str) -> None:
    source = CountingSource(f"folder:{fleet_bundle['data'] / fleet_bundle['class_name']}?loop=1&fps=200")
    out: list[Scored] = []
    metrics = StationMetrics("bp")
    cfg = PipelineConfig(queue_size=1, backpressure=policy)
    pipeline = Pipeline(source, ModelSlot(model), out.append, metrics, ResultOptions("bp"), cfg)
    pipeline.start()
    timer = threading.Timer(2.0, pipeline.stop)
    timer.start()
    try:
        assert pipeline.join(60.0)
    finally:
        timer.cancel()
    dropped = metrics.summary()["dropped"].get("capture", 0)
    assert len(out) + dropped == source.captured
    if policy == "drop_oldest":
        assert dropped > 0 and len(out) < source.captured  # scoring is far slower than 200 fps
    else:
        assert dropped == 0 and source.captured <= len(out) + 1


def test_shadow_model_scores_a_sample_flagged_shadow(model, fleet_bundle: dict) -> None:
    slot = ModelSlot(model, Policy(map_every_n_ok=0))
    slot.set_shadow(model, sample_every_n=2)
    out: list[Scored] = []
    source = open_source(f"folder:{fleet_bundle['data'] / fleet_bundle['class_name'] / 'test' / 'good'}")
    pipeline = Pipeline(source, slot, out.append, StationMetrics("sh"), ResultOptions("sh"), PipelineConfig())
    pipeline.start()
    assert pipeline.join(60.0)
    main = [s.result for s in out if not s.result.shadow]
    shadow = [s.result for s in out if s.result.shadow]
    assert len(main) == 3 and [r.frame_id for r in shadow] == [main[1].frame_id]
    twin = next(r for r in main if r.frame_id == shadow[0].frame_id)
    assert shadow[0].image_score == pytest.approx(twin.image_score, abs=1e-6)
    assert shadow[0].anomaly_map is not None  # shadow results always carry the map for comparison
