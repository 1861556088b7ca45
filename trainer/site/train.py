"""Train the `m3dm-site` rgb encoder on one class's training normals; save and load it.

Objective (self-supervised, normals only): each step pastes synthetic anomalies (trainer/site/augment.py)
into about half the images; the network segments them per token (BCE) and reconstructs the clean image from
its tokens (MSE). The encoder's tokens then feed the rgb bank like DINO's. Deterministic for a seed on a
given device and thread count; a non-finite loss stops training with an error instead of saving garbage.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from core.config import SITE_WIDTH, PreprocessConfig
from core.errors import ConfigError, CorruptFileError, InputError, M3DMError, MissingWeightsError
from core.features import mask_at_size, site_network_input
from core.mvtec3d import list_samples, load_scan
from core.preprocess import prepare_scan
from trainer.site.augment import synthetic_anomaly
from trainer.site.model import PATCH_PX, SiteEncoder, SiteNet

__all__ = [
    "SITE_WEIGHTS",
    "SiteConfig",
    "TrainingDivergedError",
    "load_site",
    "save_site",
    "site_training_images",
    "train_site",
    "train_site_for_class",
]

log = logging.getLogger("m3dm.trainer.site")

SITE_WEIGHTS = "site_rgb.safetensors"  # in the class's model folder, beside uff.safetensors


class TrainingDivergedError(M3DMError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class SiteConfig:
    """Training of the site encoder; steps x batch_images crops is the budget (times: BENCHMARKS.md)."""

    width: int = SITE_WIDTH
    steps: int = 2400
    batch_images: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 15
    anomaly_prob: float = 0.5  # share of images in a batch that get a synthetic anomaly
    recon_weight: float = 1.0
    # Training crops (multiple of 16): a 64 px crop costs a twelfth of a full image, and eval-mode BatchNorm
    # keeps full-image features consistent with crop training; each step sees other parts and placements.
    crop_px: int = 64
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda"
    # torch CPU threads while training (None: torch's setting, e.g. OMP_NUM_THREADS). On a machine whose load
    # exceeds its cores, 1 thread measured 1.5 s a step against 22 s for 2 (threads wait on each other).
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_images < 1 or self.width < 4:
            raise ConfigError("site training needs steps >= 1, batch_images >= 1 and width >= 4")
        if not 0 <= self.anomaly_prob <= 1:
            raise ConfigError(f"anomaly_prob must lie in [0, 1], got {self.anomaly_prob}")
        if self.crop_px < 16 or self.crop_px % 16:
            raise ConfigError(f"crop_px must be a positive multiple of 16, got {self.crop_px}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def site_training_images(
    data_root: Path, class_name: str, preprocess: PreprocessConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, S, S) normalised images and (N, S, S) object masks of the scans that will fill the banks.

    When the class has no validation split, fit_class holds the last fifth of the readable training scans
    out for DLF and thresholds; those are left out here too, so no held-out scan shapes the features.
    """
    images, masks = [], []
    for ref in list_samples(data_root, class_name, "train"):
        try:
            scan = prepare_scan(load_scan(ref), preprocess)
        except InputError as err:
            log.warning("site training skips %s: %s", ref.rgb_path, err)
            continue
        images.append(site_network_input(scan))
        masks.append(mask_at_size(scan.valid_hw, scan.rgb_chw.shape[-1]))
    if not list_samples(data_root, class_name, "validation") and len(images) >= 6:
        keep = len(images) - max(2, len(images) // 5)  # the rule of trainer.fit.split_off_validation
        images, masks = images[:keep], masks[:keep]
    if len(images) < 2:
        raise InputError(f"class {class_name}: fewer than 2 usable training scans", data_root / class_name)
    return np.stack(images).astype(np.float32), np.stack(masks)


def _crop(
    image_chw: np.ndarray, valid_hw: np.ndarray, crop_px: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A crop_px square around a random object pixel (the whole image when crop_px >= its side)."""
    size = image_chw.shape[-1]
    if crop_px >= size:
        return image_chw, valid_hw
    ys, xs = np.nonzero(valid_hw)
    i = int(rng.integers(ys.size)) if ys.size else 0
    cy, cx = (int(ys[i]), int(xs[i])) if ys.size else (size // 2, size // 2)
    jitter = rng.integers(-crop_px // 4, crop_px // 4 + 1, size=2)
    y0 = int(np.clip(cy + jitter[0] - crop_px // 2, 0, size - crop_px))
    x0 = int(np.clip(cx + jitter[1] - crop_px // 2, 0, size - crop_px))
    window = slice(y0, y0 + crop_px), slice(x0, x0 + crop_px)
    return image_chw[:, window[0], window[1]], valid_hw[window]


def _batch(
    images: np.ndarray, masks: np.ndarray, ids: np.ndarray, cfg: SiteConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(corrupted inputs, clean targets, anomaly masks) for the images `ids`."""
    inputs, clean, anomaly = [], [], []
    for i in ids:
        img, valid = _crop(images[i], masks[i], cfg.crop_px, rng)
        mask = np.zeros(valid.shape, np.float32)
        corrupted = img
        if rng.random() < cfg.anomaly_prob:
            source = images[int(rng.integers(len(images)))]
            corrupted, mask = synthetic_anomaly(img, valid, source, rng)
        inputs.append(corrupted)
        clean.append(img)
        anomaly.append(mask)
    return np.stack(inputs).astype(np.float32), np.stack(clean).astype(np.float32), np.stack(anomaly)


def _lr_at(step: int, cfg: SiteConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_site(
    images_nchw: np.ndarray, masks_nhw: np.ndarray, cfg: SiteConfig, progress: bool = True
) -> tuple[SiteEncoder, list[dict[str, float]]]:
    """Train a SiteNet and return its encoder (eval mode, on CPU) and per-step losses.

    Raises:
        TrainingDivergedError: a step's loss is NaN or infinite (bad input values, too high a learning rate).
    """
    if images_nchw.ndim != 4 or images_nchw.shape[0] < 1 or images_nchw.shape[-1] % PATCH_PX:
        raise ConfigError(
            f"need (N, 3, S, S) images with S a multiple of {PATCH_PX}, got {images_nchw.shape}"
        )
    device = resolve_device(cfg.device)
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(images_nchw, masks_nhw, cfg, device, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    images_nchw: np.ndarray, masks_nhw: np.ndarray, cfg: SiteConfig, device: torch.device, progress: bool
) -> tuple[SiteEncoder, list[dict[str, float]]]:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = SiteNet(cfg.width).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict[str, float]] = []
    log.info(
        "site encoder: %d images, %d steps x %d, %s, %d torch threads",
        images_nchw.shape[0],
        cfg.steps,
        cfg.batch_images,
        device,
        torch.get_num_threads(),
    )
    net.train()
    with tqdm(total=cfg.steps, desc="site encoder", disable=not progress) as bar:
        for step in range(cfg.steps):
            ids = rng.choice(images_nchw.shape[0], size=cfg.batch_images, replace=True)
            inputs, clean, anomaly = (
                torch.from_numpy(a).to(device) for a in _batch(images_nchw, masks_nhw, ids, cfg, rng)
            )
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, cfg)
            seg, recon = net(inputs)
            target_tok = F.avg_pool2d(anomaly[:, None], PATCH_PX)[:, 0]  # share of each token's patch
            seg_loss = F.binary_cross_entropy_with_logits(seg, target_tok)
            recon_loss = F.mse_loss(recon, clean)
            loss = seg_loss + cfg.recon_weight * recon_loss
            value, seg_value, recon_value = (float(t.detach()) for t in (loss, seg_loss, recon_loss))
            if not math.isfinite(value):
                raise TrainingDivergedError(
                    f"site encoder loss is {value} at step {step + 1}/{cfg.steps} (segmentation "
                    f"{seg_value:.4g}, reconstruction {recon_value:.4g}); check the training images for "
                    "NaN/inf values or lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(
                {"loss": value, "seg": float(seg_loss.detach()), "recon": float(recon_loss.detach())}
            )
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if (step + 1) % max(1, cfg.steps // 10) == 0:
                recent = history[-max(1, cfg.steps // 10) :]
                log.info(
                    "site step %d/%d: loss %.4f (seg %.4f, recon %.4f)",
                    step + 1,
                    cfg.steps,
                    np.mean([h["loss"] for h in recent]),
                    np.mean([h["seg"] for h in recent]),
                    np.mean([h["recon"] for h in recent]),
                )
    return net.encoder.cpu().eval(), history


def save_site(encoder: SiteEncoder, path: Path, record: dict[str, Any]) -> Path:
    """Weights as safetensors and `record` (width, config, losses, timings) as json beside them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in encoder.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"width": encoder.width, **record}, indent=2) + "\n")
    return path


def load_site(path: Path) -> SiteEncoder:
    """The encoder written by `save_site` (strict keys), eval mode."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise MissingWeightsError(
            f"m3dm-site encoder {path} (or {meta_path.name}) not found: it is trained by `m3dm train "
            "--preset m3dm-site` into the class's model folder"
        )
    try:
        encoder = SiteEncoder(int(json.loads(meta_path.read_text())["width"]))
        encoder.load_state_dict(load_file(str(path)), strict=True)
    except (ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        raise CorruptFileError(f"not an m3dm-site encoder: {err}", path=path) from err
    return encoder.eval()


def train_site_for_class(
    data_root: Path,
    class_name: str,
    preprocess: PreprocessConfig,
    cfg: SiteConfig,
    out_dir: Path,
    rgb_dim: int,
    progress: bool = True,
) -> Path:
    """Train on the class's training normals and save to out_dir/SITE_WEIGHTS; returns that path."""
    t0 = time.perf_counter()
    images, masks = site_training_images(data_root, class_name, preprocess)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    encoder, history = train_site(images, masks, cfg, progress)
    train_s = time.perf_counter() - t0
    if encoder.out_dim != rgb_dim:
        raise ConfigError(
            f"site encoder width {cfg.width} gives {encoder.out_dim} dims, preset says {rgb_dim}"
        )
    tail = history[-max(1, len(history) // 10) :]
    record = {
        "config": asdict(cfg),
        "train_images": int(images.shape[0]),
        "final_loss": float(np.mean([h["loss"] for h in tail])),
        "final_seg_loss": float(np.mean([h["seg"] for h in tail])),
        "final_recon_loss": float(np.mean([h["recon"] for h in tail])),
        "first_loss": history[0]["loss"],
        "parameters": sum(p.numel() for p in encoder.parameters()),
        "timings_s": {"images": load_s, "train": train_s},
        "torch_threads": torch.get_num_threads(),
    }
    log.info("class %s: site encoder trained in %.1f s (loss %.4f -> %.4f)", class_name, train_s,
             record["first_loss"], record["final_loss"])  # fmt: skip
    return save_site(encoder, Path(out_dir) / SITE_WEIGHTS, record)
