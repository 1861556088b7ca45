"""Station frame time per preset against the naive reference, in one run on the same frames.

Usage: python bench/speed.py [--work DIR] [--threads 2] [--frames-random 4] [--presets m3dm-free m3dm-random]
       [--repeats-free 3] [--repeats-random 1]

For each preset it prints one Markdown table: per-stage ms (median over frames), frame ms, fps, peak RSS,
quality deltas against the naive reference, and the speed ratio to it. The station side runs in a child
process that imports no torch (ONNX Runtime, numpy, faiss), like a station; the naive reference
(bench/naive_reference.py: torch eager fp32, exact kNN over the uncompressed banks, nothing skipped) runs in
this process on the same frames.

Data: one generated class at 400 px (`m3dm synth` generator). m3dm-free banks are real coresets (10%) of
the training scans' features. m3dm-random banks are SYNTHESISED at the method's full coreset size for a
~200-image class (rgb 15,680, point and fusion 75,000 rows): rows drawn from real feature rows of a few
training scans plus Gaussian jitter (0.35 x per-channel std), because extracting 200 scans with random
weights here would take longer than the whole benchmark and say nothing more about speed. UFF is randomly
initialised (its weights do not change its cost). Random weights cannot show an AUROC effect of int8: the
table reports the feature error and the rank agreement instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = (
    "read",
    "preprocess",
    "rgb features",
    "point features",
    "UFF",
    "kNN+map rgb",
    "kNN+map point",
    "kNN+map fusion",
)
RANDOM_BANK_ROWS = {"rgb": 15680, "point": 75000, "fusion": 75000}  # 10% of 200 images x 784 / 3136


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------ station


def station_child(work: Path, threads: int, precision: str) -> None:  # noqa: PLR0915
    """Load what a station loads (ONNX graphs, banks, faiss indexes) and time each stage per frame."""
    import faiss

    from bench.naive_reference import timed
    from core.ann import load_index
    from core.config import PreprocessConfig, ScoreConfig, get_preset
    from core.features import FeatureRunners, point_features, rgb_features
    from core.model import BANKS, FrameScorer
    from core.mvtec3d import load_scan
    from core.scan import PatchFeatures
    from core.scoring import MemoryBank, score_bank
    from edge.memory import tune_malloc
    from edge.runners import OrtRunner

    tune_malloc()  # the allocator settings `m3dm edge run` applies, before anything is allocated
    faiss.omp_set_num_threads(threads)
    meta = json.loads((work / "station.json").read_text())
    preset = get_preset(meta["preset"])
    nets = meta["networks"][precision]
    runner = {n: OrtRunner(work / p, intra_op_threads=threads) for n, p in nets.items()}
    banks = {}
    for name in BANKS:
        with np.load(work / f"bank_{name}.npz", allow_pickle=False) as z:
            feats, mean, scale = z["feats"], z["mean"], z["scale"]
        spec = meta["index"].get(name)
        index = (
            None
            if spec is None
            else load_index(work / spec["file"], spec["kind"], spec["params"], *feats.shape)
        )
        banks[name] = MemoryBank(
            name, feats, int(meta["grids"][name]), mean, scale if scale.ndim else float(scale), index
        )
    scorer = FrameScorer(banks, None, None, runner["uff"], ScoreConfig())
    runners = FeatureRunners(rgb=runner.get("rgb"), point=runner.get("point"))
    pre = PreprocessConfig(rgb_input_size=preset.rgb_input_size)
    from core.mvtec3d import SampleRef  # noqa: F401 - refs are re-created from paths below
    from core.preprocess import prepare_scan

    refs = json.loads((work / "frames.json").read_text())
    out = {"ms": [], "image": [], "maps": [], "rgb": [], "point": [], "dist": []}

    def frame(ref: dict) -> None:
        from core.mvtec3d import list_samples

        ms: dict[str, float] = {}
        sample = next(
            r for r in list_samples(Path(ref["root"]), ref["cls"], "test") if str(r.rgb_path) == ref["rgb"]
        )
        raw = timed(ms, "read", lambda: load_scan(sample))
        scan = timed(ms, "preprocess", lambda: prepare_scan(raw, pre))
        rgb = timed(ms, "rgb features", lambda: rgb_features(scan, preset, runners.rgb))
        point = timed(ms, "point features", lambda: point_features(scan, preset, runners.point))
        feats = PatchFeatures(rgb_hwc=rgb, point_hwc=point)
        fused, background, tokens = timed(ms, "UFF", lambda: scorer._fused_and_background(feats))
        from core.scoring import KnownRows

        known = {"fusion": KnownRows(background, scorer.fusion_prefix(), tokens) if background.size else None}
        queries = {"rgb": rgb, "point": point, "fusion": fused}
        res = [
            timed(
                ms, f"kNN+map {n}", lambda n=n: score_bank(queries[n], banks[n], ScoreConfig(), known.get(n))
            )
            for n in BANKS
        ]
        out["ms"].append(ms)
        out["image"].append([r.image_score for r in res])
        out["maps"].append(np.stack([r.map_hw for r in res]))
        out["dist"].append(np.stack([r.patch_dist_hw for r in res[1:]]))
        out["rgb"].append(rgb)
        out["point"].append(point)

    frame(refs[0])  # warm-up (allocations, ORT first-run), not timed
    for key in out:
        out[key].clear()
    for ref in refs:
        frame(ref)
    # Further timed passes over the same frames (meta "repeats"): the stage medians come from every pass,
    # the scores and maps from the first (they are identical), so one noisy moment moves the median less.
    for _ in range(int(meta.get("repeats", 1)) - 1):
        for ref in refs:
            frame(ref)
    for key in out.keys() - {"ms"}:
        del out[key][len(refs) :]
    np.savez(
        work / f"station_{precision}.npz",
        image=np.array(out["image"]),
        maps=np.stack(out["maps"]),
        rgb=np.stack(out["rgb"]),
        point=np.stack(out["point"]),
        dist=np.stack(out["dist"]),
    )
    (work / f"station_{precision}.json").write_text(
        json.dumps({"ms": out["ms"], "frames": len(refs), "peak_rss_mb": peak_rss_mb()})
    )


def run_station(work: Path, threads: int, precision: str) -> dict:
    # PASSIVE: OpenMP workers (faiss, BLAS) sleep instead of spinning, which matters on a shared CPU.
    env = dict(
        os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE"
    )
    cmd = [
        sys.executable,
        __file__,
        "--station-child",
        str(work),
        "--threads",
        str(threads),
        "--precision",
        precision,
    ]
    subprocess.run(cmd, check=True, env=env)
    stats = json.loads((work / f"station_{precision}.json").read_text())
    with np.load(work / f"station_{precision}.npz", allow_pickle=False) as z:
        stats.update({k: z[k] for k in z.files})
    return stats


# ------------------------------------------------------------------------------------------- setup


def synth_data(work: Path) -> tuple[Path, str]:
    from trainer.synth import CLASS_NAMES, SynthConfig, synthesize

    root = work / "data"
    cls = CLASS_NAMES[0]
    if not (root / cls).is_dir():
        synthesize(
            root,
            SynthConfig(
                seed=3,
                classes=(cls,),
                n_train=10,
                n_validation=2,
                n_test_good=3,
                n_test_per_defect=1,
                workers=1,
            ),
        )
    return root, cls


def export(module, inputs: dict, outputs: list[str], path: Path, dynamic: dict | None = None) -> Path:  # noqa: ANN001
    import torch

    from trainer.export import export_onnx

    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    return export_onnx(module, tensors, outputs, path, extra_dynamic_axes=dynamic)


def quantise_int8(src: Path, dst: Path) -> Path:
    """What `bundle build --precision int8` ships: ONNX Runtime dynamic int8 of MatMul/Gemm."""
    from trainer.export import quantize_int8

    return quantize_int8(src, dst)


def uff_module(point_dim: int, rgb_dim: int):  # noqa: ANN201
    import torch

    from trainer.models.uff import FeatureFusionBlock, UFFExport

    torch.manual_seed(0)
    return UFFExport(FeatureFusionBlock(point_dim, rgb_dim)).eval()


def save_bank(work: Path, bank) -> None:  # noqa: ANN001
    np.savez(
        work / f"bank_{bank.name}.npz",
        feats=bank.feats_mc,
        mean=bank.feat_mean_c,
        scale=np.asarray(bank.feat_scale),
    )


def setup_free(work: Path, root: Path, cls: str) -> dict:
    """Real 10% coresets of the training scans' descriptors; UFF random, ONNX with a dynamic patch axis."""
    from core.config import CoresetConfig, PreprocessConfig, ScoreConfig, get_preset
    from core.features import FeatureRunners, extract_features
    from core.model import FrameScorer
    from core.mvtec3d import list_samples, load_scan
    from core.preprocess import prepare_scan
    from trainer.coreset import build_memory_bank
    from trainer.torch_runner import TorchRunner

    preset = get_preset("m3dm-free")
    feats = [
        extract_features(prepare_scan(load_scan(r), PreprocessConfig()), preset, FeatureRunners())
        for r in list_samples(root, cls, "train")
    ]
    module = uff_module(preset.point_dim, preset.rgb_dim)
    uff = TorchRunner(module, ["point_feats", "rgb_feats"], ["fused"])
    cfg = CoresetConfig()
    banks = {
        "rgb": build_memory_bank("rgb", np.stack([f.rgb_hwc for f in feats]), 28, 0.1, cfg, per_dim=True),
        "point": build_memory_bank(
            "point", np.stack([f.point_hwc for f in feats]), 56, 0.1, cfg, per_dim=True
        ),
    }
    plain = FrameScorer({**banks, "fusion": banks["point"]}, None, None, uff, ScoreConfig())
    fused = np.stack([plain.fused_features(f) for f in feats])
    banks["fusion"] = build_memory_bank("fusion", fused, 56, 0.1, cfg, per_dim=True)
    example = {
        "point_feats": np.zeros((1, 3136, preset.point_dim), np.float32),
        "rgb_feats": np.zeros((1, 3136, preset.rgb_dim), np.float32),
    }
    export(module, example, ["fused"], work / "uff.onnx", {1: "patches"})
    for bank in banks.values():
        save_bank(work, bank)
    meta = {
        "preset": preset.name,
        "networks": {"fp32": {"uff": "uff.onnx"}},
        "index": {},
        "grids": {n: b.grid for n, b in banks.items()},
    }
    return {
        "meta": meta,
        "banks": banks,
        "preset": preset,
        "runners": FeatureRunners(),
        "uff": uff,
        "notes": f"banks: real 10% coresets of {len(feats)} training scans "
        + ", ".join(f"{n} {b.feats_mc.shape[0]}x{b.dim}" for n, b in banks.items()),
    }


