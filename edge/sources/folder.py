"""`folder:PATH[?loop=1&fps=N]`: replay scans stored in the MVTec 3D-AD layout.

PATH may be a class folder (its `test/` tree is replayed), a split folder, or any folder under which
`rgb/` folders sit next to `xyz/` folders; files pair up by stem (`rgb/007.png` + `xyz/007.tiff`). An
`rgb/` folder without an `xyz/` sibling gives RGB-only scans. Order is sorted path order, so a replay is
repeatable. Every file that cannot be used (unreadable, wrong shape, no partner, sizes that differ)
becomes a frame carrying the error, not an exception. The folder is listed again on each loop pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError, InputError, MissingFileError, ShapeError
from core.mvtec3d import read_rgb, read_xyz
from core.scan import RawScan
from edge.sources import Frame, Pacer, check_params, float_param, int_param

_RGB = (".png", ".jpg", ".jpeg")
_XYZ = (".tiff", ".tif")


@dataclass(frozen=True)
class Pair:
    frame_id: str
    rgb: Path | None
    xyz: Path | None
    xyz_expected: bool  # an xyz/ folder exists next to rgb/, so a missing xyz file is an error


def _by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in suffixes}


def list_pairs(root: Path) -> list[Pair]:
    """Every rgb/xyz pair under root (a class folder means its test/ tree), sorted by frame id."""
    if root.name in ("rgb", "xyz"):
        root = root.parent
    if (root / "test").is_dir():
        root = root / "test"
    folders = sorted({p.parent for p in root.rglob("*") if p.is_dir() and p.name in ("rgb", "xyz")})
    pairs = []
    for parent in folders:
        rgb, xyz = _by_stem(parent / "rgb", _RGB), _by_stem(parent / "xyz", _XYZ)
        has_xyz = (parent / "xyz").is_dir()
        rel = parent.relative_to(root).as_posix()
        for stem in sorted(rgb.keys() | xyz.keys()):
            frame_id = stem if rel == "." else f"{rel}/{stem}"
            pairs.append(Pair(frame_id, rgb.get(stem), xyz.get(stem), has_xyz))
    return sorted(pairs, key=lambda p: p.frame_id)


def read_pair(pair: Pair) -> RawScan:
    """Read one pair; raises InputError subclasses naming the file at fault."""
    if pair.rgb is None:
        raise MissingFileError("xyz file has no rgb partner", pair.xyz)
    if pair.xyz is None and pair.xyz_expected:
        raise MissingFileError("rgb file has no xyz partner", pair.rgb)
    rgb = read_rgb(pair.rgb)
    xyz = None if pair.xyz is None else read_xyz(pair.xyz)
    if xyz is not None and xyz.shape[:2] != rgb.shape[:2]:
        raise ShapeError(
            f"xyz size {xyz.shape[:2]} differs from rgb {pair.rgb} size {rgb.shape[:2]}", pair.xyz
        )
    return RawScan(rgb_hwc_u8=rgb, xyz_hwc_m=xyz, source=str(pair.xyz or pair.rgb))


def frame_of(pair: Pair, frame_id: str) -> Frame:
    """Read a pair into a Frame; any failure (even an unexpected one) becomes the frame's error."""
    start = time.perf_counter()
    capture_ts = time.time()
    source_file = str(pair.xyz or pair.rgb)
    try:
        raw, error = read_pair(pair), None
    except InputError as err:
        raw, error = None, err
        source_file = err.path or source_file
    except Exception as err:  # a reader bug must not stop the station: report it as this file's error
        raw, error = None, InputError(f"cannot read ({type(err).__name__}: {err})", source_file)
    return Frame(frame_id, capture_ts, raw, error, source_file, (time.perf_counter() - start) * 1e3)


class FolderSource:
    """Replays a folder once (or forever with loop), at `fps` frames per second (0 = as fast as read)."""

    def __init__(self, root: Path, loop: bool = False, fps: float = 0.0) -> None:
        if not root.is_dir():
            raise ConfigError(f"source folder {root} does not exist")
        self.root, self.loop, self.fps = root, loop, fps
        self.live = fps > 0  # a paced replay stands in for a camera; an unpaced one waits for scoring
        self._stopped = threading.Event()
        if not list_pairs(root):
            raise ConfigError(f"source folder {root} holds no rgb/ (+ xyz/) scans")

    def stop(self) -> None:
        self._stopped.set()

    def __iter__(self) -> Iterator[Frame]:
        pacer = Pacer(self.fps, self._stopped)
        passes = 0
        while not self._stopped.is_set():
            for pair in list_pairs(self.root):
                if not pacer.wait():
                    return
                # looping repeats frame ids; the pass number keeps each frame id unique
                yield frame_of(pair, pair.frame_id if passes == 0 else f"{pair.frame_id}#{passes}")
            passes += 1
            if not self.loop:
                return


def open_folder(rest: str, params: dict[str, str]) -> FolderSource:
    uri = f"folder:{rest}"
    check_params(params, ("loop", "fps"), uri)
    return FolderSource(
        Path(rest).expanduser(), bool(int_param(params, "loop", 0, uri)), float_param(params, "fps", 0.0, uri)
    )
