"""Measures the weight-free descriptors of `m3dm-free` (core.free_features) on generated scans.

NOT THE PRODUCT PATH: a simplified scorer of its own (no coreset, no reweighting, no blur, no UFF/DLF) to
compare descriptor candidates with each other. Product figures come from `m3dm eval` (core.model.FrameScorer).

Per class: memory bank = every training patch descriptor; test patch score = nearest-neighbour distance; image
score = max patch score; pixel map = patch scores nearest-upsampled to 224. Prints I-AUROC / P-AUROC per
descriptor group and combination, under two normalisations: per-dimension standardisation (train mean/std) and
the product's (per-dimension mean, one scalar scale; core.scoring), which shows whether the fixed constants
balance the dimensions. Also times each descriptor.

Usage: python bench/free_features_eval.py [--data /tmp/free_eval] [--standin] [--only CANDIDATE ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from core.free_features import point_descriptor, rgb_descriptor
from core.free_points import point_descriptor_per_point, point_spacing_m
from core.free_rgb import rgb_descriptor_groups
from core.scan import PreparedScan


# ---------------------------------------------------------------------------------------- projection
def project_to_grid(
    point_feats_nc: np.ndarray, pixel_index_n: np.ndarray, image_size: int = 224, grid: int = 56
):
    """core.pfa.project_to_grid if present, else a stand-in with the same maths (spec §4)."""
    try:
        from core.pfa import project_to_grid as real

        return real(point_feats_nc, pixel_index_n, image_size=image_size, grid=grid)
    except ImportError:
        pass
    from scipy import ndimage

    c = point_feats_nc.shape[1]
    full = np.zeros((image_size * image_size, c), np.float32)
    full[pixel_index_n] = point_feats_nc
    pooled = ndimage.uniform_filter(full.reshape(image_size, image_size, c), size=(3, 3, 1), mode="constant")
    pooled = pooled[1:-1, 1:-1]
    n = pooled.shape[0]
    starts = (np.arange(grid) * n) // grid
    ends = -((-(np.arange(grid) + 1) * n) // grid)
    rows = np.stack([pooled[s:e].mean(axis=0) for s, e in zip(starts, ends, strict=True)])
    return np.stack([rows[:, s:e].mean(axis=1) for s, e in zip(starts, ends, strict=True)], axis=1)


# ---------------------------------------------------------------------------------------- stand-in data
def _blob(h, cy, cx, r, amp):
    yy, xx = np.mgrid[0:h, 0:h]
    return amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))


def standin_scan(rng: np.random.Generator, cls: int, defect: str | None) -> tuple[PreparedScan, np.ndarray]:
    """A dome-like object on a removed plane with smooth relief and colour texture, optional defect."""
    s = 224
    spacing = 0.0004
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    cy, cx = 112 + rng.normal(0, 4, 2)
    rad = 80 + 8 * cls
    rr2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / rad**2
    inside = rr2 < 1.0
    height = 0.012 * np.sqrt(np.clip(1 - rr2, 0, 1))
    for _ in range(6):  # smooth relief, class-typical
        height += _blob(s, *rng.uniform(40, 184, 2), rng.uniform(8, 20), rng.normal(0, 0.0006))
    base = np.array([[180, 120, 60], [90, 140, 200], [200, 200, 190]][cls], np.float64)
    tex = rng.normal(0, 1, (s, s))
    from scipy import ndimage

    tex = ndimage.gaussian_filter(tex, 1.5) * 40
    colour = base + tex[..., None] * np.array([1.0, 0.8, 0.6])
    gt = np.zeros((s, s), np.uint8)
    if defect is not None:
        py, px = cy + rng.uniform(-40, 40), cx + rng.uniform(-40, 40)
        r = rng.uniform(3, 7)
        d = np.sqrt((yy - py) ** 2 + (xx - px) ** 2)
        if defect == "dent":
            height -= _blob(s, py, px, r, 0.0008)
            gt[d < 2 * r] = 1
        elif defect == "bump":
            height += _blob(s, py, px, r, 0.0008)
            gt[d < 2 * r] = 1
        elif defect == "stain":
            colour[d < 2 * r] = colour[d < 2 * r] * 0.6 + np.array([60.0, 30, 10])
            gt[d < 2 * r] = 1
        elif defect == "crack":
            ang = rng.uniform(0, np.pi)
            along = (yy - py) * np.cos(ang) + (xx - px) * np.sin(ang)
            across = -(yy - py) * np.sin(ang) + (xx - px) * np.cos(ang)
            line = (np.abs(along) < 4 * r) & (np.abs(across) < 1.2)
            height[line] -= 0.0005
            colour[line] *= 0.5
            gt[line] = 1
    z = 0.5 - height + rng.normal(0, 0.00005, (s, s))
    xyz = np.stack([(xx - 112) * spacing, (yy - 112) * spacing, z], -1)
    valid = inside & (rng.random((s, s)) > 0.02)
    gt[~inside] = 0
    rgb = np.where(valid[..., None], np.clip(colour, 0, 255), 0).astype(np.uint8)
    xyz = np.where(valid[..., None], xyz, 0).astype(np.float32)
    scan = PreparedScan(np.zeros((3, 224, 224), np.float32), rgb, xyz, valid, gt)
    return scan, gt


def standin_dataset(n_classes: int, n_train: int, n_test: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    kinds = ["dent", "bump", "stain", "crack"]
    data = {}
    for c in range(n_classes):
        train = [standin_scan(rng, c, None)[0] for _ in range(n_train)]
        test = [standin_scan(rng, c, None if i % 2 == 0 else kinds[i // 2 % 4]) for i in range(n_test)]
        data[f"standin{c}"] = (train, test)
    return data


# ---------------------------------------------------------------------------------------- descriptors
def fpfh_per_point(
    scan: PreparedScan, normal_mult: float, feature_mult: float
) -> tuple[np.ndarray, np.ndarray]:
    """Open3D FPFH (BTF baseline) of the valid points, radii as multiples of the scan's point spacing."""
    import open3d as o3d

    index = np.flatnonzero(scan.valid_hw)
    spacing = point_spacing_m(scan.xyz_hwc_m, scan.valid_hw)
    pcd = o3d.geometry.PointCloud(
        o3d.utility.Vector3dVector(scan.xyz_hwc_m.reshape(-1, 3)[index].astype(np.float64))
    )
    pcd.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=normal_mult * spacing, max_nn=30))
    pcd.orient_normals_towards_camera_location(np.zeros(3))
    fpfh = o3d.pipelines.registration.compute_fpfh_feature(
        pcd, o3d.geometry.KDTreeSearchParamHybrid(radius=feature_mult * spacing, max_nn=100)
    )
    return (np.asarray(fpfh.data).T / 100.0).astype(np.float32), index


