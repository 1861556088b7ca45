"""TensorRT 10 backend of `core.runner.Runner` and the ONNX -> engine builder, for Jetson / GPU stations.

Written to the TensorRT 10 name-based tensor API (num_io_tensors, set_input_shape, set_tensor_address,
execute_async_v3) with device buffers from cuda-python's cudart. `tensorrt` and `cuda` are imported lazily
inside functions so this module imports on any machine. UNEXERCISED on CPU machines: only `profile_shapes`
and the precision argument checks run in the CPU test suite; the engine build (FP32 / FP16 / INT8 with a
calibration cache) and inference paths run under the `gpu` pytest marker.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigError, CorruptFileError, InputError, ShapeError

__all__ = [
    "TRT_PRECISIONS",
    "EntropyCalibrator",
    "TrtRunner",
    "build_engine",
    "compute_capability",
    "profile_shapes",
    "tensorrt_available",
    "trt_version",
]

log = logging.getLogger("m3dm.edge")

WORKSPACE_BYTES = 1 << 30  # builder scratch memory; 1 GiB fits an Orin NX and is ample for ViT-B
TRT_PRECISIONS = ("fp32", "fp16", "int8")


def _trt() -> Any:
    import tensorrt

    return tensorrt


def _cudart() -> Any:
    try:  # cuda-python >= 12.6 layout; the flat `cuda.cudart` module is its deprecated alias
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def _cuda_call(result: tuple[Any, ...]) -> Any:
    """Unwrap a cudart (err, *values) tuple, raising on any error code."""
    cudart = _cudart()
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA call failed: {err}")
    return values[0] if len(values) == 1 else tuple(values)


def tensorrt_available() -> bool:
    """True when tensorrt and cuda-python import and at least one CUDA device is visible."""
    try:
        _trt()
        return int(_cuda_call(_cudart().cudaGetDeviceCount())) > 0
    except Exception:  # ImportError, driver missing, no device: all mean "no TensorRT here"
        return False


def trt_version() -> str:
    """Installed TensorRT version string, e.g. "10.3.0"."""
    return str(_trt().__version__)


def compute_capability(device: int = 0) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device."""
    props = _cuda_call(_cudart().cudaGetDeviceProperties(device))
    return int(props.major), int(props.minor)


