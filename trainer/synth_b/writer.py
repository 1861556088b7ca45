"""Write a family-B data set in the MVTec 3D-AD layout, plus its validation-defect split.

<out>/<class>/{train,validation}/good/{rgb,xyz}/NNN.{png,tiff}
<out>/<class>/test/<good|defect>/{rgb,xyz,gt}/NNN.{png,tiff,png}
<out>/<class>/calibration/camera_parameters.json, <out>/<class>/class_ids.json
<out>/validation_defects/<class>/test/<good|defect>/{rgb,xyz,gt}/...  (for model selection only)

`validation_defects/` is a data root of its own (its classes hold only test/ folders), so
`m3dm eval --data <out>/validation_defects --model M` scores it like any test split; being one level
down, `m3dm train --all --data <out>` never sees it as a class. Its samples come from a different seed
stream than test/. As in the real data set: gt masks are 0/255, test/good has all-zero masks, xyz is
float32 (H, W, 3) with zeros where the sensor saw nothing, and a class's frames differ in size.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from core.errors import ConfigError
from trainer.synth_b.defects import DEFECT_TYPES, MODALITY
from trainer.synth_b.objects import CLASS_NAMES
from trainer.synth_b.render import MAX_SIZE_PX, MIN_SIZE_PX, camera_for_frame, frames_for, render_scan

VALIDATION_DEFECTS = "validation_defects"
_POOL_MIN_JOBS = 16


@dataclass(frozen=True)
class SynthBConfig:
    """Counts per class and split, the largest frame's longer side in pixels, worker processes."""

    seed: int = 0
    classes: tuple[str, ...] = CLASS_NAMES
    n_train: int = 40
    n_validation: int = 20
    n_test_good: int = 10
    n_test_per_defect: int = 5
    n_valdef_good: int = 6
    n_valdef_per_defect: int = 3
    size_px: int = 400
    workers: int = 2

    def __post_init__(self) -> None:
        unknown = [c for c in self.classes if c not in CLASS_NAMES]
        if unknown or not self.classes or len(set(self.classes)) != len(self.classes):
            raise ConfigError(
                f"family-B classes must be distinct names from {', '.join(CLASS_NAMES)}; got {self.classes}"
            )
        counts = (
            self.n_train,
            self.n_validation,
            self.n_test_good,
            self.n_test_per_defect,
            self.n_valdef_good,
            self.n_valdef_per_defect,
        )
        if min(counts) < 0 or self.n_train < 1:
            raise ConfigError("sample counts must be >= 0, and n_train >= 1")
        if not MIN_SIZE_PX <= self.size_px <= MAX_SIZE_PX:
            raise ConfigError(f"size must lie in [{MIN_SIZE_PX}, {MAX_SIZE_PX}] px, got {self.size_px}")
        if self.workers < 1:
            raise ConfigError("workers must be >= 1")


@dataclass(frozen=True)
class JobB:
    """One sample: `root` is "" for the data set or VALIDATION_DEFECTS; folder is "good" or a defect."""

    root: str
    class_name: str
    split: str
    folder: str
    index: int
    count: int

    @property
    def defect(self) -> str | None:
        return None if self.folder == "good" else self.folder


def sample_seed_b(seed: int, job: JobB) -> int:
    """Seed of one sample from where it goes (so workers and reruns write identical files)."""
    keys = [seed, zlib.crc32(b"synth_b"), zlib.crc32(job.root.encode()), zlib.crc32(job.class_name.encode())]
    keys += [zlib.crc32(job.split.encode()), zlib.crc32(job.folder.encode()), job.index]
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0])


def plan_jobs_b(cfg: SynthBConfig) -> list[JobB]:
    jobs: list[JobB] = []
    for name in cfg.classes:
        folders = [("", "train", "good", cfg.n_train), ("", "validation", "good", cfg.n_validation)]
        folders.append(("", "test", "good", cfg.n_test_good))
        folders += [("", "test", d, cfg.n_test_per_defect) for d in DEFECT_TYPES[name]]
        folders.append((VALIDATION_DEFECTS, "test", "good", cfg.n_valdef_good))
        folders += [(VALIDATION_DEFECTS, "test", d, cfg.n_valdef_per_defect) for d in DEFECT_TYPES[name]]
        for root, split, folder, count in folders:
            jobs += [JobB(root, name, split, folder, i, count) for i in range(count)]
    return jobs