def describe(scan: PreparedScan, with_fpfh: bool, timings: dict) -> dict[str, np.ndarray]:
    """All candidate descriptors of one scan: name -> (G, G, C) float32 (28 grid for rgb, 56 for points)."""
    out = {}
    t0 = time.perf_counter()
    out["free_rgb"] = rgb_descriptor(scan)
    timings.setdefault("rgb_descriptor (shipped)", []).append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    out["free_point"] = point_descriptor(scan)
    timings.setdefault("point_descriptor (shipped)", []).append(time.perf_counter() - t0)
    groups = rgb_descriptor_groups(scan)
    for k, v in groups.items():
        out[f"rgb:{k}"] = v.astype(np.float32)
    feats, index = point_descriptor_per_point(scan)
    out["geo"] = project_to_grid(feats, index).astype(np.float32)
    if with_fpfh:
        for name, nm, fm in (("fpfh", 4.0, 10.0),):
            cached = Path(f"{scan.source}.{name}.npy")
            if scan.source and cached.exists():
                out[name] = np.load(cached, allow_pickle=False)
                continue
            t0 = time.perf_counter()
            f, idx = fpfh_per_point(scan, nm, fm)
            out[name] = project_to_grid(f, idx).astype(np.float32)
            timings.setdefault(name, []).append(time.perf_counter() - t0)
            if scan.source:
                np.save(cached, out[name])
    return out