def profile_shapes(
    shape: tuple[int | str | None, ...], min_batch: int, opt_batch: int, max_batch: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes for one input whose axis 0 is the batch and whose other axes are fixed."""
    rest = shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in rest):
        raise ShapeError(f"only the batch axis may be dynamic, got input shape {shape}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ShapeError(
            f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}"
        )
    fixed = tuple(int(d) for d in rest)  # type: ignore[arg-type]
    return (min_batch, *fixed), (opt_batch, *fixed), (max_batch, *fixed)


def _parse_onnx(trt: Any, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """Explicit-batch network parsed from the ONNX file (create_network(0): TRT 10 is explicit-batch only)."""
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CorruptFileError(f"TensorRT cannot parse the ONNX graph: {errors}", path=onnx_path)
    return network, parser  # the parser must outlive the network's use


class EntropyCalibrator:
    """INT8 entropy calibration over training inputs, with a calibration cache file.

    With a readable cache the builder takes the scales from it and no batch is ever run (a station can
    build an INT8 engine from the cache the trainer made); otherwise it feeds `batches` (dicts of
    name -> float32 array, batch first) and writes the cache. Built lazily on the TensorRT base class.
    """

    def __new__(cls, batches: list[dict[str, np.ndarray]], cache_path: str | Path) -> Any:
        trt = _trt()

        class _Calibrator(trt.IInt8EntropyCalibrator2):
            def __init__(self) -> None:
                super().__init__()
                self.cache_path = Path(cache_path)
                self.batches = list(batches)
                self.position = 0
                self.device: dict[str, int] = {}

            def get_batch_size(self) -> int:
                return int(next(iter(self.batches[0].values())).shape[0]) if self.batches else 1

            def get_batch(self, names: list[str]) -> list[int] | None:
                if self.position >= len(self.batches):
                    return None
                cudart = _cudart()
                batch = self.batches[self.position]
                self.position += 1
                pointers = []
                for name in names:
                    host = np.ascontiguousarray(batch[name], dtype=np.float32)
                    if name not in self.device:
                        self.device[name] = int(_cuda_call(cudart.cudaMalloc(host.nbytes)))
                    kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
                    _cuda_call(cudart.cudaMemcpy(self.device[name], host.ctypes.data, host.nbytes, kind))
                    pointers.append(self.device[name])
                return pointers

            def read_calibration_cache(self) -> bytes | None:
                return self.cache_path.read_bytes() if self.cache_path.is_file() else None

            def write_calibration_cache(self, cache: Any) -> None:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                self.cache_path.write_bytes(bytes(cache))

        return _Calibrator()


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    fp16: bool = True,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 1,
    timing_cache_path: str | Path | None = None,
    precision: str | None = None,
    calibration_cache: str | Path | None = None,
    calibration_batches: list[dict[str, np.ndarray]] | None = None,
) -> Path:
    """Build and serialize a TensorRT engine with one optimisation profile over the batch axis.

    precision: "fp32", "fp16" or "int8" (overrides `fp16`). INT8 also allows FP16 kernels for layers
    TensorRT keeps in float, and needs a calibration cache file or calibration batches (which write it).
    The timing cache, when given, is loaded before and saved after the build so rebuilds are fast.
    """
    precision = precision or ("fp16" if fp16 else "fp32")
    if precision not in TRT_PRECISIONS:
        raise ConfigError(f"unknown TensorRT precision {precision!r}; use one of {TRT_PRECISIONS}")
    if precision == "int8" and calibration_cache is None:
        raise ConfigError("an INT8 engine needs a calibration cache path (and batches if it does not exist)")
    trt = _trt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse_onnx(trt, builder, logger, onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = EntropyCalibrator(calibration_batches or [], calibration_cache)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        profile.set_shape(tensor.name, *profile_shapes(tuple(tensor.shape), min_batch, opt_batch, max_batch))
    config.add_optimization_profile(profile)
    cache_path = None if timing_cache_path is None else Path(timing_cache_path)
    cache_blob = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_blob), False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if cache_path is not None:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path


class TrtRunner:
    """Runs a serialized TensorRT engine; numpy in, numpy out, one CUDA stream, buffers grown on demand."""

    backend = "tensorrt"

    def __init__(self, engine_path: str | Path) -> None:
        trt = _trt()
        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise InputError("TensorRT engine not found", path=self.engine_path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise CorruptFileError(
                "TensorRT cannot deserialize the engine (version or GPU mismatch?)", self.engine_path
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._stream = _cuda_call(_cudart().cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)

    def _device_buffer(self, name: str, nbytes: int) -> int:
        """Device pointer of at least `nbytes` for tensor `name`, reallocated only when it must grow."""
        cudart = _cudart()
        pointer, capacity = self._buffers.get(name, (0, 0))
        if capacity < nbytes:
            if pointer:
                _cuda_call(cudart.cudaFree(pointer))
            pointer = int(_cuda_call(cudart.cudaMalloc(nbytes)))
            self._buffers[name] = (pointer, nbytes)
        return pointer

    def _check(self, inputs: dict[str, np.ndarray]) -> None:
        """Raise ShapeError unless inputs match the engine's names, ranks, fixed dims and float32 dtype."""
        if set(inputs) != set(self.input_names):
            raise ShapeError(
                f"expected inputs {sorted(self.input_names)}, got {sorted(inputs)}", self.engine_path
            )
        for name, array in inputs.items():
            shape = tuple(self.engine.get_tensor_shape(name))
            fixed_ok = all(d < 0 or d == a for d, a in zip(shape, array.shape, strict=False))
            if array.dtype != np.float32 or array.ndim != len(shape) or not fixed_ok:
                raise ShapeError(
                    f"input {name!r} {array.shape} {array.dtype}, engine expects {shape}", self.engine_path
                )

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named float32 arrays (batch first) -> named float32 arrays."""
        trt, cudart = _trt(), _cudart()
        self._check(inputs)
        to_device, to_host = (
            cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
            cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
        )
        for name in self.input_names:
            host = np.ascontiguousarray(inputs[name])
            self.context.set_input_shape(name, host.shape)
            pointer = self._device_buffer(name, host.nbytes)
            _cuda_call(
                cudart.cudaMemcpyAsync(pointer, host.ctypes.data, host.nbytes, to_device, self._stream)
            )
            self.context.set_tensor_address(name, pointer)
        outputs = {}
        for name in self.output_names:
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            outputs[name] = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype)
            self.context.set_tensor_address(name, self._device_buffer(name, outputs[name].nbytes))
        if not self.context.execute_async_v3(int(self._stream)):  # TensorRT takes the raw handle
            raise RuntimeError(f"TensorRT execution failed for {self.engine_path}")
        for name, host in outputs.items():
            pointer = self._buffers[name][0]
            _cuda_call(cudart.cudaMemcpyAsync(host.ctypes.data, pointer, host.nbytes, to_host, self._stream))
        _cuda_call(cudart.cudaStreamSynchronize(self._stream))
        return {name: host.astype(np.float32, copy=False) for name, host in outputs.items()}

    def close(self) -> None:
        """Free device buffers and the stream; the runner is unusable afterwards."""
        cudart = _cudart()
        for pointer, _ in self._buffers.values():
            cudart.cudaFree(pointer)
        self._buffers.clear()
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
