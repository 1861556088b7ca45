"""Frame sources: where a station's scans come from, behind one small interface, chosen by a URI.

A source is an iterable of `Frame`s with a `stop()` method. A frame carries either a `RawScan` or the
`InputError` that reading it raised: a source never raises for one bad file, the station turns the error
into an ERROR result naming the file and goes on.

Built in:
  folder:PATH[?loop=1&fps=N]              MVTec 3D-AD-format scans: a class folder (its test/ tree), a
                                          split folder, or any folder with rgb/ + xyz/ subfolders
  synth:CLASS[?seed=N&fps=N&size=N&count=N&defects=F]
                                          live generated scans (needs the trainer's generator)

Plug-ins (real sensors): a package declares an entry point in the group `m3dm.sources`, named by the URI
scheme it serves, pointing at a factory `factory(rest: str, params: dict[str, str]) -> FrameSource`
(`rest` is what follows `scheme:` up to `?`, `params` the query string). In its pyproject.toml:

    [project.entry-points."m3dm.sources"]
    mycam = "mycam_m3dm:open_source"

and then `m3dm edge run --source 'mycam:serial=1234?fps=10'`. The worked example shipped with this
project is `rgbd:` (`edge.sources.rgbd`): the folder a structured-light camera SDK writes
(frame_NNNN.png + 16-bit depth_NNNN.png + intrinsics.json), back-projected to an organised point cloud.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qsl

from core.errors import ConfigError, InputError
from core.scan import RawScan

__all__ = ["ENTRY_POINT_GROUP", "Frame", "FrameSource", "Pacer", "open_source", "parse_uri"]

ENTRY_POINT_GROUP = "m3dm.sources"


@dataclass(frozen=True)
class Frame:
    """One capture. Exactly one of `raw` / `error` is set; `source_file` names the file (or sensor frame).

    capture_ts: Unix seconds when the frame was captured (read). read_ms: time the source spent reading it.
    """

    frame_id: str
    capture_ts: float
    raw: RawScan | None
    error: InputError | None
    source_file: str
    read_ms: float = 0.0


@runtime_checkable
class FrameSource(Protocol):
    """An iterable of frames. Finite sources end; live ones run until `stop()` is called.

    `live`: frames arrive in real time (a camera, a paced replay) and cannot wait, so the pipeline's
    backpressure policy applies; a non-live source (a recording read as fast as possible) simply waits
    for the pipeline and never loses a frame.
    """

    live: bool

    def __iter__(self) -> Iterator[Frame]: ...

    def stop(self) -> None: ...


SourceFactory = Callable[[str, dict[str, str]], FrameSource]


class Pacer:
    """Holds a source to `fps` frames per second (0 = as fast as it reads); interruptible by `stop`."""

    def __init__(self, fps: float, stopped: threading.Event) -> None:
        self.period_s = 1.0 / fps if fps > 0 else 0.0
        self.stopped = stopped
        self._next = time.monotonic()

    def wait(self) -> bool:
        """Sleep until the next frame slot; False once the source was stopped."""
        if self.period_s:
            delay = self._next - time.monotonic()
            if delay > 0 and self.stopped.wait(delay):
                return False
            self._next = max(self._next + self.period_s, time.monotonic())
        return not self.stopped.is_set()


def parse_uri(uri: str) -> tuple[str, str, dict[str, str]]:
    """'scheme:rest?k=v&k2=v2' -> (scheme, rest, {k: v}). A bare path is read as folder:PATH."""
    scheme, sep, tail = uri.partition(":")
    if not sep or len(scheme) < 2 or not scheme.replace("_", "").replace("-", "").isalnum():
        # no scheme (or a Windows drive letter): a plain folder path
        scheme, tail = "folder", uri
    rest, _, query = tail.partition("?")
    try:
        params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError as err:
        raise ConfigError(f"source {uri!r}: bad query string ({err})") from None
    return scheme, rest, params


def _builtin(scheme: str) -> SourceFactory | None:
    if scheme == "folder":
        from edge.sources.folder import open_folder

        return open_folder
    if scheme == "synth":
        from edge.sources.synth import open_synth

        return open_synth
    return None


def _plugin(scheme: str) -> SourceFactory | None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == scheme:
            return ep.load()
    return None


def known_schemes() -> list[str]:
    return sorted({"folder", "synth", *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})


def open_source(uri: str) -> FrameSource:
    """The FrameSource a URI names: a built-in scheme, else an `m3dm.sources` entry point."""
    scheme, rest, params = parse_uri(uri)
    factory = _builtin(scheme) or _plugin(scheme)
    if factory is None:
        raise ConfigError(f"source {uri!r}: unknown scheme {scheme!r}; known: {', '.join(known_schemes())}")
    return factory(rest, params)


def float_param(params: dict[str, str], name: str, default: float, uri: str = "") -> float:
    try:
        return float(params.get(name, default))
    except ValueError:
        raise ConfigError(f"source {uri}: {name}={params[name]!r} is not a number") from None


def int_param(params: dict[str, str], name: str, default: int, uri: str = "") -> int:
    try:
        return int(params.get(name, default))
    except ValueError:
        raise ConfigError(f"source {uri}: {name}={params[name]!r} is not an integer") from None


def check_params(params: dict[str, str], known: tuple[str, ...], uri: str) -> None:
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"source {uri}: unknown parameter(s) {unknown}; known: {list(known)}")
