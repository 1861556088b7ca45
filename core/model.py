"""The one scoring path: PatchFeatures -> per-bank scores -> the five variants' image scores and maps.

Both the trainer's evaluation and the station call `FrameScorer.score`. UFF runs through a `Runner`
("uff"), kNN scoring through `core.scoring`, decision-layer fusion through `core.fusion`. numpy only.

UFF is per patch and per modality (fused = concat(point_mlp(point), rgb_mlp(rgb)), no cross-patch or
cross-modal operation, trainer/models/uff.py), so the scorer runs it only on what differs: the point branch
on foreground patches (a background patch's point feature is exactly zero and maps to the constant
`uff_zero_point`, computed once at construction) and the rgb branch once per rgb token (the 2x-upsampled
fusion grid repeats each token 4 times). Both halves go through one call of the exported graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.config import ScoreConfig
from core.errors import ConfigError, ShapeError
from core.fusion import LinearOneClassSVM, ScoreNormaliser
from core.runner import Runner
from core.scan import PatchFeatures
from core.scoring import KnownPrefix, KnownRows, MemoryBank, score_bank

__all__ = [
    "BANKS",
    "COMBINATIONS",
    "RGB_ONLY_VARIANTS",
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
# An RGB-only model (a class without xyz files) has the rgb bank alone and scores this one variant.
RGB_ONLY_VARIANTS = ("rgb",)


@dataclass(frozen=True, eq=False)
class FrameScores:
    """Scores of one frame.

    bank_image: (B,) float32 raw image scores of `bank_names` (B = 3: rgb, point, fusion; 1 for RGB-only);
    bank_maps: (B, S, S) float32. image: variant -> image anomaly score; maps: variant -> (S, S) float32 map.
    """

    bank_image: np.ndarray
    bank_maps: np.ndarray
    image: dict[str, float]
    maps: dict[str, np.ndarray]
    bank_names: tuple[str, ...] = BANKS


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


def _token_of_patch(grid: int, factor: int) -> np.ndarray:
    """(grid²,) int64: index of the rgb token (on the grid/factor grid) under each fusion patch."""
    rows = np.arange(grid) // factor
    return (rows[:, None] * (grid // factor) + rows[None, :]).reshape(-1)


def _fixed_patch_count(uff: Runner | None) -> int | None:
    """The patch axis length of a UFF graph exported with a fixed one (older bundles), else None."""
    shapes = getattr(uff, "input_shapes", None)
    if not shapes or "point_feats" not in shapes:
        return None
    patches = shapes["point_feats"][1]
    return int(patches) if isinstance(patches, int) else None


class FrameScorer:
    """Scores PatchFeatures against the rgb/point/fusion banks and fuses them into the five variants."""

    def __init__(
        self,
        banks: dict[str, MemoryBank],
        dlf: dict[str, tuple[LinearOneClassSVM, LinearOneClassSVM]] | None,
        normaliser: ScoreNormaliser | None,
        uff: Runner | None,
        score_cfg: ScoreConfig,
        skip_background: bool = True,
    ) -> None:
        """dlf=None gives a scorer that only computes bank_scores (the trainer before DLF fitting).

        skip_background=False runs UFF and every bank's search on all patches (the reference path).
        banks = {"rgb"} alone is an RGB-only model: no UFF, no DLF, no normaliser, one variant ("rgb").
        """
        self.rgb_only = set(banks) == {"rgb"}
        if self.rgb_only:
            if uff is not None or dlf or normaliser is not None:
                raise ConfigError("an RGB-only FrameScorer (rgb bank alone) takes no UFF, DLF or normaliser")
            self.bank_names: tuple[str, ...] = RGB_ONLY_VARIANTS
            self.variants: tuple[str, ...] = RGB_ONLY_VARIANTS
            self.banks = {"rgb": banks["rgb"]}
            self.dlf = {}
            self.normaliser, self.uff, self.score_cfg = None, None, score_cfg
            self.skip_background = skip_background
            return
        self.bank_names, self.variants = BANKS, VARIANTS
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
        self.skip_background = skip_background
        self._fixed_patches = _fixed_patch_count(uff)
        point_dim = self.banks["point"].dim
        # The point half of a background patch's fused feature: UFF of a zero point feature (once, here).
        self.uff_zero_point = (
            np.zeros(point_dim, np.float32) if uff is None else self._uff_point_of_zero(point_dim)
        )
        self._fusion_prefix: KnownPrefix | None = None

    def _uff_point_of_zero(self, point_dim: int) -> np.ndarray:
        rgb_dim = self.banks["rgb"].dim
        rows = self._fixed_patches or 1
        out = self._run_uff(np.zeros((rows, point_dim), np.float32), np.zeros((rows, rgb_dim), np.float32))
        return np.ascontiguousarray(out[0, :point_dim])

    def _run_uff(self, point_lc: np.ndarray, rgb_lc: np.ndarray) -> np.ndarray:
        """UFF on (L, Cp) and (L, Cr) rows (zero-padded to a fixed patch count if the graph has one)."""
        rows = point_lc.shape[0]
        if self._fixed_patches is not None and rows < self._fixed_patches:
            pad = self._fixed_patches - rows
            point_lc = np.concatenate([point_lc, np.zeros((pad, point_lc.shape[1]), np.float32)])
            rgb_lc = np.concatenate([rgb_lc, np.zeros((pad, rgb_lc.shape[1]), np.float32)])
        out_dim = point_lc.shape[1] + rgb_lc.shape[1]
        outputs = self.uff.run(
            {"point_feats": point_lc[None], "rgb_feats": np.ascontiguousarray(rgb_lc[None])}
        )
        fused = np.asarray(outputs["fused"], dtype=np.float32)
        if fused.shape != (1, point_lc.shape[0], out_dim):
            raise ShapeError(
                f"uff runner returned {fused.shape}, expected (1, {point_lc.shape[0]}, {out_dim})"
            )
        return fused[0, :rows]

    def fusion_prefix(self) -> KnownPrefix:
        """The fusion bank's search state for the constant point half of background patches (cached)."""
        if self._fusion_prefix is None:
            self._fusion_prefix = self.banks["fusion"].known_prefix(self.uff_zero_point)
        return self._fusion_prefix

    def fused_features(self, features: PatchFeatures) -> np.ndarray:
        """(g, g, Cp+Cr) float32 fusion-bank features: UFF(point, 2x-duplicated rgb), or their concatenation.

        Without a UFF runner the fused feature is concat(point, rgb), M3DM's dead-code branch (spec §7).
        """
        return self._fused_and_background(features)[0]

    def _fused_and_background(self, features: PatchFeatures) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fused (g, g, C) features, background row indices (K,) and their rgb token ids (K,)."""
        point = np.asarray(features.point_hwc, dtype=np.float32)
        rgb = np.asarray(features.rgb_hwc, dtype=np.float32)
        grid = point.shape[0]
        if point.ndim != 3 or rgb.ndim != 3 or point.shape[1] != grid or grid % rgb.shape[0]:
            raise ShapeError(f"point {point.shape} / rgb {rgb.shape} grids are not aligned")
        factor = grid // rgb.shape[0]
        token_n = _token_of_patch(grid, factor)
        point_nc = point.reshape(grid * grid, point.shape[-1])
        background = np.flatnonzero(~point_nc.any(axis=1))
        if self.uff is None:
            rgb_up = upsample_nearest(rgb, factor)
            return np.concatenate([point, rgb_up], axis=-1), background, token_n[background]
        if not self.skip_background:
            rgb_up = upsample_nearest(rgb, factor).reshape(grid * grid, rgb.shape[-1])
            return self._run_uff(point_nc, rgb_up).reshape(grid, grid, -1), background, token_n[background]
        tokens_tc = rgb.reshape(-1, rgb.shape[-1])
        foreground = np.flatnonzero(point_nc.any(axis=1))
        rows = max(foreground.size, tokens_tc.shape[0])
        # Row j of one call carries foreground patch j's point feature and rgb token j: the two halves
        # of the output are independent, so each is read back for its own rows.
        point_in = np.zeros((rows, point_nc.shape[1]), np.float32)
        point_in[: foreground.size] = point_nc[foreground]
        rgb_in = np.zeros((rows, tokens_tc.shape[1]), np.float32)
        rgb_in[: tokens_tc.shape[0]] = tokens_tc
        out = self._run_uff(point_in, rgb_in)
        cp = point_nc.shape[1]
        fused = np.empty((grid * grid, out.shape[1]), np.float32)
        fused[:, :cp] = self.uff_zero_point
        fused[foreground, :cp] = out[: foreground.size, :cp]
        fused[:, cp:] = out[token_n, cp:]
        return fused.reshape(grid, grid, -1), background, token_n[background]

    def bank_scores(self, features: PatchFeatures) -> tuple[np.ndarray, np.ndarray]:
        """Raw per-bank scores of `bank_names`: bank_image (B,) float32, bank_maps (B, S, S) float32.

        B = 3 ([rgb, point, fusion]); an RGB-only scorer reads only the rgb grid and gives B = 1.
        """
        if self.rgb_only:
            rgb = np.asarray(features.rgb_hwc, dtype=np.float32)
            result = score_bank(rgb, self.banks["rgb"], self.score_cfg, None, self.skip_background)
            return np.array([result.image_score], np.float32), result.map_hw[None].astype(np.float32)
        fused, background, tokens = self._fused_and_background(features)
        fusion_known = None
        if self.skip_background and background.size:
            fusion_known = KnownRows(background, self.fusion_prefix(), tokens)
        queries = {
            "rgb": (np.asarray(features.rgb_hwc, dtype=np.float32), None),
            "point": (np.asarray(features.point_hwc, dtype=np.float32), None),
            "fusion": (fused, fusion_known),
        }
        results = [
            score_bank(q, self.banks[name], self.score_cfg, known, self.skip_background)
            for name, (q, known) in queries.items()
        ]
        bank_image = np.array([r.image_score for r in results], dtype=np.float32)
        bank_maps = np.stack([r.map_hw for r in results]).astype(np.float32, copy=False)
        return bank_image, bank_maps

    def combine(self, bank_image: np.ndarray, bank_maps: np.ndarray) -> FrameScores:
        """Five variants (RGB-only: one) from bank scores: singles pass through, combinations via DLF."""
        if self.dlf is None:
            raise ConfigError("this FrameScorer has no DLF models; it can only compute bank_scores")
        image = {name: float(bank_image[i]) for i, name in enumerate(self.bank_names)}
        maps = {name: bank_maps[i] for i, name in enumerate(self.bank_names)}
        if self.rgb_only:
            return FrameScores(bank_image, bank_maps, image, maps, self.bank_names)
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
