"""protocol.config.load_config on its own dataclasses: coercion by field type, error locations, tables."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from pathlib import Path, PosixPath

import pytest

from protocol.config import ConfigFileError, load_config


@dataclass(frozen=True)
class _Inner:
    port: int = 1
    root: Path = Path(".")

    def __post_init__(self) -> None:
        if self.port < 0:
            raise ValueError(f"port must be >= 0, got {self.port}")


@dataclass(frozen=True)
class _Role:
    rate_hz: float = 1.0
    count: int = 0
    flag: bool = False
    data: Path | None = None
    paths: tuple[Path, ...] = ()
    pair: tuple[int, str] = (0, "")
    inner: _Inner = field(default_factory=_Inner)


def _toml(tmp_path: Path, text: str, name: str = "role") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_values_are_coerced_by_field_type(tmp_path: Path) -> None:
    text = 'rate_hz = 5\ncount = 3\ndata = "/d"\npaths = ["a", "b"]\npair = [7, "x"]\n'
    cfg = load_config(_Role, _toml(tmp_path, text + '[inner]\nport = 9\nroot = "/r"\n'))
    assert cfg.rate_hz == 5.0 and type(cfg.rate_hz) is float  # a TOML int for a float field
    assert cfg.count == 3 and type(cfg.count) is int
    assert cfg.data == Path("/d") and cfg.paths == (Path("a"), Path("b"))  # Optional[Path], tuple of Paths
    assert cfg.pair == (7, "x")  # tuple[int, str]: a tuple, items as written
    assert cfg.inner == _Inner(port=9, root=Path("/r"))


def test_a_string_stays_a_string_and_only_lists_become_tuples(tmp_path: Path) -> None:
    cfg = load_config(_Role, None, {"pair": [1, "a"], "data": None})
    assert cfg.pair == (1, "a") and cfg.data is None
    assert load_config(_Role, None, {"paths": "ab"}).paths == "ab"  # only lists become tuples


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rate_hz": True}, "rate_hz: expected float, got bool True"),  # not silently 1.0
        ({"count": True}, "count: expected int, got bool True"),  # bool is an int in Python, not here
        ({"count": 2.5}, "count: expected int, got float 2.5"),
        ({"flag": "yes"}, "flag: expected bool, got str 'yes'"),
        ({"rate_hz": "fast"}, "rate_hz: expected float, got str 'fast'"),
        ({"data": 3}, "data: expected a path string, got int 3"),
        ({"pair": [1]}, "pair: expected 2 items, got 1"),
        ({"pair": ["1", "a"]}, "pair: expected int, got str '1'"),
        ({"inner": {"port": "80"}}, "inner.port: expected int, got str '80'"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_with_its_key(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigFileError, match=rf"^_Role: {re.escape(message)}$"):
        load_config(_Role, None, overrides)


@dataclass(frozen=True)
class _Needs:
    bundle: Path
    source: str
    port: int = 1


def test_missing_required_keys_are_named_not_a_python_traceback(tmp_path: Path) -> None:
    path = _toml(tmp_path, "port = 2\n")
    with pytest.raises(
        ConfigFileError, match=rf"^{re.escape(str(path))}: missing required key\(s\) \['bundle', 'source'\]$"
    ):
        load_config(_Needs, path)
    assert load_config(_Needs, path, {"bundle": "b", "source": "s"}) == _Needs(Path("b"), "s", 2)


def test_errors_name_the_file_and_the_key_path(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[inner]\nport = -1\n")
    # the file once, then the key path inside it
    with pytest.raises(ConfigFileError, match=rf"^{re.escape(str(path))}: inner: port must be >= 0, got -1$"):
        load_config(_Role, path)
    with pytest.raises(
        ConfigFileError,
        match=r"^_Role: inner: unknown key\(s\) \['colour'\]; known: \['port', 'root'\]$",
    ):
        load_config(_Role, None, {"inner": {"colour": 1}})
    with pytest.raises(
        ConfigFileError, match=rf"^{re.escape(str(tmp_path / 'absent.toml'))}: \[Errno 2\] No such file"
    ):
        load_config(_Role, tmp_path / "absent.toml")


def test_a_table_is_read_when_named_and_must_be_a_table(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'count = 1\nstation = "x"\n[role]\ncount = 4\n')
    assert load_config(_Role, _toml(tmp_path, "count = 1\n[role]\ncount = 4\n", "t"), table="role").count == 4
    assert (
        load_config(_Role, _toml(tmp_path, "count = 2\n", "m"), table="missing").count == 0
    )  # absent: defaults
    with pytest.raises(ConfigFileError, match=r"^.*role\.toml: \[station\] must be a table$"):
        load_config(_Role, path, table="station")
    assert load_config(_Role, _toml(tmp_path, "count = 5\n", "top")).count == 5  # no table: the top level


@dataclass(frozen=True)
class _Shapes:
    local: PosixPath = PosixPath(".")  # a Path subclass as the field type
    loose: typing.Tuple = ()  # noqa: UP006  bare Tuple: any number of items, each as written
    extra: dict[str, int] = field(default_factory=dict)  # a dict that is not a dataclass table
    inner: _Inner = field(default_factory=_Inner)


def test_path_subclasses_bare_tuples_and_plain_dicts(tmp_path: Path) -> None:
    text = 'local = "/l"\nloose = [1, "a", 2.5]\n[extra]\nx = 1\n'
    cfg = load_config(_Shapes, _toml(tmp_path, text))
    assert cfg.local == Path("/l") and isinstance(cfg.local, Path)  # not left a str
    assert cfg.loose == (1, "a", 2.5)
    assert cfg.extra == {"x": 1}  # kept as the dict it is, not built as a dataclass
    inner = _Inner(port=3)
    assert load_config(_Shapes, None, {"inner": inner}).inner is inner  # an instance passes unchanged


def test_a_wrong_item_of_a_variable_length_tuple_names_its_key() -> None:
    with pytest.raises(ConfigFileError, match=r"^_Role: paths: expected a path string, got int 1$"):
        load_config(_Role, None, {"paths": ["a", 1]})
