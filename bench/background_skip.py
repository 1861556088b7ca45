"""What the exact background skip saves, by foreground fill, at official dims (UFF + three banks' kNN).

Usage: python bench/background_skip.py [--rows 20000] [--fills 0.07 0.12 0.18 0.3 0.45 0.6] [--reps 3]

Frames have a round foreground blob covering `fill` of the 56x56 grid (point features zero outside, as
prepare_scan + PFA give them); rgb tokens are dense. Banks are random rows, searched EXACTLY (BLAS), so the
figure isolates the skip. UFF is a random official-size block run by ONNX Runtime with a dynamic patch axis.
Prints median ms of "UFF + kNN + maps" with the skip and without it (the full computation).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def frame(rng: np.random.Generator, fill: float):  # noqa: ANN201
    from core.scan import PatchFeatures

    yy, xx = np.mgrid[:56, :56]
    fg = (yy - 28) ** 2 + (xx - 27) ** 2 <= fill * 56 * 56 / np.pi
    point = rng.normal(size=(56, 56, 1152)).astype(np.float32) * fg[..., None]
    return PatchFeatures(rgb_hwc=rng.normal(size=(28, 28, 768)).astype(np.float32), point_hwc=point)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--fills", type=float, nargs="+", default=[0.07, 0.12, 0.18, 0.3, 0.45, 0.6])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from core.config import ScoreConfig
    from core.model import FrameScorer
    from core.scoring import MemoryBank
    from edge.runners import OrtRunner
    from trainer.export import export_onnx
    from trainer.models.uff import FeatureFusionBlock, UFFExport

    torch.manual_seed(0)
    module = UFFExport(FeatureFusionBlock(1152, 768)).eval()
    path = Path(tempfile.mkdtemp()) / "uff.onnx"
    example = {"point_feats": torch.zeros(1, 3136, 1152), "rgb_feats": torch.zeros(1, 3136, 768)}
    export_onnx(module, example, ["fused"], path, extra_dynamic_axes={1: "patches"})
    uff = OrtRunner(path, intra_op_threads=args.threads)
    rng = np.random.default_rng(0)
    rows = {"rgb": args.rows // 4, "point": args.rows, "fusion": args.rows}
    banks = {
        n: MemoryBank(n, rng.normal(size=(rows[n], d)).astype(np.float32), g, np.zeros(d, np.float32), 1.0)
        for n, d, g in (("rgb", 768, 28), ("point", 1152, 56), ("fusion", 1920, 56))
    }
    fast = FrameScorer(banks, None, None, uff, ScoreConfig())
    full = FrameScorer(banks, None, None, uff, ScoreConfig(), skip_background=False)
    print(f"banks rgb {rows['rgb']}, point/fusion {rows['point']} rows (exact); ORT threads {args.threads}; "
          f"load average {tuple(round(x, 1) for x in os.getloadavg())}")  # fmt: skip
    print("\n| fill | full ms | skip ms | speed-up |\n|---:|---:|---:|---:|")
    for fill in args.fills:
        feats = frame(rng, fill)
        times = {"full": [], "skip": []}
        for _ in range(args.reps):
            for name, scorer in (("full", full), ("skip", fast)):
                t0 = time.perf_counter()
                scorer.bank_scores(feats)
                times[name].append(1000 * (time.perf_counter() - t0))
        a, b = np.median(times["full"]), np.median(times["skip"])
        print(
            f"| {float(feats.point_hwc.any(-1).mean()):.2f} | {a:.0f} | {b:.0f} | {a / b:.2f}x |", flush=True
        )
    print(f"\nload average after: {tuple(round(x, 1) for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
