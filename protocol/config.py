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


_SCALARS = (bool, int, float, str)


def _check_scalar(tp: Any, value: Any, where: str) -> None:
    """A TOML value of the wrong scalar type (a string for a number, a bool for a count) is refused here,
    with its key, instead of failing later inside the role (or never)."""
    # bool is an int subclass in Python; a config `count = true` is a mistake, not 1.
    wrong = not isinstance(value, tp) or (tp is not bool and isinstance(value, bool))
    if wrong:
        raise ConfigFileError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(options[0], value, where)
    if tp is Path or (isinstance(tp, type) and issubclass(tp, Path)):
        if not isinstance(value, str | Path):
            raise ConfigFileError(f"{where}: expected a path string, got {type(value).__name__} {value!r}")
        return Path(value)
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(tp)
        if (len(args) == 2 and args[1] is Ellipsis) or len(args) == 1:  # tuple[X, ...]: every item an X
            return tuple(_coerce(args[0], v, where) for v in value)
        if args and len(args) != len(value):
            raise ConfigFileError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(a, v, where) for a, v in zip(args or [Any] * len(value), value, strict=True))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in _SCALARS:
        _check_scalar(tp, value, where)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return _build(tp, value, where)
    return value


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    """cls(**data) with every value coerced; errors carry the dotted key path (`where`, "" at the root)."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = {f.name for f in fields}
    here = f"{where}: " if where else ""
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigFileError(f"{here}unknown key(s) {unknown}; known: {sorted(names)}")
    values = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    missing = [
        f.name
        for f in fields
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigFileError(f"{here}missing required key(s) {missing}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigFileError(f"{here}{err}") from None


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
    try:
        return _build(cls, data, "")
    except ConfigFileError as err:  # one location prefix: the file (or the role, without one)
        raise ConfigFileError(f"{path if path else cls.__name__}: {err}") from None