def select(feats: dict[str, np.ndarray], spec: str) -> np.ndarray:
    """Builds one candidate: '+'-joined parts, each optionally '*weight'.

    'rgb' = all rgb groups, 'rgb-a,b' = all but groups a and b, 'rgb:a' = group a, 'geo[cols]' = geo columns.

    RGB alone stays on the 28 grid; mixed with point parts, rgb rows are duplicated 2x2 (M3DM fusion bank).
    """
    parts = []
    for term in spec.split("+"):
        part, _, weight = term.partition("*")
        if part == "rgb":
            arr = np.concatenate([v for k, v in feats.items() if k.startswith("rgb:")], -1)
        elif part.startswith("rgb-"):
            drop = part[4:].split(",")
            arr = np.concatenate(
                [v for k, v in feats.items() if k.startswith("rgb:") and k[4:] not in drop], -1
            )
        elif part.startswith("geo["):
            cols = [int(c) for c in part[4:-1].split(",")]
            arr = feats["geo"][..., cols]
        else:
            arr = feats[part]
        parts.append(arr * float(weight or 1.0))
    if any(p.shape[0] == 56 for p in parts):
        parts = [p.repeat(2, 0).repeat(2, 1) if p.shape[0] == 28 else p for p in parts]
    return np.concatenate(parts, -1)


