"""Network backends behind `core.runner.Runner`: ONNX Runtime (default) and TensorRT 10 (GPU stations).

`make_runner` is the one place a station chooses a backend; it logs the choice once on "m3dm.edge".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from core.errors import ConfigError
from core.runner import Runner
from edge.runners.engine_cache import compatibility_key, load_or_build
from edge.runners.ort import OrtRunner
from edge.runners.trt import (
    TrtRunner,
    build_engine,
    compute_capability,
    profile_shapes,
    tensorrt_available,
    trt_version,
)

__all__ = ["OrtRunner", "TrtRunner", "make_runner"]

log = logging.getLogger("m3dm.edge")

Backend = Literal["auto", "ort", "trt"]


def _trt_runner(
    onnx_path: Path, cache_dir: Path, precision: str, max_batch: int, calibration_cache: Path | None
) -> TrtRunner | None:
    """TensorRT runner from a cached or freshly built engine; None when the build or load fails."""
    input_shapes = OrtRunner(onnx_path, providers=["CPUExecutionProvider"]).input_shapes
    profiles = {name: profile_shapes(shape, 1, 1, max_batch) for name, shape in input_shapes.items()}
    key = compatibility_key(trt_version(), compute_capability(), precision, profiles)
    timing_cache = cache_dir / "timing.cache"

    def build(src: Path, dst: Path) -> Path:
        return build_engine(
            src,
            dst,
            max_batch=max_batch,
            timing_cache_path=timing_cache,
            precision=precision,
            calibration_cache=calibration_cache,
        )

    cached = load_or_build(onnx_path, cache_dir, key, build)
    if cached.engine_path is None:
        return None
    try:
        return TrtRunner(cached.engine_path)
    except Exception as err:  # a corrupt or incompatible engine must not stop the station; ORT still works
        log.warning("cannot load TensorRT engine %s (%s)", cached.engine_path, err)
        return None


def make_runner(
    onnx_path: str | Path,
    backend: Backend = "auto",
    engine_cache_dir: str | Path | None = None,
    fp16: bool = True,
    max_batch: int = 1,
    precision: str | None = None,
    calibration_cache: str | Path | None = None,
    intra_op_threads: int | None = None,
) -> Runner:
    """Runner for one exported graph.

    Args:
        onnx_path: the exported .onnx graph.
        backend: "auto" (TensorRT if importable and a GPU exists, else ONNX Runtime), "ort" or "trt".
        engine_cache_dir: where TensorRT engines are cached; default `<onnx dir>/engines`.
        fp16: build TensorRT engines with FP16 kernels allowed (when `precision` is not given).
        max_batch: largest batch the TensorRT profile accepts.
        precision: TensorRT "fp32" | "fp16" | "int8" (INT8 reads `calibration_cache`, made by the trainer).
            ONNX Runtime runs the graph as given: a bundle's int8 graph is int8; fp32 is the station's
            fallback whenever a precision problem is suspected (`precision="fp32"` forces it on TensorRT).
        intra_op_threads: ONNX Runtime intra-op threads for this graph (None: ORT's default, all cores).
            Pin it when stages run in parallel on a small CPU (see BENCHMARKS.md, "Threads").
    """
    onnx_path = Path(onnx_path)
    if backend not in ("auto", "ort", "trt"):
        raise ConfigError(f"unknown runner backend {backend!r}; use auto, ort or trt")
    has_trt = backend != "ort" and tensorrt_available()
    if backend == "trt" and not has_trt:
        raise ConfigError(
            "backend 'trt' requested but TensorRT/cuda-python is not importable or no GPU is visible"
        )
    reason = "requested" if backend != "auto" else "auto: TensorRT not importable or no GPU"
    if has_trt:
        cache_dir = Path(engine_cache_dir) if engine_cache_dir is not None else onnx_path.parent / "engines"
        trt_precision = precision or ("fp16" if fp16 else "fp32")
        cal = Path(calibration_cache) if calibration_cache is not None else None
        runner = _trt_runner(onnx_path, cache_dir, trt_precision, max_batch, cal)
        if runner is not None:
            log.debug("runner for %s: backend %s (%s)", onnx_path.name, runner.backend, backend)
            return runner
        reason = "TensorRT engine unavailable, fell back"
    ort_runner = OrtRunner(onnx_path, intra_op_threads=intra_op_threads)
    # The bundle's "loaded, backend X" line names the backend once; per-runner lines only when it matters.
    level = logging.WARNING if reason.endswith("fell back") else logging.DEBUG
    log.log(level, "runner for %s: backend %s (%s)", onnx_path.name, ort_runner.backend, reason)
    return ort_runner
