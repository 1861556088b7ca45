"""Errors of the training run itself (not of its input files): a fit that must not produce a model."""

from __future__ import annotations

from core.errors import M3DMError

__all__ = ["TrainingError"]


class TrainingError(M3DMError):
    """Training diverged or learned nothing (a NaN/inf loss, an SVM with non-finite weights).

    Raised before anything is written: a failed fit never leaves a model folder to build a bundle from.
    """
