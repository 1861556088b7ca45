"""Role configuration: a frozen dataclass filled from one TOML table, then from command-line flags.

Every role (station, collector, registry) has one root dataclass. `load_config(Cls, path, overrides)`
reads the TOML file (if any), refuses unknown keys with their names, applies the overrides that are not
None (flags the user actually passed), and converts lists to tuples and strings to Paths where the field
type says so. Stdlib only.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ConfigFileError", "load_config"]

T = TypeVar("T")


class ConfigFileError(ValueError):
    """A config file that cannot be read, or keys/values that do not fit the role's dataclass."""


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(options[0], value, where)
    if tp is Path or (isinstance(tp, type) and issubclass(tp, Path)):
        return Path(value)
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_coerce(item, v, where) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return _build(tp, value, where)
    return value


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigFileError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    try:
        return cls(**{k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()})
    except (TypeError, ValueError) as err:
        raise ConfigFileError(f"{where}: {err}") from None


def load_config(
    cls: type[T], path: Path | None = None, overrides: dict[str, Any] | None = None, table: str | None = None
) -> T:
    """cls(**TOML[table] | overrides); `table=None` reads the file's top level. Unknown keys raise."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            parsed = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigFileError(f"{path}: {err}") from None
        data = parsed.get(table, {}) if table else parsed
        if not isinstance(data, dict):
            raise ConfigFileError(f"{path}: [{table}] must be a table")
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return _build(cls, data, str(path) if path else cls.__name__)