def _synth_rows(rng: np.random.Generator, base_nc: np.ndarray, rows: int) -> np.ndarray:
    std_c = base_nc.std(axis=0) + 1e-6
    pick = rng.integers(0, base_nc.shape[0], rows)
    return (
        base_nc[pick] + rng.normal(size=(rows, base_nc.shape[1])).astype(np.float32) * (0.35 * std_c)
    ).astype(np.float32)


def setup_random(work: Path, root: Path, cls: str, ann_recall: float) -> dict:  # noqa: PLR0915
    """Official-size networks (random weights), fp32 and int8 graphs, full-size synthesised banks + IVF."""
    from core.config import PreprocessConfig, ScoreConfig, get_preset
    from core.features import FeatureRunners, extract_features
    from core.model import FrameScorer
    from core.mvtec3d import list_samples, load_scan
    from core.preprocess import prepare_scan
    from core.scoring import MemoryBank, normalise_features
    from edge.runners import OrtRunner
    from trainer.ann import AnnConfig, choose_index
    from trainer.backbones import WeightPaths, point_module_for_export, rgb_module_for_export
    from trainer.coreset import feature_stats
    from trainer.torch_runner import TorchRunner

    preset = get_preset("m3dm-random")
    if (work / "station.json").is_file() and (
        work / "notes.txt"
    ).is_file():  # seeded random init: same weights
        return reuse_random(work, preset)
    from trainer.point_export import pointwise_point_module

    rgb_mod, point_mod = (
        rgb_module_for_export(preset, WeightPaths()),
        point_module_for_export(preset, WeightPaths()),
    )
    point_graph_mod = pointwise_point_module(point_mod)  # as trainer/pipeline.py exports it
    rng = np.random.default_rng(1)
    example = {  # export fixes the non-batch shapes only; values do not matter
        "image": rng.standard_normal((1, 3, 224, 224)).astype(np.float32),
        "neighborhood": rng.normal(0, 0.002, (1, 1024, 128, 3)).astype(np.float32),
        "centers": (rng.uniform(-0.05, 0.05, (1, 1024, 3)) + [0, 0, 0.4]).astype(np.float32),
    }
    export(rgb_mod, {"image": example["image"]}, ["tokens"], work / "rgb.onnx")
    export(
        point_graph_mod,
        {"neighborhood": example["neighborhood"], "centers": example["centers"]},
        ["group_features"],
        work / "point.onnx",
    )
    quantise_int8(work / "rgb.onnx", work / "rgb.int8.onnx")
    quantise_int8(work / "point.onnx", work / "point.int8.onnx")
    module = uff_module(1152, 768)
    export(
        module,
        {
            "point_feats": np.zeros((1, 3136, 1152), np.float32),
            "rgb_feats": np.zeros((1, 3136, 768), np.float32),
        },
        ["fused"],
        work / "uff.onnx",
        {1: "patches"},
    )
    quantise_int8(work / "uff.onnx", work / "uff.int8.onnx")  # an int8 bundle quantises UFF too
    ort = FeatureRunners(rgb=OrtRunner(work / "rgb.onnx"), point=OrtRunner(work / "point.onnx"))
    uff_ort = OrtRunner(work / "uff.onnx")
    pre = PreprocessConfig(rgb_input_size=preset.rgb_input_size)
    train = [
        extract_features(prepare_scan(load_scan(r), pre), preset, ort)
        for r in list_samples(root, cls, "train")[:3]
    ]
    held = [
        extract_features(prepare_scan(load_scan(r), pre), preset, ort)
        for r in list_samples(root, cls, "validation")[:1]
    ]
    rng = np.random.default_rng(0)
    dummy = {
        n: MemoryBank(n, np.zeros((1, d), np.float32), g, np.zeros(d, np.float32), 1.0)
        for n, d, g in (("rgb", 768, 28), ("point", 1152, 56), ("fusion", 1920, 56))
    }
    plain = FrameScorer(dummy, None, None, uff_ort, ScoreConfig())
    base = {
        "rgb": np.concatenate([f.rgb_hwc.reshape(-1, 768) for f in train]),
        "point": np.concatenate([f.point_hwc.reshape(-1, 1152) for f in train]),
        "fusion": np.concatenate([plain.fused_features(f).reshape(-1, 1920) for f in train]),
    }
    held_rows = {
        "rgb": np.concatenate([f.rgb_hwc.reshape(-1, 768) for f in held]),
        "point": np.concatenate(
            [f.point_hwc.reshape(-1, 1152)[f.point_hwc.reshape(-1, 1152).any(1)] for f in held]
        ),
        "fusion": np.concatenate(
            [plain.fused_features(f).reshape(-1, 1920)[f.point_hwc.reshape(-1, 1152).any(1)] for f in held]
        ),
    }
    banks, index_meta, notes = {}, {}, []
    for name, rows in RANDOM_BANK_ROWS.items():
        mean, scale = feature_stats(base[name])
        src = base[name][base[name].any(axis=1)] if name == "point" else base[name]
        raw = _synth_rows(rng, src, rows)
        if name == "point":
            raw[0] = 0.0  # a real coreset keeps one background (zero) row
        bank = MemoryBank(
            name,
            ((raw - mean) / np.float32(scale)).astype(np.float32),
            28 if name == "rgb" else 56,
            mean,
            scale,
        )
        t0 = time.perf_counter()
        choice = choose_index(
            bank,
            normalise_features(held_rows[name], bank),
            AnnConfig(recall_target=ann_recall, lists_per_sqrt_rows=2.0, train_rows_per_list=32),
        )
        build_s = time.perf_counter() - t0
        if choice.index is not None:
            choice.index.save(work / f"{name}.faiss")
            index_meta[name] = {"file": f"{name}.faiss", "kind": choice.kind, "params": choice.params}
        notes.append(
            f"{name} {rows}x{bank.dim} {choice.reason} (recall@1 {choice.recall_at_1:.3f} on held-out normals, built {build_s:.0f} s)"  # noqa: E501
        )
        banks[name] = bank
        save_bank(work, bank)
    meta = {
        "preset": preset.name,
        "index": index_meta,
        "grids": {n: b.grid for n, b in banks.items()},
        "networks": {
            "fp32": {"rgb": "rgb.onnx", "point": "point.onnx", "uff": "uff.onnx"},
            "int8": {"rgb": "rgb.int8.onnx", "point": "point.int8.onnx", "uff": "uff.int8.onnx"},
        },
    }
    (work / "notes.txt").write_text("banks SYNTHESISED from real feature statistics; " + "; ".join(notes))
    torch_runners = FeatureRunners(
        rgb=TorchRunner(rgb_mod, ["image"], ["tokens"]),
        point=TorchRunner(point_mod, ["neighborhood", "centers"], ["group_features"]),
    )
    uff = TorchRunner(module, ["point_feats", "rgb_feats"], ["fused"])
    return {
        "meta": meta,
        "banks": banks,
        "preset": preset,
        "runners": torch_runners,
        "uff": uff,
        "notes": "banks SYNTHESISED from real feature statistics; " + "; ".join(notes),
    }


