"""ONNX Runtime backend of `core.runner.Runner`: the default on every station and the trainer's parity oracle.

Inputs are checked against the session's declared names, ranks, fixed dims and dtypes before running, so a
wrong tensor fails with a `ShapeError` naming the graph instead of an ONNX Runtime stack trace.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.errors import CorruptFileError, InputError, ShapeError

__all__ = ["OrtRunner", "default_providers"]

# Preference order; anything else ORT offers (Azure, TensorRT EP) is left to explicit requests.
_PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
_ORT_FLOAT = "tensor(float)"


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, then CPU."""
    available = set(ort.get_available_providers())
    return [p for p in _PREFERRED_PROVIDERS if p in available]


class OrtRunner:
    """Runs one ONNX graph with ONNX Runtime; `backend` is "onnxruntime-cuda" or "onnxruntime-cpu"."""

    def __init__(
        self,
        onnx_path: str | Path,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise InputError("ONNX graph not found", path=self.onnx_path)
        options = ort.SessionOptions()
        # No CPU arena and no memory-pattern pre-allocation: the arena keeps every run's peak activations
        # (Point-MAE's 1024x128 point features are hundreds of MB) and grows run after run; without it an
        # official-size station peaks at ~1.6 GB instead of 2.7 GB and settles at ~1.1 GB (BENCHMARKS.md).
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        if intra_op_threads is not None:
            if intra_op_threads < 1:
                raise InputError(
                    f"intra_op_threads must be >= 1, got {intra_op_threads}", path=self.onnx_path
                )
            # A pinned count also keeps ORT from spinning idle workers that steal the other stages' cores.
            options.intra_op_num_threads = intra_op_threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.intra_op_threads = intra_op_threads
        try:
            self.session = ort.InferenceSession(
                str(self.onnx_path), sess_options=options, providers=list(providers or default_providers())
            )
        except Exception as err:  # ORT raises its own Fail/InvalidProtobuf/InvalidGraph types
            raise CorruptFileError(f"ONNX Runtime cannot load the graph: {err}", path=self.onnx_path) from err
        active = self.session.get_providers()[0]
        self.backend = "onnxruntime-cuda" if active == "CUDAExecutionProvider" else "onnxruntime-cpu"
        self.input_specs = {i.name: (tuple(i.shape), i.type) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def input_shapes(self) -> dict[str, tuple[int | str | None, ...]]:
        """Declared input shapes; dynamic axes appear as their symbolic name (e.g. "batch") or None."""
        return {name: shape for name, (shape, _) in self.input_specs.items()}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named float32 arrays (batch first) -> named float32 arrays."""
        self._check(inputs)
        outputs = self.session.run(self.output_names, {k: np.ascontiguousarray(v) for k, v in inputs.items()})
        return dict(zip(self.output_names, outputs, strict=True))

    def _check(self, inputs: dict[str, np.ndarray]) -> None:
        """Raise ShapeError unless inputs match the graph's names, ranks, fixed dims and float32 dtype."""
        if set(inputs) != set(self.input_specs):
            self._fail(f"expected inputs {sorted(self.input_specs)}, got {sorted(inputs)}")
        for name, array in inputs.items():
            shape, onnx_type = self.input_specs[name]
            if onnx_type != _ORT_FLOAT or np.asarray(array).dtype != np.float32:
                self._fail(f"input {name!r} must be float32 for graph type {onnx_type}, got {array.dtype}")
            fixed_ok = all(not isinstance(d, int) or d == a for d, a in zip(shape, array.shape, strict=False))
            if array.ndim != len(shape) or not fixed_ok:
                self._fail(f"input {name!r} has shape {array.shape}, graph expects {shape}")

    def _fail(self, message: str) -> None:
        raise ShapeError(message, path=self.onnx_path)
