"""core.errors: an input error names its file in the message and in `.path`; the hierarchy callers catch."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import (
    ConfigError,
    CorruptFileError,
    EmptyCloudError,
    InputError,
    InvalidCloudError,
    M3DMError,
    MissingFileError,
    MissingWeightsError,
    ShapeError,
)


@pytest.mark.parametrize("path", ["scans/001.tiff", Path("scans/001.tiff")])
def test_an_input_error_prefixes_its_path(path: str | Path) -> None:
    err = CorruptFileError("truncated", path)
    assert str(err) == "scans/001.tiff: truncated"
    assert err.path == "scans/001.tiff" and isinstance(err.path, str)
    with pytest.raises(InputError, match="^scans/001.tiff: truncated$"):
        raise err


def test_an_input_error_without_a_path_is_the_message_alone() -> None:
    err = ShapeError("rgb must be (H, W, 3)")
    assert str(err) == "rgb must be (H, W, 3)" and err.path is None
    assert err.args == ("rgb must be (H, W, 3)",)
    empty = EmptyCloudError("no points", "")  # a scan without a source name: nothing to prefix
    assert str(empty) == "no points" and empty.path == ""


def test_the_hierarchy_that_stations_and_the_cli_catch() -> None:
    for cls in (CorruptFileError, ShapeError, InvalidCloudError, EmptyCloudError, MissingFileError):
        assert issubclass(cls, InputError) and not issubclass(cls, ConfigError)
    assert issubclass(MissingWeightsError, ConfigError) and not issubclass(MissingWeightsError, InputError)
    assert issubclass(InputError, M3DMError) and issubclass(ConfigError, M3DMError)
    assert issubclass(M3DMError, Exception)