def reuse_random(work: Path, preset) -> dict:  # noqa: ANN001
    """The artifacts of an earlier run in `work` (graphs, banks, indexes); torch modules re-created (seeded)."""  # noqa: E501
    from core.features import FeatureRunners
    from core.scoring import MemoryBank
    from trainer.backbones import WeightPaths, point_module_for_export, rgb_module_for_export
    from trainer.point_export import pointwise_point_module
    from trainer.torch_runner import TorchRunner

    meta = json.loads((work / "station.json").read_text())
    rgb_mod, point_mod = (
        rgb_module_for_export(preset, WeightPaths()),
        point_module_for_export(preset, WeightPaths()),
    )
    # re-exported (same seeded weights): the point graph's form changed since older runs (chunked groups)
    rng = np.random.default_rng(1)
    export(
        pointwise_point_module(point_mod),
        {
            "neighborhood": rng.normal(0, 0.002, (1, 1024, 128, 3)).astype(np.float32),
            "centers": (rng.uniform(-0.05, 0.05, (1, 1024, 3)) + [0, 0, 0.4]).astype(np.float32),
        },
        ["group_features"],
        work / "point.onnx",
    )
    quantise_int8(work / "rgb.onnx", work / "rgb.int8.onnx")
    quantise_int8(work / "point.onnx", work / "point.int8.onnx")
    quantise_int8(work / "uff.onnx", work / "uff.int8.onnx")
    # as `m3dm bundle build --precision int8` ships them: every network int8 (older runs used fp32 UFF)
    meta["networks"]["int8"] = {"rgb": "rgb.int8.onnx", "point": "point.int8.onnx", "uff": "uff.int8.onnx"}
    banks = {}
    for name in RANDOM_BANK_ROWS:
        with np.load(work / f"bank_{name}.npz", allow_pickle=False) as z:
            scale = z["scale"]
            banks[name] = MemoryBank(
                name, z["feats"], meta["grids"][name], z["mean"], float(scale) if scale.ndim == 0 else scale
            )
    runners = FeatureRunners(
        rgb=TorchRunner(rgb_mod, ["image"], ["tokens"]),
        point=TorchRunner(point_mod, ["neighborhood", "centers"], ["group_features"]),
    )
    uff = TorchRunner(uff_module(1152, 768), ["point_feats", "rgb_feats"], ["fused"])
    return {
        "meta": meta,
        "banks": banks,
        "preset": preset,
        "runners": runners,
        "uff": uff,
        "notes": (work / "notes.txt").read_text(),
    }


