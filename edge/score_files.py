"""`m3dm edge score`: scans from files or folders, once through the station pipeline, as plain dicts."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from core.errors import ConfigError
from edge.decision import ResultOptions
from edge.metrics import StationMetrics
from edge.model_slot import ModelSlot, Policy
from edge.pipeline import Pipeline, PipelineConfig, Scored
from edge.sources import Frame
from edge.sources.folder import Pair, frame_of, list_pairs

__all__ = ["PathSource", "collect_results", "pair_of_file", "score_paths"]


def pair_of_file(path: Path) -> Pair:
    """The rgb/xyz pair a single file belongs to (MVTec layout: <dir>/rgb/STEM.png + <dir>/xyz/STEM.tiff)."""
    stem, parent = path.stem, path.parent
    if parent.name == "xyz":
        rgb = parent.parent / "rgb" / f"{stem}.png"
        return Pair(stem, rgb if rgb.exists() else None, path, True)
    if parent.name == "rgb":
        for suffix in (".tiff", ".tif"):
            xyz = parent.parent / "xyz" / f"{stem}{suffix}"
            if xyz.exists():
                return Pair(stem, path, xyz, True)
        return Pair(stem, path, None, (parent.parent / "xyz").is_dir())
    raise ConfigError(f"{path}: expected a file inside an rgb/ or xyz/ folder, or a scan folder")


class PathSource:
    """A finite source over folders (every pair in them) and single files, in the order given."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.pairs: list[Pair] = []
        for path in paths:
            if path.is_dir():
                prefix = path.name
                self.pairs += [
                    Pair(f"{prefix}/{p.frame_id}", p.rgb, p.xyz, p.xyz_expected) for p in list_pairs(path)
                ]
            elif path.exists():
                self.pairs.append(pair_of_file(path))
            else:
                raise ConfigError(f"{path}: no such file or folder")
        self._stopped = threading.Event()
        self.live = False

    def stop(self) -> None:
        self._stopped.set()

    def __iter__(self) -> Iterator[Frame]:
        for pair in self.pairs:
            if self._stopped.is_set():
                return
            yield frame_of(pair, pair.frame_id)


def collect_results(model: Any, source: Any, variant: str | None = None) -> list[Scored]:
    """Run a finite source through the pipeline (block backpressure: nothing dropped); every Scored."""
    out: list[Scored] = []
    slot = ModelSlot(model, Policy(variant=variant))
    pipeline = Pipeline(
        source, slot, out.append, StationMetrics("score"), ResultOptions("score"), PipelineConfig(4, "block")
    )
    pipeline.start()
    pipeline.join()
    return out


def score_paths(
    paths: Sequence[Path], bundle: Path, key: Path | None, variant: str | None, backend: str
) -> list[dict[str, Any]]:
    from edge.station_model import open_bundle

    source = PathSource(paths)
    model = open_bundle(bundle, key, backend)
    return [msgspec.to_builtins(s.result) for s in collect_results(model, source, variant)]
