"""Per-frame time of each pipeline stage, for the m3dm-random (official sizes) and m3dm-free presets.

Usage: python bench/stage_timings.py --data DATA [--class C] [--frames 5] [--preset m3dm-free m3dm-random]
Prints a Markdown table (median ms over the frames) and the machine it ran on. Not a test: run it on a quiet
machine. Torch runs the networks here (eager, CPU); ONNX Runtime times are reported by bench/ort_timings.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from core.config import PreprocessConfig, ScoreConfig, get_preset
from core.grouping import group_points
from core.mvtec3d import list_samples, load_scan
from core.pfa import align_point_features
from core.preprocess import prepare_scan
from core.scan import PatchFeatures
from core.scoring import MemoryBank, score_bank


def timed(store: dict[str, list[float]], name: str, fn: Callable[[], object]) -> object:
    t0 = time.perf_counter()
    out = fn()
    store[name].append(1000 * (time.perf_counter() - t0))
    return out


def random_bank(name: str, rows: int, dim: int, grid: int, seed: int) -> MemoryBank:
    rng = np.random.default_rng(seed)
    return MemoryBank(
        name, rng.standard_normal((rows, dim), dtype=np.float32), grid, np.zeros(dim, np.float32), 1.0
    )


def bench_free(refs: list, store: dict[str, list[float]]) -> None:
    from core.free_features import point_descriptor, rgb_descriptor

    preset = get_preset("m3dm-free")
    banks = {
        "rgb": random_bank("rgb", 3136, preset.rgb_dim, 28, 0),
        "point": random_bank("point", 12544, preset.point_dim, 56, 1),
        "fusion": random_bank("fusion", 12544, preset.fusion_dim, 56, 2),
    }
    for ref in refs:
        raw = timed(store, "read png+tiff", lambda ref=ref: load_scan(ref))
        scan = timed(
            store, "preprocess (plane, pad, resize)", lambda raw=raw: prepare_scan(raw, PreprocessConfig())
        )
        rgb = timed(store, "rgb descriptor", lambda scan=scan: rgb_descriptor(scan))
        point = timed(store, "point descriptor + projection", lambda scan=scan: point_descriptor(scan))
        feats = PatchFeatures(rgb, point)
        fused = np.concatenate([feats.point_hwc, np.repeat(np.repeat(feats.rgb_hwc, 2, 0), 2, 1)], -1)
        for name, q in (("rgb", feats.rgb_hwc), ("point", feats.point_hwc), ("fusion", fused)):
            timed(
                store,
                f"kNN+map {name} bank",
                lambda q=q, name=name: score_bank(q, banks[name], ScoreConfig()),
            )


def bench_random(refs: list, store: dict[str, list[float]]) -> None:
    import torch

    from trainer.backbones import WeightPaths, build_feature_runners

    preset = get_preset("m3dm-random")
    runners = build_feature_runners(preset, WeightPaths())
    banks = {
        "rgb": random_bank("rgb", 3136, 768, 28, 0),
        "point": random_bank("point", 12544, 1152, 56, 1),
        "fusion": random_bank("fusion", 12544, 1920, 56, 2),
    }
    torch.set_num_threads(os.cpu_count() or 2)
    for ref in refs:
        raw = timed(store, "read png+tiff", lambda ref=ref: load_scan(ref))
        scan = timed(
            store, "preprocess (plane, pad, resize)", lambda raw=raw: prepare_scan(raw, PreprocessConfig())
        )
        tokens = timed(
            store, "DINO ViT-B/8 forward", lambda scan=scan: runners.rgb.run({"image": scan.rgb_chw[None]})
        )
        pix = np.flatnonzero(scan.valid_hw.reshape(-1))
        pts = scan.xyz_hwc_m.reshape(-1, 3)[pix]
        nb, centres = timed(
            store, "FPS + kNN grouping (1024x128)", lambda pts=pts: group_points(pts, 1024, 128)
        )
        out = timed(
            store,
            "Point-MAE forward",
            lambda nb=nb, c=centres: runners.point.run({"neighborhood": nb[None], "centers": c[None]}),
        )
        point = timed(
            store,
            "PFA interpolation + projection",
            lambda p=pts, i=pix, c=centres, o=out: align_point_features(
                p, i, c, o["group_features"][0], 224, 56
            ),
        )
        rgb = tokens["tokens"][0].reshape(28, 28, -1)
        fused = np.concatenate([point, np.repeat(np.repeat(rgb, 2, 0), 2, 1)], -1)
        for name, q in (("rgb", rgb), ("point", point), ("fusion", fused)):
            timed(
                store,
                f"kNN+map {name} bank",
                lambda q=q, name=name: score_bank(q, banks[name], ScoreConfig()),
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--class", dest="class_name", default=None)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--preset", nargs="+", default=["m3dm-free", "m3dm-random"])
    args = parser.parse_args()
    from core.mvtec3d import discover_classes

    cls = args.class_name or discover_classes(args.data)[0]
    refs = list_samples(args.data, cls, "test")[: args.frames]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; class {cls}; "
        f"{len(refs)} frames; input {load_scan(refs[0]).rgb_hwc_u8.shape[:2]}"
    )
    for preset in args.preset:
        store: dict[str, list[float]] = defaultdict(list)
        (bench_free if preset == "m3dm-free" else bench_random)(refs, store)
        print(f"\n### {preset}\n\n| stage | median ms/frame |\n|---|---:|")
        total = 0.0
        for name, values in store.items():
            med = float(np.median(values[1:] if len(values) > 2 else values))
            total += med
            print(f"| {name} | {med:.0f} |")
        print(f"| **total** | **{total:.0f}** |")


if __name__ == "__main__":
    main()