# ----------------------------------------------------------------------------------------- compare


def quality(labels: np.ndarray, masks: np.ndarray, image_fb: np.ndarray, maps_fbhw: np.ndarray) -> dict:
    from trainer.metrics import aupro, image_auroc

    out = {}
    for b, name in enumerate(("rgb", "point", "fusion")):
        out[name] = (image_auroc(labels, image_fb[:, b]), aupro(masks, maps_fbhw[:, b]))
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _pass_frame_ms(station: dict) -> list[float]:
    """Median frame ms of each timed pass (the child appends passes in order, `frames` rows each)."""
    totals = [sum(r.values()) for r in station["ms"]]
    n = int(station.get("frames", len(totals))) or len(totals)
    return [float(np.median(totals[i : i + n])) for i in range(0, len(totals), n)]


def report(
    name: str, setup: dict, naive: dict, stations: dict, labels, masks, threads: int, loads: list
) -> str:  # noqa: ANN001, PLR0913
    lines = [f"### {name}", "", setup["notes"], ""]
    head = "| stage | naive ms | " + " | ".join(f"station {p} ms" for p in stations) + " |"
    lines += [head, "|---|---:|" + "---:|" * len(stations)]
    med = lambda rows, k: float(np.median([r.get(k, 0.0) for r in rows]))  # noqa: E731
    for stage in STAGES:
        lines.append(
            f"| {stage} | {med(naive['ms'], stage):.0f} | "
            + " | ".join(f"{med(s['ms'], stage):.0f}" for s in stations.values())
            + " |"
        )
    frame_naive = float(np.median([sum(r.values()) for r in naive["ms"]]))
    frames = {p: float(np.median([sum(r.values()) for r in s["ms"]])) for p, s in stations.items()}
    lines.append(
        f"| **frame** | **{frame_naive:.0f}** | " + " | ".join(f"**{v:.0f}**" for v in frames.values()) + " |"
    )
    passes = {p: _pass_frame_ms(s) for p, s in stations.items()}
    lines.append(
        f"| fps | {1000 / frame_naive:.2f} | " + " | ".join(f"{1000 / v:.2f}" for v in frames.values()) + " |"
    )
    lines.append(
        "| ratio to naive | 1.0 | " + " | ".join(f"{frame_naive / v:.2f}x" for v in frames.values()) + " |"
    )
    lines.append(
        f"| peak RSS MB | {naive['peak_rss_mb']:.0f}¹ | "
        + " | ".join(f"{s['peak_rss_mb']:.0f}" for s in stations.values())
        + " |"
    )
    if any(len(v) > 1 for v in passes.values()):
        lines.append(
            "\nstation frame ms per timed pass (median over the frames of that pass): "
            + "; ".join(f"{p} " + " / ".join(f"{v:.0f}" for v in vals) for p, vals in passes.items())
        )
    q_naive = quality(labels, masks, naive["image"], naive["maps"])
    for p, s in stations.items():
        q = quality(labels, masks, s["image"], s["maps"])
        d = {b: (q[b][0] - q_naive[b][0], q[b][1] - q_naive[b][1]) for b in q}
        rho = [spearman(s["image"][:, b], naive["image"][:, b]) for b in range(3)]
        same = np.abs(s["maps"] - naive["maps"]).max()
        fg = naive["dist_fg"]
        hit = np.abs(s["dist"] - naive["dist"]) <= 1e-4 * (1 + naive["dist"])
        recall = [float(hit[:, k][fg].mean()) for k in range(2)]
        lines.append(
            f"\nstation {p} vs naive: ΔI-AUROC / ΔAUPRO per bank "
            + ", ".join(f"{b} {v[0]:+.4f} / {v[1]:+.4f}" for b, v in d.items())
            + f"; image-score Spearman rgb/point/fusion {rho[0]:.4f}/{rho[1]:.4f}/{rho[2]:.4f}; max |Δmap| {same:.2e}"  # noqa: E501
            + f"; same nearest distance as exact on foreground patches (recall@1) point {recall[0]:.4f}, fusion {recall[1]:.4f}"  # noqa: E501
        )
    if "int8" in stations and "fp32" in stations:
        a, b = stations["int8"], stations["fp32"]
        cos = lambda x, y: (  # noqa: E731
            np.sum(x * y, -1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1) + 1e-12)
        )  # noqa: E731
        c_rgb = cos(a["rgb"], b["rgb"]).reshape(-1)
        fg = b["point"].any(-1)
        c_pt = cos(a["point"], b["point"])[fg]
        rho = [spearman(a["image"][:, k], b["image"][:, k]) for k in range(3)]
        rho_px = spearman(a["maps"][:, 2].reshape(-1)[::7], b["maps"][:, 2].reshape(-1)[::7])
        lines.append(
            f"\nint8 vs fp32 features (random weights: the AUROC effect cannot be shown): per-patch cosine rgb "  # noqa: E501
            f"mean {c_rgb.mean():.4f} / min {c_rgb.min():.4f}, point (foreground) mean {c_pt.mean():.4f} / min "  # noqa: E501
            f"{c_pt.min():.4f}; bank image-score Spearman rgb/point/fusion {rho[0]:.3f}/{rho[1]:.3f}/{rho[2]:.3f}; "  # noqa: E501
            f"fusion map pixel Spearman {rho_px:.4f}"
        )
    lines.append(
        f"\n¹ bench process (torch + setup). Threads: ORT intra-op {threads}, faiss/BLAS {threads}. "
        f"Load average (1/5/15 min) before/after the timed part: {loads[0]} / {loads[1]}."
    )
    return "\n".join(lines)


