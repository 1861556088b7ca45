"""The one interface every network backend implements (ONNX Runtime, TensorRT, torch in the trainer)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Runner(Protocol):
    """Runs one network: named float32 inputs in, named float32 outputs out. Batch is the first axis."""

    backend: str

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
