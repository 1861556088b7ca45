"""The naive reference every speed figure is a ratio against: the method as written, nothing skipped.

torch eager fp32 backbones, UFF on all 3136 patches, brute-force exact kNN (BLAS) over the uncompressed
fp32 banks, no background skip, no stage overlap. It runs the same core code as the product
(`core.features`, `core.model.FrameScorer(skip_background=False)`), so the two differ only in what the
product skips or approximates. Used by bench/speed.py; not a test.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from core.config import ScoreConfig
from core.features import FeatureRunners, point_features, rgb_features
from core.model import BANKS, FrameScorer
from core.scan import PatchFeatures, PreparedScan
from core.scoring import MemoryBank, score_bank

__all__ = ["NaiveReference", "timed"]


def timed(store: dict[str, float], name: str, fn: Callable[[], object]) -> object:
    """Run fn, add its wall time in ms to store[name]."""
    t0 = time.perf_counter()
    out = fn()
    store[name] = store.get(name, 0.0) + 1000 * (time.perf_counter() - t0)
    return out


class NaiveReference:
    """Scores prepared scans the naive way; `score` returns per-bank image scores, maps and stage ms."""

    def __init__(self, preset, runners: FeatureRunners, banks: dict[str, MemoryBank], uff) -> None:  # noqa: ANN001
        exact = {n: MemoryBank(n, b.feats_mc, b.grid, b.feat_mean_c, b.feat_scale) for n, b in banks.items()}
        self.preset, self.runners = preset, runners
        self.scorer = FrameScorer(exact, None, None, uff, ScoreConfig(), skip_background=False)

    def score(self, scan: PreparedScan) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        ms: dict[str, float] = {}
        rgb = timed(ms, "rgb features", lambda: rgb_features(scan, self.preset, self.runners.rgb))
        point = timed(ms, "point features", lambda: point_features(scan, self.preset, self.runners.point))
        feats = PatchFeatures(rgb_hwc=rgb, point_hwc=point)
        fused = timed(ms, "UFF", lambda: self.scorer.fused_features(feats))
        queries = {"rgb": rgb, "point": point, "fusion": fused}
        results = [
            timed(
                ms,
                f"kNN+map {n}",
                lambda n=n: score_bank(
                    queries[n], self.scorer.banks[n], ScoreConfig(), skip_background=False
                ),
            )
            for n in BANKS
        ]
        self.last_patch_dist = np.stack([r.patch_dist_hw for r in results[1:]])  # point, fusion (56, 56)
        image = np.array([r.image_score for r in results], np.float32)
        return image, np.stack([r.map_hw for r in results]), ms
