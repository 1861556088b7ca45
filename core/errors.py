"""Typed errors for bad input. Each names the file (or source) at fault, so a station can log and skip."""

from __future__ import annotations

from pathlib import Path


class M3DMError(Exception):
    """Base of every error this project raises on purpose."""


class InputError(M3DMError):
    """A scan or file that cannot be used. `path` names the file when there is one."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class CorruptFileError(InputError):
    """Unreadable, truncated or wrongly formatted file."""


class ShapeError(InputError):
    """Wrong shape, dtype, or rgb/xyz size mismatch."""


class InvalidCloudError(InputError):
    """All-zero, NaN or inf point cloud."""


class EmptyCloudError(InputError):
    """No object points left (e.g. after plane removal)."""


class ConfigError(M3DMError):
    """A configuration or preset that cannot work (missing weights, bad values)."""


class MissingWeightsError(ConfigError):
    """An official checkpoint file is required but absent."""


class MissingFileError(InputError):
    """A file or folder a sample needs is absent (e.g. an rgb image without its xyz partner)."""
