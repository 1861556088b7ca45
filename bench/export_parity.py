"""Export the official-size networks (random weights) to ONNX and check parity and ORT speed against torch.

Usage: python bench/export_parity.py [--out DIR]. Prints a Markdown table: export seconds, max abs / rel
error on random and real-looking inputs, and per-call ms for torch eager and ONNX Runtime (CPU).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core.config import get_preset
from edge.runners import OrtRunner
from trainer.backbones import WeightPaths, point_module_for_export, rgb_module_for_export
from trainer.export import check_parity, export_onnx
from trainer.models.uff import FeatureFusionBlock, UFFExport
from trainer.torch_runner import TorchRunner


def median_ms(fn, repeats: int = 3) -> float:  # noqa: ANN001 - any callable
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="m3dm-export-")))
    args = parser.parse_args()
    preset, weights = get_preset("m3dm-random"), WeightPaths()
    rng = np.random.default_rng(0)
    centers = rng.uniform(-0.05, 0.05, (1, 1024, 3)).astype(np.float32) + np.float32([0, 0, 0.4])
    jobs = {
        "rgb (DINO ViT-B/8 @224)": (
            rgb_module_for_export(preset, weights),
            {"image": rng.standard_normal((1, 3, 224, 224), np.float32)},
            ["tokens"],
        ),
        "point (Point-MAE 1024x128)": (
            point_module_for_export(preset, weights),
            {"neighborhood": rng.normal(0, 0.002, (1, 1024, 128, 3)).astype(np.float32), "centers": centers},
            ["group_features"],
        ),
        "uff (1152/768, 3136 patches)": (
            UFFExport(FeatureFusionBlock(1152, 768).eval()),
            {
                "point_feats": rng.standard_normal((1, 3136, 1152), np.float32),
                "rgb_feats": rng.standard_normal((1, 3136, 768), np.float32),
            },
            ["fused"],
        ),
    }
    print(f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)\n")
    print(
        "| network | export s | max abs err | max rel err | torch ms | ORT CPU ms |\n"
        "|---|---:|---:|---:|---:|---:|"
    )
    for name, (module, inputs, outputs) in jobs.items():
        path = args.out / f"{name.split()[0]}.onnx"
        t0 = time.perf_counter()
        export_onnx(module, {k: torch.from_numpy(v) for k, v in inputs.items()}, outputs, path)
        export_s = time.perf_counter() - t0
        report = check_parity(module, path, inputs)
        torch_ms = median_ms(lambda m=module, i=inputs, o=outputs: TorchRunner(m, list(i), o).run(i))
        ort = OrtRunner(path)
        ort_ms = median_ms(lambda r=ort, i=inputs: r.run(i))
        print(
            f"| {name} | {export_s:.1f} | {report.max_abs_err:.2e} | {report.max_rel_err:.2e} "
            f"| {torch_ms:.0f} | {ort_ms:.0f} |"
        )


if __name__ == "__main__":
    main()
