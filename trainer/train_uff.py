"""UFF training (spec §7): patch-wise InfoNCE between RGB and point patches at the same image location.

Runs after training features are extracted and before the fusion bank is filled. Unlike the original's data
dump (which paired only 0.26% of patches correctly), point patch (i, j) is paired with rgb token (i//2, j//2),
the same 2x duplication the fusion bank uses at inference. Weights are saved as safetensors plus a dims json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from core.config import UFFConfig
from core.errors import CorruptFileError, MissingWeightsError, ShapeError
from trainer.errors import TrainingError
from trainer.models.uff import FeatureFusionBlock

__all__ = [
    "contrastive_loss",
    "load_official_uff",
    "load_uff",
    "lr_at",
    "pair_patches",
    "save_uff",
    "train_uff",
]

log = logging.getLogger("m3dm.trainer.uff")


def pair_patches(point_nhwc: np.ndarray, rgb_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair every point patch with the rgb token above it by 2x nearest duplication of the rgb grid.

    Args:
        point_nhwc: (N, 2H, 2W, Cp) float32 point patch features (56x56 for M3DM); background rows are zero.
        rgb_nhwc: (N, H, W, Cr) float32 rgb tokens (28x28 for M3DM).

    Returns:
        point_rows (N*4HW, Cp), rgb_rows (N*4HW, Cr), valid_rows (N*4HW,) bool; row r of both arrays is the
        same image location; valid_rows marks patches whose point feature is not the all-zero background.
    """
    n, hp, wp, cp = point_nhwc.shape
    if (
        rgb_nhwc.ndim != 4
        or rgb_nhwc.shape[0] != n
        or (hp, wp) != (2 * rgb_nhwc.shape[1], 2 * rgb_nhwc.shape[2])
    ):
        raise ShapeError(
            f"point grid {point_nhwc.shape} must be (N,2H,2W,Cp) for rgb grid {rgb_nhwc.shape} (N,H,W,Cr)",
            path="uff training features",
        )
    rgb_up = rgb_nhwc.repeat(2, axis=1).repeat(2, axis=2)  # (N, 2H, 2W, Cr): token (i//2, j//2) at (i, j)
    point_rows = point_nhwc.reshape(-1, cp)
    # The original keeps rows with no zero element; "any non-zero" is the same for dense network features
    # but keeps legitimate zeros of the weight-free descriptors.
    valid_rows = np.any(point_rows != 0, axis=1)
    return point_rows, rgb_up.reshape(-1, rgb_nhwc.shape[-1]), valid_rows


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up from 0 over `warmup_steps`, then half-cosine to 0 at `total_steps` (spec §7)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def contrastive_loss(
    block: FeatureFusionBlock, point_rows: torch.Tensor, rgb_rows: torch.Tensor, temperature: float
) -> torch.Tensor:
    """One-directional InfoNCE: rgb queries vs point keys of the same M patches, x 2T as the original.

    Args:
        point_rows: (M, Cp) valid point patch features; rgb_rows: (M, Cr) the paired rgb features.
    """
    point_out, rgb_out = block.branches(point_rows, rgb_rows)
    q = F.normalize(block.rgb_head(rgb_out), dim=1)
    k = F.normalize(block.xyz_head(point_out), dim=1)
    logits = q @ k.T / temperature  # (M, M); negatives are the other patches of the step
    labels = torch.arange(logits.shape[0])
    return F.cross_entropy(logits, labels) * (2 * temperature)


