"""Station runners: ONNX Runtime against torch, input validation, backend choice, TensorRT engine cache logic.

TensorRT itself runs only in the `gpu`-marked tests at the end (deselected on CPU machines by `-m "not gpu"`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import ConfigError, CorruptFileError, InputError, ShapeError
from core.runner import Runner
from edge.runners import OrtRunner, make_runner
from edge.runners.engine_cache import compatibility_key, engine_cache_path, file_sha256, load_or_build
from edge.runners.trt import profile_shapes
from trainer.export import export_onnx
from trainer.models.uff import FeatureFusionBlock, UFFExport
from trainer.torch_runner import TorchRunner

POINT_DIM, RGB_DIM, PATCHES = 48, 48, 3136


def _inputs(batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "point_feats": rng.standard_normal((batch, PATCHES, POINT_DIM)).astype(np.float32),
        "rgb_feats": rng.standard_normal((batch, PATCHES, RGB_DIM)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def uff(tmp_path_factory: pytest.TempPathFactory) -> tuple[UFFExport, Path]:
    """A weight-free-preset UFF block and its exported graph."""
    torch.manual_seed(0)
    module = UFFExport(FeatureFusionBlock(POINT_DIM, RGB_DIM)).eval()
    example = {k: torch.from_numpy(v) for k, v in _inputs().items()}
    path = export_onnx(module, example, ["fused"], tmp_path_factory.mktemp("onnx") / "uff.onnx")
    return module, path


def test_ort_runner_matches_torch(uff) -> None:
    module, path = uff
    runner = OrtRunner(path)
    assert isinstance(runner, Runner) and runner.backend == "onnxruntime-cpu"
    assert runner.input_shapes == {"point_feats": ("batch", PATCHES, 48), "rgb_feats": ("batch", PATCHES, 48)}
    inputs = _inputs(batch=2, seed=3)
    fused = runner.run(inputs)["fused"]
    expected = TorchRunner(module, ["point_feats", "rgb_feats"], ["fused"]).run(inputs)["fused"]
    assert fused.shape == (2, PATCHES, 96) and fused.dtype == np.float32
    np.testing.assert_allclose(fused, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "array", "message"),
    [
        ("point_feats", np.zeros((1, 784, 48), np.float32), r"shape \(1, 784, 48\), graph expects"),
        ("point_feats", np.zeros((PATCHES, 48), np.float32), "graph expects"),
        ("rgb_feats", np.zeros((1, PATCHES, 48), np.float64), "must be float32"),
    ],
)
def test_ort_runner_rejects_bad_inputs_naming_the_graph(uff, name, array, message) -> None:
    inputs = {**_inputs(), name: array}
    with pytest.raises(ShapeError, match=message) as info:
        OrtRunner(uff[1]).run(inputs)
    assert info.value.path == str(uff[1])


def test_ort_runner_rejects_missing_inputs_and_bad_files(uff, tmp_path) -> None:
    with pytest.raises(ShapeError, match="expected inputs"):
        OrtRunner(uff[1]).run({"point_feats": _inputs()["point_feats"]})
    with pytest.raises(InputError, match="not found"):
        OrtRunner(tmp_path / "absent.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(CorruptFileError, match="junk.onnx"):
        OrtRunner(tmp_path / "junk.onnx")


def test_make_runner_auto_picks_ort_here_and_logs_one_line(uff, caplog) -> None:
    # One debug line per runner (the bundle load logs the backend at INFO once).
    with caplog.at_level(logging.DEBUG, logger="m3dm.edge"):
        runner = make_runner(uff[1], backend="auto")
    assert isinstance(runner, OrtRunner)
    lines = [r.getMessage() for r in caplog.records if r.name == "m3dm.edge"]
    assert len(lines) == 1 and "uff.onnx" in lines[0] and "onnxruntime-cpu" in lines[0]


def test_make_runner_refuses_unavailable_or_unknown_backends(uff) -> None:
    with pytest.raises(ConfigError, match="TensorRT"):
        make_runner(uff[1], backend="trt")
    with pytest.raises(ConfigError, match="unknown runner backend"):
        make_runner(uff[1], backend="tvm")  # type: ignore[arg-type]
    assert make_runner(uff[1], backend="ort").backend == "onnxruntime-cpu"


def test_profile_shapes_vary_only_the_batch() -> None:
    assert profile_shapes(("batch", 3136, 48), 1, 2, 4) == ((1, 3136, 48), (2, 3136, 48), (4, 3136, 48))
    with pytest.raises(ShapeError, match="only the batch axis"):
        profile_shapes(("batch", "patches", 48), 1, 1, 1)
    with pytest.raises(ShapeError, match="need 1 <= min_batch <= opt_batch <= max_batch, got 2, 1, 4"):
        profile_shapes(("batch", 3136, 48), 2, 1, 4)


SHAPES = {"point_feats": [(1, 3136, 48)] * 3, "rgb_feats": [(1, 3136, 48)] * 3}


def test_compatibility_key_changes_with_every_component() -> None:
    base = compatibility_key("10.3.0", (8, 7), "fp16", SHAPES)
    assert base == compatibility_key("10.3.0", (8, 7), "fp16", dict(reversed(SHAPES.items())))
    assert base.startswith("trt10.3.0-sm87-fp16-")
    variants = [
        compatibility_key("10.4.0", (8, 7), "fp16", SHAPES),
        compatibility_key("10.3.0", (9, 0), "fp16", SHAPES),
        compatibility_key("10.3.0", (8, 7), "fp32", SHAPES),
        compatibility_key(
            "10.3.0", (8, 7), "fp16", {**SHAPES, "rgb_feats": [(1, 3136, 48)] * 2 + [(4, 3136, 48)]}
        ),
    ]
    assert len({base, *variants}) == 5
    path = engine_cache_path("/cache", "ab" * 32, base)
    assert path == Path("/cache") / f"{'ab' * 8}-{base}.engine"


class FakeBuilder:
    """Writes a fake engine naming its input, or raises when told to fail; counts calls."""

    def __init__(self, fail: bool = False) -> None:
        self.calls, self.fail = 0, fail

    def __call__(self, onnx_path: Path, engine_path: Path) -> Path:
        self.calls += 1
        if self.fail:
            engine_path.write_bytes(b"half")  # a crash mid-write must not leave a loadable engine
            raise RuntimeError("out of memory")
        engine_path.write_bytes(b"engine for " + onnx_path.read_bytes())
        return engine_path


def test_load_or_build_builds_once_then_loads(tmp_path) -> None:
    onnx_path = tmp_path / "uff.onnx"
    onnx_path.write_bytes(b"graph v1")
    builder = FakeBuilder()
    first = load_or_build(onnx_path, tmp_path / "engines", "keyA", builder)
    second = load_or_build(onnx_path, tmp_path / "engines", "keyA", builder)
    assert (first.action, second.action, builder.calls) == ("build", "load", 1)
    assert first.engine_path == second.engine_path
    assert first.engine_path.read_bytes() == b"engine for graph v1"
    meta = json.loads(first.engine_path.with_suffix(".json").read_text())
    assert meta == {"onnx_sha256": file_sha256(onnx_path), "key": "keyA"}


def test_load_or_build_never_reuses_an_engine_for_other_inputs(tmp_path) -> None:
    onnx_path, cache = tmp_path / "uff.onnx", tmp_path / "engines"
    onnx_path.write_bytes(b"graph v1")
    builder = FakeBuilder()
    old = load_or_build(onnx_path, cache, "keyA", builder)
    other_key = load_or_build(onnx_path, cache, "keyB", builder)  # new TensorRT / GPU / precision
    assert other_key.action == "build" and other_key.engine_path != old.engine_path
    onnx_path.write_bytes(b"graph v2")  # re-exported model, same file name
    new_graph = load_or_build(onnx_path, cache, "keyA", builder)
    assert new_graph.action == "build" and new_graph.engine_path.read_bytes() == b"engine for graph v2"
    assert builder.calls == 3


def test_load_or_build_rebuilds_when_the_sidecar_disagrees(tmp_path) -> None:
    onnx_path = tmp_path / "uff.onnx"
    onnx_path.write_bytes(b"graph v1")
    built = load_or_build(onnx_path, tmp_path, "keyA", FakeBuilder())
    built.engine_path.with_suffix(".json").write_text(json.dumps({"onnx_sha256": "0" * 64, "key": "keyA"}))
    assert load_or_build(onnx_path, tmp_path, "keyA", FakeBuilder()).action == "build"
    built.engine_path.with_suffix(".json").unlink()
    assert load_or_build(onnx_path, tmp_path, "keyA", FakeBuilder()).action == "build"


def test_failed_build_falls_back_and_leaves_nothing_loadable(tmp_path, caplog) -> None:
    onnx_path, cache = tmp_path / "uff.onnx", tmp_path / "engines"
    onnx_path.write_bytes(b"graph v1")
    with caplog.at_level(logging.WARNING, logger="m3dm.edge"):
        result = load_or_build(onnx_path, cache, "keyA", FakeBuilder(fail=True))
    assert result.action == "fallback" and result.engine_path is None
    assert "falling back to ONNX Runtime" in caplog.text
    assert list(cache.iterdir()) == []
    assert load_or_build(onnx_path, cache, "keyA", FakeBuilder()).action == "build"


def test_intra_op_threads_are_pinned_per_runner(uff) -> None:
    runner = make_runner(uff[1], backend="ort", intra_op_threads=1)
    options = runner.session.get_session_options()
    assert runner.intra_op_threads == 1 and options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 1
    inputs = _inputs()
    np.testing.assert_allclose(runner.run(inputs)["fused"], OrtRunner(uff[1]).run(inputs)["fused"], atol=1e-5)
    with pytest.raises(InputError, match="intra_op_threads"):
        OrtRunner(uff[1], intra_op_threads=0)


def test_trt_precision_arguments_are_checked_before_tensorrt_is_needed(uff, tmp_path) -> None:
    from edge.runners.trt import build_engine

    with pytest.raises(ConfigError, match="unknown TensorRT precision"):
        build_engine(uff[1], tmp_path / "e", precision="int4")
    with pytest.raises(ConfigError, match="calibration cache"):
        build_engine(uff[1], tmp_path / "e", precision="int8")


# ---- TensorRT on a GPU (deselected on CPU machines) ----


@pytest.mark.gpu
def test_trt_int8_engine_with_calibration_cache(uff, tmp_path) -> None:
    from edge.runners.trt import TrtRunner, build_engine

    batches = [_inputs(seed=s) for s in range(4)]
    cache = tmp_path / "uff.calib"
    engine = build_engine(uff[1], tmp_path / "a.engine", precision="int8", calibration_cache=cache,
                          calibration_batches=batches)  # fmt: skip
    assert cache.stat().st_size > 0
    # A second build reads the cache and needs no batches (what a station does with the trainer's cache).
    again = build_engine(uff[1], tmp_path / "b.engine", precision="int8", calibration_cache=cache)
    inputs = _inputs(seed=9)
    ref = OrtRunner(uff[1]).run(inputs)["fused"]
    for path in (engine, again):
        out = TrtRunner(path).run(inputs)["fused"]
        cos = np.sum(out * ref, -1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))
        assert cos.mean() > 0.98


@pytest.mark.gpu
@pytest.mark.parametrize(("fp16", "atol"), [(False, 1e-3), (True, 5e-2)])
def test_trt_engine_matches_ort(uff, tmp_path, fp16, atol) -> None:
    from edge.runners.trt import TrtRunner, build_engine

    engine = build_engine(
        uff[1], tmp_path / "uff.engine", fp16=fp16, max_batch=2, timing_cache_path=tmp_path / "t"
    )
    assert (tmp_path / "t").stat().st_size > 0
    runner = TrtRunner(engine)
    for batch in (1, 2):
        inputs = _inputs(batch=batch, seed=batch)
        fused = runner.run(inputs)["fused"]
        np.testing.assert_allclose(fused, OrtRunner(uff[1]).run(inputs)["fused"], rtol=1e-2, atol=atol)
    with pytest.raises(ShapeError, match="engine expects"):
        runner.run({**inputs, "rgb_feats": np.zeros((1, 784, 48), np.float32)})
    runner.close()


@pytest.mark.gpu
def test_make_runner_auto_picks_tensorrt_and_caches_the_engine(uff, tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="m3dm.edge"):
        runner = make_runner(uff[1], backend="auto", engine_cache_dir=tmp_path)
    assert runner.backend == "tensorrt" and "tensorrt" in caplog.text
    assert len(list(tmp_path.glob("*.engine"))) == 1
    inputs = _inputs()
    np.testing.assert_allclose(
        runner.run(inputs)["fused"], OrtRunner(uff[1]).run(inputs)["fused"], rtol=1e-2, atol=5e-2
    )
