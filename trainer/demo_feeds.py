"""Demo camera feeds and the offline reference they are checked against.

Each demo station replays part of one class's test split. `build_feeds` lays out one folder per station in
the MVTec 3D-AD test layout (`<defect>/rgb/*.png`, `<defect>/xyz/*.tiff`, symlinks into the data set), so
the station's `folder:` source reads them like any scan folder. `offline_decisions` scores the same files
through the bundle on this machine (the station's own code path), which is what the fleet's results must
agree with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.mvtec3d import list_samples, load_scan

__all__ = ["FeedPlan", "OfflineDecision", "build_feeds", "offline_decisions"]


@dataclass(frozen=True)
class FeedPlan:
    """Which station replays which scans of which class."""

    station_id: str
    class_name: str
    folder: Path
    rgb_files: tuple[Path, ...]  # the data set's own files (resolved), in replay order


@dataclass(frozen=True)
class OfflineDecision:
    rgb_file: Path
    image_score: float
    decision: str


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target.resolve(), link)


def build_feeds(data_root: Path, out: Path, stations: dict[str, str]) -> list[FeedPlan]:
    """stations: station id -> class. Stations of the same class share its test scans round-robin."""
    by_class: dict[str, list[str]] = {}
    for station_id, class_name in stations.items():
        by_class.setdefault(class_name, []).append(station_id)
    plans = []
    for class_name, station_ids in by_class.items():
        samples = list_samples(data_root, class_name, "test")
        for index, station_id in enumerate(station_ids):
            folder = out / station_id
            mine = samples[index :: len(station_ids)]
            for ref in mine:
                _link(ref.rgb_path, folder / ref.defect_type / "rgb" / ref.rgb_path.name)
                if ref.xyz_path is not None:
                    _link(ref.xyz_path, folder / ref.defect_type / "xyz" / ref.xyz_path.name)
            plans.append(FeedPlan(station_id, class_name, folder, tuple(r.rgb_path.resolve() for r in mine)))
    return plans


def offline_decisions(
    bundle: Path, key: Path, data_root: Path, class_name: str
) -> dict[Path, OfflineDecision]:
    """Score every test scan of `class_name` through the verified bundle; resolved rgb path -> decision."""
    from edge.station_model import open_bundle

    model = open_bundle(bundle, key)
    threshold = model.manifest.thresholds
    decisions = {}
    for ref in list_samples(data_root, class_name, "test"):
        scores = model.score_raw(load_scan(ref))
        score = float(scores.image[threshold.variant])
        decision = "NOK" if score > threshold.image_threshold else "OK"
        decisions[ref.rgb_path.resolve()] = OfflineDecision(ref.rgb_path.resolve(), score, decision)
    return decisions