# ---------------------------------------------------------------------------------------- scoring
def nn_distance(query_mc: np.ndarray, bank_nc: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Euclidean nearest-neighbour distance of each query row to the bank (BLAS), (M,) float32."""
    bank_sq = (bank_nc**2).sum(1)
    out = np.empty(len(query_mc), np.float32)
    for s in range(0, len(query_mc), chunk):
        q = query_mc[s : s + chunk]
        d2 = (q**2).sum(1)[:, None] + bank_sq[None, :] - 2.0 * q @ bank_nc.T
        out[s : s + chunk] = np.sqrt(np.maximum(d2.min(1), 0.0))
    return out


def evaluate(train: list[np.ndarray], test: list[np.ndarray], gts: list[np.ndarray], per_dim: bool) -> tuple:
    """(I-AUROC, P-AUROC) of one candidate for one class. train/test: (56, 56, C) per scan.

    All-zero rows (background) are kept once in the bank and score 0 as queries: exact, and 2-4x faster.
    """
    bank = np.concatenate([t.reshape(-1, t.shape[-1]) for t in train]).astype(np.float32)
    background = ~bank.any(axis=1)
    bank = np.concatenate([bank[~background], np.zeros((1, bank.shape[1]), np.float32)])
    mean = bank.mean(0)
    scale = bank.std(0) + 1e-6 if per_dim else np.float32(bank.std() + 1e-6)
    bank = (bank - mean) / scale
    img_scores, pix_scores, pix_labels, img_labels = [], [], [], []
    for t, gt in zip(test, gts, strict=True):
        rows = t.reshape(-1, t.shape[-1])
        fg = rows.any(axis=1)
        scores = np.zeros(len(rows), np.float32)
        scores[fg] = nn_distance(((rows[fg] - mean) / scale).astype(np.float32), bank)
        grid = scores.reshape(t.shape[:2])
        img_scores.append(grid.max())
        up = grid.repeat(224 // grid.shape[0], 0).repeat(224 // grid.shape[1], 1)
        pix_scores.append(up.ravel())
        pix_labels.append(gt.ravel() > 0)
        img_labels.append(gt.any())
    image_auroc = roc_auc_score(img_labels, img_scores)
    return image_auroc, roc_auc_score(np.concatenate(pix_labels), np.concatenate(pix_scores))


# Shipped descriptors first, then ablations of their parts and the BTF baseline (FPFH). Variants measured and
# dropped earlier (full-weight colour, a 32 px colour context, a 33 px geometry window) are in the report.
CANDIDATES = [
    "free_rgb",
    "free_point",
    "fpfh",
    "free_rgb+free_point",
    "free_rgb+fpfh",
    "free_point+fpfh",
    "rgb:texture",
    "rgb:colour+rgb:gradient+rgb:orientation+rgb:coverage",
    "geo[0,3,6]",
    "geo[1,4,7]",
    "geo[2,5,8]",
]


def _prepared(ref, cache: Path) -> tuple[PreparedScan, np.ndarray]:
    """Preprocesses one sample (cached as .npz under `cache`), returns (scan, gt (224, 224) uint8)."""
    from core.config import PreprocessConfig
    from core.mvtec3d import load_scan
    from core.preprocess import prepare_scan

    path = cache / f"{ref.class_name}_{ref.split}_{ref.defect_type}_{ref.stem}.npz"
    if not path.exists():
        scan = prepare_scan(load_scan(ref), PreprocessConfig())
        gt = np.zeros((224, 224), np.uint8) if scan.gt_ids_hw is None else scan.gt_ids_hw
        np.savez(path, rgb=scan.rgb_hwc_u8, xyz=scan.xyz_hwc_m, valid=scan.valid_hw, gt=gt)
    z = np.load(path, allow_pickle=False)
    scan = PreparedScan(np.zeros((3, 1, 1), np.float32), z["rgb"], z["xyz"], z["valid"], z["gt"], str(path))
    return scan, z["gt"]


def load_real(root: Path, n_classes: int, n_train: int, n_test: int):
    """Reads (generating once with trainer.synth) a data set and preprocesses it with core.preprocess."""
    from core.mvtec3d import discover_classes, list_samples

    data_root = root / "data"
    if not data_root.exists():
        from trainer.synth import SynthConfig, synthesize
        from trainer.synth.shapes import CLASS_NAMES

        per_defect = max(1, (n_test - n_test // 2) // 4)
        cfg = SynthConfig(
            classes=CLASS_NAMES[:n_classes],
            n_train=n_train,
            n_validation=0,
            n_test_good=n_test // 2,
            n_test_per_defect=per_defect,
            width_px=300,
            height_px=300,
        )
        synthesize(data_root, cfg)
    cache = root / "prepared"
    cache.mkdir(exist_ok=True)
    data = {}
    for cls in discover_classes(data_root)[:n_classes]:
        train = [_prepared(r, cache)[0] for r in list_samples(data_root, cls, "train")[:n_train]]
        test = [_prepared(r, cache) for r in list_samples(data_root, cls, "test")]
        data[cls] = (train, test)
    return data


def run(data: dict, with_fpfh: bool, only: list[str]) -> None:
    timings: dict[str, list[float]] = {}
    feats = {}
    for cls, (train, test) in data.items():
        feats[cls] = (
            [describe(s, with_fpfh, timings) for s in train],
            [describe(s[0], with_fpfh, timings) for s in test],
            [s[1] for s in test],
        )
    for k, v in timings.items():
        print(f"time {k:12s} median {1000 * np.median(v):7.1f} ms  (shared 2-core box, noisy)")
    cands = [c for c in (only or CANDIDATES) if with_fpfh or "fpfh" not in c]
    print("simplified scorer, NOT the product path (no coreset/reweighting/blur/UFF/DLF): compare rows only")
    print(f"{'candidate':28s} dim | I-AUROC std / scalar | P-AUROC std / scalar   (mean over classes)")
    for cand in cands:
        rows = []
        for tr, te, gts in feats.values():
            trf, tef = [select(f, cand) for f in tr], [select(f, cand) for f in te]
            rows.append(evaluate(trf, tef, gts, True) + evaluate(trf, tef, gts, False))
        r = np.mean(rows, axis=0)
        dim = select(next(iter(feats.values()))[0][0], cand).shape[-1]
        per_class = " ".join(f"{x[0]:.2f}" for x in rows)
        print(
            f"{cand:28s} {dim:3d} | {r[0]:.3f} / {r[2]:.3f}     | {r[1]:.3f} / {r[3]:.3f}   "
            f"I per class: {per_class}"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("/tmp/free_eval"))
    ap.add_argument("--standin", action="store_true")
    ap.add_argument("--no-fpfh", action="store_true")
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--train", type=int, default=20)
    ap.add_argument("--test", type=int, default=20)
    ap.add_argument("--only", nargs="*", default=[], help="candidates to score (default: all)")
    args = ap.parse_args()
    data = None if args.standin else load_real(args.data, args.classes, args.train, args.test)
    if data is None:
        print("using the stand-in generator")
        data = standin_dataset(args.classes, args.train, args.test)
    run(data, not args.no_fpfh, args.only)


if __name__ == "__main__":
    main()
