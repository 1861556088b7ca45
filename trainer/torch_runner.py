"""A `core.runner.Runner` over an eager torch module, so the trainer computes features through core code.

The trainer wraps its networks with this; a station runs the exported graphs through `edge.runners` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from core.errors import ShapeError

__all__ = ["TorchRunner"]


class TorchRunner:
    """Runs `module(*inputs in input_names order)` in float32 under inference mode; numpy in, numpy out."""

    backend = "torch"

    def __init__(self, module: nn.Module, input_names: Sequence[str], output_names: Sequence[str]) -> None:
        self.module = module.eval()
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named float32 arrays (batch first) -> named float32 arrays."""
        if set(inputs) != set(self.input_names):
            raise ShapeError(
                f"torch runner expects inputs {list(self.input_names)}, got {sorted(inputs)}",
                path=type(self.module).__name__,
            )
        tensors = [
            torch.from_numpy(np.ascontiguousarray(inputs[n], dtype=np.float32)) for n in self.input_names
        ]
        with torch.inference_mode():
            outputs = self.module(*tensors)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        if len(outputs) != len(self.output_names):
            raise ShapeError(
                f"module returned {len(outputs)} outputs for names {list(self.output_names)}",
                path=type(self.module).__name__,
            )
        return {n: t.float().cpu().numpy() for n, t in zip(self.output_names, outputs, strict=True)}
