"""Read a split of an MVTec 3D-AD-layout data set and turn it into patch features, skipping bad files.

The same `core.preprocess` and `core.features` functions that a station runs are used here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from core.config import FeaturePreset, PreprocessConfig
from core.errors import ConfigError, InputError
from core.features import FeatureRunners, extract_features
from core.mvtec3d import RGB_XYZ, SampleRef, list_samples, load_scan
from core.preprocess import prepare_scan
from core.scan import PatchFeatures
from trainer.progress import track

log = logging.getLogger("m3dm.trainer")


@dataclass
class SplitFeatures:
    """Features of one split, in reader order, with what a report needs beside them."""

    refs: list[SampleRef] = field(default_factory=list)
    features: list[PatchFeatures] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)  # (224,224) bool each
    rgb_u8: list[np.ndarray] = field(default_factory=list)  # (224,224,3) uint8 each, for overlays
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.refs], dtype=np.int64)

    def masks_nhw(self) -> np.ndarray:
        return np.stack(self.masks) if self.masks else np.zeros((0, 224, 224), bool)


def extract_split(
    root: Path,
    class_name: str,
    split: str,
    preset: FeaturePreset,
    preprocess: PreprocessConfig,
    runners: FeatureRunners,
    keep_images: bool = False,
    modalities: tuple[str, ...] = RGB_XYZ,
) -> SplitFeatures:
    """Features for every readable sample of one split; unreadable ones are logged and skipped.

    modalities RGB_ONLY: an RGB-only model's features (rgb grid alone); xyz files, if any, are not read, as
    a station running that model ignores a frame's points. RGB_XYZ needs every sample's xyz file.
    """
    out = SplitFeatures()
    refs = list_samples(root, class_name, split)
    if "point" in modalities and any(ref.xyz_path is None for ref in refs):
        lacking = next(ref for ref in refs if ref.xyz_path is None)
        raise ConfigError(
            f"{lacking.sample_id} has no xyz file, but this model uses point clouds; "
            "score RGB-only data with a model trained RGB-only"
        )
    for ref in track(refs, f"{class_name}/{split} features", total=len(refs)):
        try:
            raw = load_scan(ref if "point" in modalities else replace(ref, xyz_path=None))
            scan = prepare_scan(raw, preprocess)
            feats = extract_features(scan, preset, runners, modalities)
        except InputError as err:
            log.warning("skipping %s: %s", ref.rgb_path, err)
            out.skipped.append((str(ref.rgb_path), str(err)))
            continue
        out.refs.append(ref)
        out.features.append(feats)
        gt = scan.gt_ids_hw
        out.masks.append(np.zeros(scan.valid_hw.shape, bool) if gt is None else gt > 0)
        if keep_images:
            out.rgb_u8.append(scan.rgb_hwc_u8)
    return out
