"""Write a synthetic data set in the MVTec 3D-AD layout (spec §1); the engine behind `m3dm synth`.

<out>/<class>/{train,validation}/good/{rgb,xyz}/NNN.{png,tiff},
<out>/<class>/test/<good|defect>/{rgb,xyz,gt}/NNN.{png,tiff,png}, plus
<out>/<class>/calibration/camera_parameters.json and <out>/<class>/class_ids.json. Each sample's seed is
derived from (seed, class, split, folder, index), so a pool of workers writes byte-identical files.
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
from trainer.synth.camera import camera_for_size
from trainer.synth.defects import DEFECT_TYPES, defect_ids
from trainer.synth.render import MAX_SIZE_PX, MIN_SIZE_PX, render_sample
from trainer.synth.shapes import CLASS_NAMES

_POOL_MIN_JOBS = 16  # below this, starting worker processes costs more than it saves


@dataclass(frozen=True)
class SynthConfig:
    """What `synthesize` writes: counts per class and split, image size in pixels, worker processes."""

    seed: int = 0
    classes: tuple[str, ...] = CLASS_NAMES
    n_train: int = 40
    n_validation: int = 8
    n_test_good: int = 10
    n_test_per_defect: int = 5
    width_px: int = 400
    height_px: int = 400
    workers: int = 2

    def __post_init__(self) -> None:
        unknown = [c for c in self.classes if c not in CLASS_NAMES]
        if unknown or not self.classes or len(set(self.classes)) != len(self.classes):
            raise ConfigError(
                f"classes must be distinct names from {', '.join(CLASS_NAMES)}; got {self.classes}"
            )
        counts = (self.n_train, self.n_validation, self.n_test_good, self.n_test_per_defect)
        if min(counts) < 0 or self.n_train < 1:
            raise ConfigError("sample counts must be >= 0, and n_train >= 1")
        for size in (self.width_px, self.height_px):
            if not MIN_SIZE_PX <= size <= MAX_SIZE_PX:
                raise ConfigError(f"image sides must lie in [{MIN_SIZE_PX}, {MAX_SIZE_PX}] px, got {size}")
        if self.workers < 1:
            raise ConfigError("workers must be >= 1")


@dataclass(frozen=True)
class SampleJob:
    """One sample to render and write: folder = "good" or a defect name."""

    class_name: str
    split: str
    folder: str
    index: int
    rng_seed: int

    @property
    def defect(self) -> str | None:
        return None if self.folder == "good" else self.folder


def sample_seed(seed: int, class_name: str, split: str, folder: str, index: int) -> int:
    """The render seed of one sample: a hash of where it goes, independent of generation order."""
    keys = [
        seed,
        zlib.crc32(class_name.encode()),
        zlib.crc32(split.encode()),
        zlib.crc32(folder.encode()),
        index,
    ]
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0])


def plan_jobs(cfg: SynthConfig) -> list[SampleJob]:
    """Every sample of the data set, in a fixed order."""
    jobs = []
    for class_name in cfg.classes:
        folders = [("train", "good", cfg.n_train), ("validation", "good", cfg.n_validation)]
        folders.append(("test", "good", cfg.n_test_good))
        folders += [("test", defect, cfg.n_test_per_defect) for defect in DEFECT_TYPES[class_name]]
        for split, folder, count in folders:
            jobs += [
                SampleJob(class_name, split, folder, i, sample_seed(cfg.seed, class_name, split, folder, i))
                for i in range(count)
            ]
    return jobs


def _stem(index: int, count: int) -> str:
    return f"{index:0{max(3, len(str(count - 1)))}d}"


def write_job(job: SampleJob, out_dir: Path, width_px: int, height_px: int, count: int) -> None:
    """Render one sample and write its rgb PNG, xyz TIFF and (test split) gt PNG."""
    scan = render_sample(job.class_name, job.rng_seed, job.defect, width_px, height_px)
    folder = out_dir / job.class_name / job.split / job.folder
    stem = _stem(job.index, count)
    Image.fromarray(scan.rgb_hwc_u8, mode="RGB").save(folder / "rgb" / f"{stem}.png", format="PNG")
    tifffile.imwrite(folder / "xyz" / f"{stem}.tiff", scan.xyz_hwc_m)
    if job.split == "test":  # MVTec ships an all-zero mask for good test samples too
        Image.fromarray(scan.gt_ids_hw, mode="L").save(folder / "gt" / f"{stem}.png", format="PNG")


def _write_job_star(args: tuple[SampleJob, Path, int, int, int]) -> None:
    write_job(*args)


def _prepare_folders(out_dir: Path, cfg: SynthConfig, jobs: list[SampleJob], overwrite: bool) -> None:
    """Create the class folders, the calibration and class-id files; refuse to mix with an old data set."""
    for class_name in cfg.classes:
        class_dir = out_dir / class_name
        if class_dir.exists() and any(class_dir.iterdir()):
            if not overwrite:
                raise ConfigError(f"{class_dir} already holds data; choose another folder or overwrite")
            shutil.rmtree(class_dir)
        (class_dir / "calibration").mkdir(parents=True, exist_ok=True)
        camera = camera_for_size(cfg.width_px, cfg.height_px)
        _write_json(class_dir / "calibration" / "camera_parameters.json", camera.to_parameters())
        _write_json(class_dir / "class_ids.json", defect_ids(class_name))
    for job in jobs:
        kinds = ("rgb", "xyz", "gt") if job.split == "test" else ("rgb", "xyz")
        for kind in kinds:
            (out_dir / job.class_name / job.split / job.folder / kind).mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _summary(cfg: SynthConfig, jobs: list[SampleJob], seconds: float) -> dict:
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for job in jobs:
        per_split = counts.setdefault(job.class_name, {}).setdefault(job.split, {})
        per_split[job.folder] = per_split.get(job.folder, 0) + 1
    return {
        "counts": counts,
        "samples": len(jobs),
        "seconds": seconds,
        "seed": cfg.seed,
        "width_px": cfg.width_px,
        "height_px": cfg.height_px,
        "workers": cfg.workers,
    }


def synthesize(
    out_dir: Path,
    cfg: SynthConfig,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> dict:
    """Write the data set described by `cfg` under `out_dir`.

    Args:
        out_dir: data set root; one folder per class is created in it.
        cfg: counts, size, seed and worker processes.
        progress: called as progress(done, total) after each written sample.
        overwrite: replace existing class folders instead of raising ConfigError.

    Returns:
        {"counts": {class: {split: {folder: n}}}, "samples", "seconds", "seed", "width_px", "height_px",
        "workers"}.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    jobs = plan_jobs(cfg)
    _prepare_folders(out_dir, cfg, jobs, overwrite)
    per_folder = _summary(cfg, jobs, 0.0)["counts"]
    args = [
        (j, out_dir, cfg.width_px, cfg.height_px, per_folder[j.class_name][j.split][j.folder]) for j in jobs
    ]
    if cfg.workers > 1 and len(jobs) >= _POOL_MIN_JOBS:
        # spawn, not fork: the caller may hold torch or BLAS threads that a forked child would inherit.
        with multiprocessing.get_context("spawn").Pool(cfg.workers) as pool:
            for done, _ in enumerate(pool.imap_unordered(_write_job_star, args, chunksize=2), start=1):
                if progress is not None:
                    progress(done, len(jobs))
    else:
        for done, arg in enumerate(args, start=1):
            write_job(*arg)
            if progress is not None:
                progress(done, len(jobs))
    return _summary(cfg, jobs, time.perf_counter() - start)