def run_preset(name: str, work: Path, root: Path, cls: str, args: argparse.Namespace) -> str:
    from bench.naive_reference import NaiveReference, timed
    from core.config import PreprocessConfig
    from core.mvtec3d import list_samples, load_scan
    from core.preprocess import prepare_scan

    pdir = work / name
    pdir.mkdir(parents=True, exist_ok=True)
    setup = (
        setup_free(pdir, root, cls) if name == "m3dm-free" else setup_random(pdir, root, cls, args.ann_recall)
    )
    repeats = args.repeats_free if name == "m3dm-free" else args.repeats_random
    (pdir / "station.json").write_text(json.dumps(setup["meta"] | {"repeats": repeats}))
    refs = list_samples(root, cls, "test")
    if name != "m3dm-free":
        good, bad = [r for r in refs if r.label == 0], [r for r in refs if r.label == 1]
        refs = (good[:1] + bad)[: args.frames_random]
    (pdir / "frames.json").write_text(
        json.dumps([{"root": str(root), "cls": cls, "rgb": str(r.rgb_path)} for r in refs])
    )
    loads = [tuple(round(x, 1) for x in os.getloadavg())]
    precisions = ["int8", "fp32"] if name != "m3dm-free" else ["fp32"]
    stations = {p: run_station(pdir, args.threads, p) for p in precisions}
    import torch

    torch.set_num_threads(args.threads)
    ref = NaiveReference(setup["preset"], setup["runners"], setup["banks"], setup["uff"])
    pre = PreprocessConfig(rgb_input_size=setup["preset"].rgb_input_size)
    naive = {"ms": [], "image": [], "maps": [], "dist": []}
    labels, masks = [], []
    for r in refs:
        ms: dict[str, float] = {}
        raw = timed(ms, "read", lambda r=r: load_scan(r))
        scan = timed(ms, "preprocess", lambda raw=raw: prepare_scan(raw, pre))
        image, maps, stage_ms = ref.score(scan)
        naive["ms"].append(ms | stage_ms)
        naive["image"].append(image)
        naive["maps"].append(maps)
        naive["dist"].append(ref.last_patch_dist)
        labels.append(r.label)
        masks.append(scan.gt_ids_hw > 0 if scan.gt_ids_hw is not None else np.zeros((224, 224), bool))
    loads.append(tuple(round(x, 1) for x in os.getloadavg()))
    dist = np.stack(naive["dist"])
    naive = {
        "ms": naive["ms"],
        "image": np.array(naive["image"]),
        "maps": np.stack(naive["maps"]),
        "peak_rss_mb": peak_rss_mb(),
        "dist": dist,
        "dist_fg": stations[precisions[-1]]["point"].any(-1),
    }
    np.savez(pdir / "naive.npz", image=naive["image"], maps=naive["maps"], dist=naive["dist"])
    (pdir / "naive.json").write_text(json.dumps({"ms": naive["ms"], "peak_rss_mb": naive["peak_rss_mb"]}))
    return report(name, setup, naive, stations, np.array(labels), np.stack(masks), args.threads, loads)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("runs/bench_speed"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames-random", type=int, default=4)
    parser.add_argument("--ann-recall", type=float, default=0.99)
    parser.add_argument(
        "--repeats-free", type=int, default=3, help="timed station passes over the m3dm-free frames"
    )
    parser.add_argument(
        "--repeats-random", type=int, default=1, help="timed station passes over the m3dm-random frames"
    )
    parser.add_argument("--presets", nargs="+", default=["m3dm-free", "m3dm-random"])
    parser.add_argument("--station-child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.station_child is not None:
        station_child(args.station_child, args.threads, args.precision)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    root, cls = synth_data(args.work)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}; threads {args.threads}; data {root} class {cls} (400 px)"
    )
    for name in args.presets:
        print("\n" + run_preset(name, args.work, root, cls, args), flush=True)


if __name__ == "__main__":
    main()
