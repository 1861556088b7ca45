"""`m3dm demo`: the main job on an embedded default, end to end on one machine, no weights, no downloads.

generate scans -> train m3dm-free for every class -> five-variant evaluation -> ONNX export -> signing keys ->
one signed bundle per class, verified, and re-scored through the station path.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markdown import Markdown

log = logging.getLogger("m3dm.demo")


def run_demo(out: Path, seed: int = 0, size: int = 400) -> dict[str, Any]:
    from trainer.bundle_build import build_model_bundle, verify_model_bundle
    from trainer.evaluate import evaluate_bundle, evaluate_models
    from trainer.pipeline import export_models, train_classes
    from trainer.synth import CLASS_NAMES, SynthConfig, synthesize, write_preview

    console = Console(stderr=True)
    timings: dict[str, float] = {}
    data, models, keys, bundles = out / "data", out / "models", out / "keys", out / "bundles"

    t0 = time.perf_counter()
    if not (data / "synth_summary.json").is_file():
        from trainer.progress import progress_callback

        cfg = SynthConfig(seed=seed, classes=tuple(CLASS_NAMES), width_px=size, height_px=size)
        with progress_callback("generating scans") as progress:
            summary = synthesize(data, cfg, progress=progress, overwrite=True)
        (data / "synth_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        write_preview(data, out / "preview.png")
    timings["synth_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train_classes(data, models, [], True, "m3dm-free", None, False, seed)
    timings["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results = evaluate_models(data, models, models / "report", None)
    timings["eval_s"] = time.perf_counter() - t0
    console.print(Markdown(results["markdown"]))

    t0 = time.perf_counter()
    export_models(models, None, engine=False)
    from trainer.bundle import keygen

    if not (keys / "bundle_signing.key").is_file():
        keygen(keys)
    built = {}
    for class_dir in sorted(p.parent for p in models.glob("*/model.json")):
        # The demo owns its folder: a re-run replaces its earlier bundles (the CLI never overwrites one).
        shutil.rmtree(bundles / class_dir.name, ignore_errors=True)
        (bundles / f"{class_dir.name}.tar").unlink(missing_ok=True)
        built[class_dir.name] = build_model_bundle(
            class_dir, keys, bundles / class_dir.name, "1.0.0", 1, 365, None, None, data
        )
        report = verify_model_bundle(bundles / class_dir.name, keys, None)
        if not report["ok"]:
            raise RuntimeError(f"fresh bundle failed verification: {report}")
    timings["bundle_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    first = next(iter(built))
    station = evaluate_bundle(data, bundles / first, keys, out / "station-report")
    timings["station_eval_s"] = time.perf_counter() - t0

    summary = {
        "out": str(out),
        "mean": results["mean"],
        "bundles": {k: v["path"] for k, v in built.items()},
        "station_check": {"class": first, "mean": station["mean"]},
        "timings_s": timings,
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    console.print(
        f"[bold green]demo done[/] in {sum(timings.values()):.0f} s: "
        f"report {models / 'report'}, bundles {bundles}"
    )
    return summary
