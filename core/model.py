"""The one scoring path: PatchFeatures -> per-bank scores -> the five variants' image scores and maps.

Both the trainer's evaluation and the station call `FrameScorer.score`. UFF runs through a `Runner`
("uff"), kNN scoring through `core.scoring`, decision-layer fusion through `core.fusion`. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.config import ScoreConfig
from core.errors import ConfigError, ShapeError
from core.fusion import LinearOneClassSVM, ScoreNormaliser
from core.runner import Runner
from core.scan import PatchFeatures
from core.scoring import MemoryBank, score_bank

__all__ = [
    "BANKS",
    "COMBINATIONS",
    "VARIANTS",
    "FrameScorer",
    "FrameScores",
    "prepare_dlf_inputs",
    "upsample_nearest",
]

BANKS = ("rgb", "point", "fusion")
VARIANTS = ("rgb", "point", "fusion", "rgb+point", "rgb+point+fusion")
# Combination variant -> indices into BANKS of the scores its DLF consumes (in that column order).
COMBINATIONS: dict[str, tuple[int, ...]] = {"rgb+point": (0, 1), "rgb+point+fusion": (0, 1, 2)}


@dataclass(frozen=True, eq=False)
class FrameScores:
    """Scores of one frame.

    bank_image: (3,) float32 raw image scores [rgb, point, fusion]; bank_maps: (3, S, S) float32.
    image: variant -> image anomaly score; maps: variant -> (S, S) float32 anomaly map.
    """

    bank_image: np.ndarray
    bank_maps: np.ndarray
    image: dict[str, float]
    maps: dict[str, np.ndarray]


def prepare_dlf_inputs(
    bank_image_b: np.ndarray,
    bank_maps_bhw: np.ndarray,
    normaliser: ScoreNormaliser | None,
    rgb_lambda: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-bank scores as DLF sees them: (..., 3) and (..., 3, H, W) float32.

    With a normaliser the banks are already on a common scale, so the rgb lambda is NOT applied (it only
    compensated M3DM's raw rgb distances being larger; on z-scores it would just mute rgb). Without one we
    reproduce M3DM: raw scores with rgb (bank 0) multiplied by rgb_lambda (0.1).
    """
    if normaliser is not None:
        return normaliser.apply(bank_image_b, bank_maps_bhw)
    image = np.array(bank_image_b, dtype=np.float32)
    maps = np.array(bank_maps_bhw, dtype=np.float32)
    image[..., 0] *= rgb_lambda
    maps[..., 0, :, :] *= rgb_lambda
    return image, maps


def upsample_nearest(feats_hwc: np.ndarray, factor: int) -> np.ndarray:
    """(h, w, C) -> (h·f, w·f, C) by duplication; equals M3DM's AdaptiveAvgPool2d for an integer factor."""
    return np.repeat(np.repeat(feats_hwc, factor, axis=0), factor, axis=1)