def _step_rows(
    point_nhwc: np.ndarray, rgb_nhwc: np.ndarray, image_ids: np.ndarray, cap: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid paired rows of the given images, at most `cap` of them (seeded random subset)."""
    point_rows, rgb_rows, valid = pair_patches(point_nhwc[image_ids], rgb_nhwc[image_ids])
    rows = np.flatnonzero(valid)
    if rows.size > cap:
        rows = np.sort(rng.choice(rows, size=cap, replace=False))
    return torch.from_numpy(point_rows[rows]).float(), torch.from_numpy(rgb_rows[rows]).float()


def train_uff(
    point_feats_nhwc: np.ndarray, rgb_feats_nhwc: np.ndarray, cfg: UFFConfig, progress: bool = True
) -> tuple[FeatureFusionBlock, list[float]]:
    """Train a FeatureFusionBlock on training patch features; deterministic for a given cfg.seed.

    Args:
        point_feats_nhwc: (N, 56, 56, Cp) float32 point patch features (zero rows = background).
        rgb_feats_nhwc: (N, 28, 28, Cr) float32 rgb tokens.
        cfg: optimiser, schedule and batch settings.
        progress: show a progress bar with the running loss.

    Returns:
        The trained block (eval mode) and the loss of every optimiser step (NaN for a skipped step).

    Raises:
        TrainingError: a step's loss is NaN or inf (naming epoch and step), or no step had two valid patches
            to contrast, so nothing was learned. The caller saves nothing then.
    """
    if point_feats_nhwc.ndim != 4 or point_feats_nhwc.shape[0] == 0:
        raise ShapeError(f"need (N>=1,56,56,Cp) point features, got {point_feats_nhwc.shape}", "uff training")
    pair_patches(point_feats_nhwc[:1], rgb_feats_nhwc[:1])  # shape check before any work
    n_images = point_feats_nhwc.shape[0]
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    block = FeatureFusionBlock(
        point_feats_nhwc.shape[-1], rgb_feats_nhwc.shape[-1], cfg.mlp_ratio, cfg.head_dim
    )
    optimizer = torch.optim.AdamW(
        block.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    steps_per_epoch = math.ceil(n_images / cfg.batch_images)
    # One class has only tens of scans, so a fixed epoch count gives a handful of optimiser steps (the
    # original trained ~30 steps over all ten classes at once); train at least `min_steps`, keeping the
    # warm-up share of the schedule.
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    total_steps = steps_per_epoch * epochs
    warmup_steps = round(total_steps * cfg.warmup_epochs / cfg.epochs)
    history: list[float] = []
    block.train()
    with tqdm(total=total_steps, desc="UFF", disable=not progress) as bar:
        for epoch in range(epochs):
            started_s = time.perf_counter()
            for batch_ids in np.array_split(rng.permutation(n_images), steps_per_epoch):
                point_rows, rgb_rows = _step_rows(
                    point_feats_nhwc, rgb_feats_nhwc, batch_ids, cfg.max_patches_per_step, rng
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(len(history), total_steps, warmup_steps, cfg.lr)
                loss = _optimise(block, optimizer, point_rows, rgb_rows, cfg.temperature)
                if loss is not None and not math.isfinite(loss):
                    raise TrainingError(
                        f"UFF training diverged: loss is {loss} at epoch {epoch + 1}/{epochs}, step "
                        f"{len(history) + 1}/{total_steps} (lr {cfg.lr:g}, temperature {cfg.temperature:g}); "
                        "no model was saved. Check the features for NaN/inf or lower the learning rate."
                    )
                history.append(float("nan") if loss is None else loss)
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1]:.4f}")
            step_ms = 1000 * (time.perf_counter() - started_s) / steps_per_epoch
            epoch_loss = float(np.mean(history[-steps_per_epoch:]))
            # One line per tenth of training (and the last epoch): enough to see convergence, not a wall.
            level = (
                logging.INFO
                if (epoch + 1) % max(1, epochs // 10) == 0 or epoch + 1 == epochs
                else logging.DEBUG
            )
            log.log(level, "UFF epoch %d/%d: loss %.4f, %.0f ms/step", epoch + 1, epochs, epoch_loss, step_ms)
    if not any(math.isfinite(v) for v in history):
        raise TrainingError(
            f"UFF training learned nothing: none of its {total_steps} steps had two foreground point "
            "patches to contrast (every point feature is background); no model was saved"
        )
    return block.eval(), history


def _optimise(
    block: FeatureFusionBlock,
    optimizer: torch.optim.Optimizer,
    point_rows: torch.Tensor,
    rgb_rows: torch.Tensor,
    temperature: float,
) -> float | None:
    """One optimiser step and its loss; a step with fewer than 2 valid patches has no negatives: None."""
    if point_rows.shape[0] < 2:
        return None
    optimizer.zero_grad(set_to_none=True)
    loss = contrastive_loss(block, point_rows, rgb_rows, temperature)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def save_uff(model: FeatureFusionBlock, path: str | Path) -> Path:
    """Write weights as safetensors at `path` and the constructor dims to `path` with suffix .json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    path.with_suffix(".json").write_text(json.dumps(model.dims, indent=2) + "\n")
    return path


def load_uff(path: str | Path) -> FeatureFusionBlock:
    """Read a block written by `save_uff` (strict keys); eval mode."""
    path = Path(path)
    dims_path = path.with_suffix(".json")
    if not path.is_file() or not dims_path.is_file():
        raise MissingWeightsError(f"UFF weights {path} or dims {dims_path} not found")
    try:
        dims = json.loads(dims_path.read_text())
        block = FeatureFusionBlock(**dims)
        block.load_state_dict(load_file(str(path)), strict=True)
    except (ValueError, TypeError, RuntimeError, SafetensorError) as err:
        raise CorruptFileError(f"not a UFF checkpoint: {err}", path=path) from err
    return block.eval()


def load_official_uff(path: str | Path) -> FeatureFusionBlock:
    """Load the official `checkpoint-*.pth` ({'model': state_dict, ...}); keys must match."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"official UFF checkpoint {path} not found")
    try:
        # weights_only with argparse.Namespace allowed: the checkpoint stores the training args.
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = ckpt["model"]
        point_dim, rgb_dim = state["xyz_norm.weight"].shape[0], state["rgb_norm.weight"].shape[0]
        ratio = state["xyz_mlp.fc1.weight"].shape[0] // point_dim
        head_dim = state["xyz_head.weight"].shape[0]
    except Exception as err:  # torch.load raises many unpickling types; all mean "not this format"
        raise CorruptFileError(
            f"not an official UFF checkpoint: {type(err).__name__}: {err}", path=path
        ) from err
    block = FeatureFusionBlock(point_dim, rgb_dim, ratio, head_dim)
    try:
        missing, unexpected = block.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch inside a known key
        raise CorruptFileError(f"UFF tensor shapes do not fit one block: {err}", path=path) from err
    if missing or unexpected:
        raise CorruptFileError(
            f"UFF key mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}", path
        )
    log.info(
        "loaded official UFF %s: point %d, rgb %d, ratio %d, head %d",
        path,
        point_dim,
        rgb_dim,
        ratio,
        head_dim,
    )
    return block.eval()
