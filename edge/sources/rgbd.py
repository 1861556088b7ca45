"""`rgbd:PATH[?fps=N&loop=1&follow=1]`: the worked example of a sensor plug-in (entry point `m3dm.sources`).

Structured-light camera SDKs (Zivid, Photoneo, Intel RealSense recorders, Orbbec, ...) commonly save a
capture as a colour image, a registered 16-bit depth image and the colour camera's intrinsics:

    PATH/intrinsics.json     {"fx": 600.0, "fy": 600.0, "cx": 319.5, "cy": 239.5, "depth_scale": 0.001}
    PATH/frame_0000.png      colour, (H, W) 8-bit RGB (or grey)
    PATH/depth_0000.png      depth, (H, W) 16-bit unsigned, registered to the colour image; 0 = no depth

`depth_scale` is metres per depth unit (0.001 for millimetres). Each depth pixel (u, v, d) is
back-projected through the pinhole model to camera-frame metres:

    z = d * depth_scale,  x = (u - cx) * z / fx,  y = (v - cy) * z / fy

giving the organised (H, W, 3) float32 cloud M3DM reads from MVTec's xyz TIFFs ((0, 0, 0) = missing).
With `follow=1` the folder is watched for new frames as the SDK writes them (the SDK should write each
file whole, e.g. write-then-rename; a half-written file is reported as that frame's ERROR). It is
registered in this project's pyproject.toml exactly as a third-party plug-in would be:

    [project.entry-points."m3dm.sources"]
    rgbd = "edge.sources.rgbd:open_rgbd"
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import ConfigError, CorruptFileError, InputError, MissingFileError, ShapeError
from core.mvtec3d import read_rgb
from core.preprocess import sanitize_xyz
from core.scan import RawScan
from edge.sources import Frame, Pacer, check_params, float_param, int_param

_FRAME = re.compile(r"^frame_(\d+)\.png$")
_POLL_S = 0.05


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics of the colour camera, pixels; depth_scale in metres per depth unit."""

    fx: float
    fy: float
    cx: float
    cy: float
    depth_scale: float


def read_intrinsics(path: Path) -> Intrinsics:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        intr = Intrinsics(**{k: float(data[k]) for k in ("fx", "fy", "cx", "cy", "depth_scale")})
    except FileNotFoundError:
        raise ConfigError(f"rgbd source: {path} not found") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"rgbd source: {path}: needs numbers fx, fy, cx, cy, depth_scale ({err})") from None
    if min(intr.fx, intr.fy, intr.depth_scale) <= 0:
        raise ConfigError(f"rgbd source: {path}: fx, fy and depth_scale must be > 0")
    return intr


def read_depth(path: Path) -> np.ndarray:
    """(H, W) uint16 depth units."""
    if not path.is_file():
        raise MissingFileError("depth image not found", path)
    try:
        with Image.open(path) as img:
            depth = np.asarray(img)
    except Exception as err:  # Pillow raises many types for broken files
        raise CorruptFileError(f"unreadable depth image ({type(err).__name__}: {err})", path) from err
    if depth.ndim != 2 or depth.dtype.kind not in "ui":
        raise ShapeError(f"depth must be a (H, W) 16-bit image, got {depth.shape} {depth.dtype}", path)
    return depth


def back_project(depth_hw: np.ndarray, intr: Intrinsics) -> np.ndarray:
    """Organised (H, W, 3) float32 camera-frame metres from depth units; 0 depth -> (0, 0, 0)."""
    h, w = depth_hw.shape
    z = depth_hw.astype(np.float32) * np.float32(intr.depth_scale)
    u = np.arange(w, dtype=np.float32)[None, :]
    v = np.arange(h, dtype=np.float32)[:, None]
    x = (u - np.float32(intr.cx)) * z / np.float32(intr.fx)
    y = (v - np.float32(intr.cy)) * z / np.float32(intr.fy)
    return np.stack([x, y, z], axis=-1).astype(np.float32, copy=False)


def read_rgbd(colour: Path, depth: Path, intr: Intrinsics) -> RawScan:
    rgb = read_rgb(colour)
    depth_hw = read_depth(depth)
    if depth_hw.shape != rgb.shape[:2]:
        raise ShapeError(
            f"depth size {depth_hw.shape} differs from colour {colour} size {rgb.shape[:2]}", depth
        )
    xyz = sanitize_xyz(back_project(depth_hw, intr), str(depth))
    return RawScan(rgb_hwc_u8=rgb, xyz_hwc_m=xyz, source=str(depth))


class RgbdSource:
    def __init__(self, root: Path, fps: float, loop: bool, follow: bool) -> None:
        if not root.is_dir():
            raise ConfigError(f"rgbd source: {root} is not a folder")
        self.root, self.fps, self.loop, self.follow = root, fps, loop, follow
        self.live = follow or fps > 0
        self.intrinsics = read_intrinsics(root / "intrinsics.json")
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def _numbers(self) -> list[str]:
        return sorted((m.group(1) for p in self.root.iterdir() if (m := _FRAME.match(p.name))), key=int)

    def _frame(self, number: str) -> Frame:
        colour, depth = self.root / f"frame_{number}.png", self.root / f"depth_{number}.png"
        capture_ts, start = time.time(), time.perf_counter()
        try:
            raw, error, name = read_rgbd(colour, depth, self.intrinsics), None, str(depth)
        except InputError as err:
            raw, error, name = None, err, err.path or str(depth)
        except Exception as err:  # never stop the station for one capture
            raw, error, name = (
                None,
                InputError(f"cannot read ({type(err).__name__}: {err})", depth),
                str(depth),
            )
        return Frame(number, capture_ts, raw, error, name, (time.perf_counter() - start) * 1e3)

    def __iter__(self) -> Iterator[Frame]:
        pacer = Pacer(self.fps, self._stopped)
        seen: set[str] = set()
        passes = 0
        while not self._stopped.is_set():
            fresh = [n for n in self._numbers() if n not in seen]
            if not fresh and self.follow:
                self._stopped.wait(_POLL_S)
                continue
            for number in fresh:
                if not pacer.wait():
                    return
                frame = self._frame(number)
                yield frame if passes == 0 else replace(frame, frame_id=f"{number}#{passes}")
                seen.add(number)
            if self.follow:
                continue
            if not self.loop:
                return
            seen.clear()
            passes += 1


def open_rgbd(rest: str, params: dict[str, str]) -> RgbdSource:
    uri = f"rgbd:{rest}"
    check_params(params, ("fps", "loop", "follow"), uri)
    return RgbdSource(
        Path(rest).expanduser(),
        float_param(params, "fps", 0.0, uri),
        bool(int_param(params, "loop", 0, uri)),
        bool(int_param(params, "follow", 0, uri)),
    )