class FrameScorer:
    """Scores PatchFeatures against the rgb/point/fusion banks and fuses them into the five variants."""

    def __init__(
        self,
        banks: dict[str, MemoryBank],
        dlf: dict[str, tuple[LinearOneClassSVM, LinearOneClassSVM]] | None,
        normaliser: ScoreNormaliser | None,
        uff: Runner | None,
        score_cfg: ScoreConfig,
    ) -> None:
        """dlf=None gives a scorer that only computes bank_scores (the trainer before DLF fitting)."""
        missing = [b for b in BANKS if b not in banks] + [
            v for v in COMBINATIONS if dlf is not None and v not in dlf
        ]
        if missing:
            raise ConfigError(f"FrameScorer is missing banks / DLF models: {', '.join(missing)}")
        for variant, cols in COMBINATIONS.items():
            if dlf is not None and any(svm.n_features != len(cols) for svm in dlf[variant]):
                raise ConfigError(f"DLF for {variant!r} must take {len(cols)} features")
        if normaliser is not None and normaliser.n_banks != len(BANKS):
            raise ConfigError(f"normaliser must cover {len(BANKS)} banks, got {normaliser.n_banks}")
        self.banks = {name: banks[name] for name in BANKS}
        self.dlf = None if dlf is None else {variant: dlf[variant] for variant in COMBINATIONS}
        self.normaliser = normaliser
        self.uff = uff
        self.score_cfg = score_cfg

    def fused_features(self, features: PatchFeatures) -> np.ndarray:
        """(g, g, Cp+Cr) float32 fusion-bank features: UFF(point, 2x-duplicated rgb), or their concatenation.

        Without a UFF runner the fused feature is concat(point, rgb), M3DM's dead-code branch (spec §7).
        """
        point = np.asarray(features.point_hwc, dtype=np.float32)
        rgb = np.asarray(features.rgb_hwc, dtype=np.float32)
        grid = point.shape[0]
        if point.ndim != 3 or rgb.ndim != 3 or point.shape[1] != grid or grid % rgb.shape[0]:
            raise ShapeError(f"point {point.shape} / rgb {rgb.shape} grids are not aligned")
        rgb_up = upsample_nearest(rgb, grid // rgb.shape[0])
        if self.uff is None:
            return np.concatenate([point, rgb_up], axis=-1)
        out_dim = point.shape[-1] + rgb.shape[-1]
        outputs = self.uff.run(
            {
                "point_feats": point.reshape(1, grid * grid, point.shape[-1]),
                "rgb_feats": np.ascontiguousarray(rgb_up.reshape(1, grid * grid, rgb.shape[-1])),
            }
        )
        fused = np.asarray(outputs["fused"], dtype=np.float32)
        if fused.shape != (1, grid * grid, out_dim):
            raise ShapeError(f"uff runner returned {fused.shape}, expected (1, {grid * grid}, {out_dim})")
        return fused.reshape(grid, grid, out_dim)

    def bank_scores(self, features: PatchFeatures) -> tuple[np.ndarray, np.ndarray]:
        """Raw per-bank scores [rgb, point, fusion]: bank_image (3,) float32, bank_maps (3, S, S) float32."""
        queries = {
            "rgb": np.asarray(features.rgb_hwc, dtype=np.float32),
            "point": np.asarray(features.point_hwc, dtype=np.float32),
            "fusion": self.fused_features(features),
        }
        results = [score_bank(queries[name], self.banks[name], self.score_cfg) for name in BANKS]
        bank_image = np.array([r.image_score for r in results], dtype=np.float32)
        bank_maps = np.stack([r.map_hw for r in results]).astype(np.float32, copy=False)
        return bank_image, bank_maps

    def combine(self, bank_image: np.ndarray, bank_maps: np.ndarray) -> FrameScores:
        """Five variants from per-bank scores: singles pass through, combinations go through DLF."""
        if self.dlf is None:
            raise ConfigError("this FrameScorer has no DLF models; it can only compute bank_scores")
        image = {name: float(bank_image[i]) for i, name in enumerate(BANKS)}
        maps = {name: bank_maps[i] for i, name in enumerate(BANKS)}
        dlf_image, dlf_maps = prepare_dlf_inputs(
            bank_image, bank_maps, self.normaliser, self.score_cfg.rgb_lambda
        )
        height, width = bank_maps.shape[1:]
        pixels_pb = dlf_maps.reshape(len(BANKS), -1).T  # (H·W, 3), row-major pixel order
        for variant, cols in COMBINATIONS.items():
            image_svm, pixel_svm = self.dlf[variant]
            image[variant] = float(image_svm.score_samples(dlf_image[None, list(cols)])[0])
            pixel_scores = pixel_svm.score_samples(pixels_pb[:, list(cols)])
            maps[variant] = pixel_scores.reshape(height, width).astype(np.float32)
        return FrameScores(bank_image=bank_image, bank_maps=bank_maps, image=image, maps=maps)

    def score(self, features: PatchFeatures) -> FrameScores:
        """Score one frame's PatchFeatures: the five variants' image scores and (S, S) maps."""
        return self.combine(*self.bank_scores(features))