def _folder(out_dir: Path, job: JobB) -> Path:
    return out_dir / job.root / job.class_name / job.split / job.folder


def write_job_b(job: JobB, out_dir: Path, seed: int, size_px: int) -> None:
    """Render one sample and write rgb PNG (8-bit), xyz TIFF (float32) and, in test splits, a 0/255 mask."""
    scan = render_scan(job.class_name, sample_seed_b(seed, job), job.defect, size_px)
    folder = _folder(out_dir, job)
    stem = f"{job.index:0{max(3, len(str(job.count - 1)))}d}"
    Image.fromarray(scan.rgb_hwc_u8, mode="RGB").save(folder / "rgb" / f"{stem}.png", format="PNG")
    tifffile.imwrite(folder / "xyz" / f"{stem}.tiff", scan.xyz_hwc_m)
    if job.split == "test":
        Image.fromarray(scan.gt_hw_u8, mode="L").save(folder / "gt" / f"{stem}.png", format="PNG")


def _write_star(args: tuple[JobB, Path, int, int]) -> None:
    write_job_b(*args)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _prepare(out_dir: Path, cfg: SynthBConfig, jobs: list[JobB], overwrite: bool) -> None:
    for root in ("", VALIDATION_DEFECTS):
        for name in cfg.classes:
            class_dir = out_dir / root / name
            if class_dir.exists() and any(class_dir.iterdir()):
                if not overwrite:
                    raise ConfigError(f"{class_dir} already holds data; choose another folder or overwrite")
                shutil.rmtree(class_dir)
            frames = frames_for(name, cfg.size_px)
            (class_dir / "calibration").mkdir(parents=True, exist_ok=True)
            params = camera_for_frame(*frames[0]).to_parameters()
            params["frames"] = [list(f) for f in frames]  # this class's scans come in these sizes
            _write_json(class_dir / "calibration" / "camera_parameters.json", params)
            _write_json(class_dir / "class_ids.json", {d: i + 1 for i, d in enumerate(DEFECT_TYPES[name])})
    for job in jobs:
        kinds = ("rgb", "xyz", "gt") if job.split == "test" else ("rgb", "xyz")
        for kind in kinds:
            (_folder(out_dir, job) / kind).mkdir(parents=True, exist_ok=True)
    _write_json(
        out_dir / VALIDATION_DEFECTS / "split.json",
        {
            "purpose": "model selection only (image-score choice, settings); never report these as test",
            "family": "b",
            "seed": cfg.seed,
            "modality": MODALITY,
        },
    )


def synthesize_b(
    out_dir: Path,
    cfg: SynthBConfig,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> dict:
    """Write the family-B data set described by `cfg` under `out_dir`; return counts and timing.

    Returns {"family": "b", "counts": {root/class: {split: {folder: n}}}, "samples", "seconds", "seed",
    "size_px", "frames": {class: [[w, h], ...]}, "workers", "validation_defects": path}.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    jobs = plan_jobs_b(cfg)
    _prepare(out_dir, cfg, jobs, overwrite)
    args = [(j, out_dir, cfg.seed, cfg.size_px) for j in jobs]
    if cfg.workers > 1 and len(jobs) >= _POOL_MIN_JOBS:
        # spawn, not fork: the caller may hold torch or BLAS threads that a forked child would inherit.
        with multiprocessing.get_context("spawn").Pool(cfg.workers) as pool:
            for done, _ in enumerate(pool.imap_unordered(_write_star, args, chunksize=2), start=1):
                if progress is not None:
                    progress(done, len(jobs))
    else:
        for done, arg in enumerate(args, start=1):
            write_job_b(*arg)
            if progress is not None:
                progress(done, len(jobs))
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for job in jobs:
        key = f"{job.root}/{job.class_name}" if job.root else job.class_name
        per_split = counts.setdefault(key, {}).setdefault(job.split, {})
        per_split[job.folder] = per_split.get(job.folder, 0) + 1
    return {
        "family": "b",
        "counts": counts,
        "samples": len(jobs),
        "seconds": time.perf_counter() - start,
        "seed": cfg.seed,
        "size_px": cfg.size_px,
        "frames": {c: [list(f) for f in frames_for(c, cfg.size_px)] for c in cfg.classes},
        "workers": cfg.workers,
        "validation_defects": str(out_dir / VALIDATION_DEFECTS),
    }
