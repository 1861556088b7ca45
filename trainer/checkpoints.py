"""Official checkpoint loaders for the feature backbones, with strict, reported key checks.

Every loader returns a `LoadReport` and raises `ConfigError` naming each missing, unexpected or mis-shaped
key unless the file matches the model exactly (keys ignored by design are listed in the report). A missing
file raises `MissingWeightsError` naming the file and where to get it; nothing falls back silently.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.errors import ConfigError, CorruptFileError, MissingWeightsError
from trainer.models.vit import resample_pos_embed

__all__ = ["LoadReport", "load_dino", "load_dinov2", "load_point_mae", "random_init"]

DINO_SOURCE = (
    "dino_vitbase8_pretrain.pth from the facebookresearch/dino release "
    "(https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth)"
)
DINOV2_SOURCE = (
    "dinov2_vitb14_pretrain.pth from the facebookresearch/dinov2 release "
    "(https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth)"
)
POINT_MAE_SOURCE = (
    "pretrain.pth from the Pang-Yatian/Point-MAE GitHub release 'main' "
    "(https://github.com/Pang-Yatian/Point-MAE/releases/download/main/pretrain.pth)"
)
POINT_MAE_ENCODER_PREFIX = "module.MAE_encoder."
# The rest of Point-MAE's pretraining model; M3DM only uses the encoder.
POINT_MAE_IGNORED_PREFIXES = ("module.MAE_decoder.", "module.decoder_pos_embed.", "module.increase_dim.")
POINT_MAE_IGNORED_KEYS = ("module.mask_token",)


@dataclass(frozen=True)
class LoadReport:
    """What a loader did: keys loaded, keys missing, keys unexpected, keys skipped by design."""

    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    ignored: tuple[str, ...] = ()


def _read(path: str | Path, source: str, allowed_globals: tuple[type, ...] = ()) -> dict:
    """torch.load(weights_only=True) with typed errors for an absent or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"checkpoint {path} not found; expected {source}")
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle / zip / torch errors all mean the same: not a usable checkpoint
        raise CorruptFileError(f"cannot read checkpoint ({type(error).__name__}: {error})", path) from error
    if not isinstance(state, Mapping):
        raise CorruptFileError(f"checkpoint holds a {type(state).__name__}, not a dict", path)
    return dict(state)


def _strip(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Remove each leading prefix in `prefixes` (in order) from every key that has it."""
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _check_and_load(
    model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, ignored: tuple[str, ...] = ()
) -> LoadReport:
    """Load `state` strictly; raise ConfigError listing every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    missing = tuple(sorted(set(expected) - set(state)))
    unexpected = tuple(sorted(set(state) - set(expected)))
    misshaped = tuple(
        f"{key} {tuple(value.shape)} != {tuple(expected[key].shape)}"
        for key, value in sorted(state.items())
        if key in expected and (not isinstance(value, torch.Tensor) or value.shape != expected[key].shape)
    )
    if missing or unexpected or misshaped:
        raise ConfigError(
            f"{path}: checkpoint does not match {type(model).__name__}: "
            f"missing keys {list(missing)}; unexpected keys {list(unexpected)}; "
            f"wrong shapes {list(misshaped)}"
        )
    model.load_state_dict(state, strict=True)
    return LoadReport(loaded=tuple(sorted(state)), missing=(), unexpected=(), ignored=tuple(sorted(ignored)))


def load_dino(model: nn.Module, path: str | Path) -> LoadReport:
    """Load DINO ViT-B/8 weights: the flat backbone state dict, or the full checkpoint's `teacher`.

    The full checkpoint's teacher carries `module.` / `backbone.` prefixes (stripped) and the DINO
    projection `head.*` (ignored by design, as DINO's own loader does).
    """
    path = Path(path)
    state = _read(path, DINO_SOURCE, allowed_globals=(argparse.Namespace,))  # full checkpoint holds `args`
    ignored: tuple[str, ...] = ()
    if "teacher" in state:
        state = _strip(state["teacher"], ("module.", "backbone."))
        ignored = tuple(key for key in state if key.startswith("head."))
        state = {key: value for key, value in state.items() if key not in ignored}
    return _check_and_load(model, state, path, ignored)


def load_dinov2(model: nn.Module, path: str | Path) -> LoadReport:
    """Load the official register-free `dinov2_vitb14_pretrain.pth`; pos_embed resampled to the model grid."""
    path = Path(path)
    state = _read(path, DINOV2_SOURCE)
    grid = model.config.grid
    pos_embed = state.get("pos_embed")
    if isinstance(pos_embed, torch.Tensor) and pos_embed.dim() == 3 and pos_embed.shape[1] != 1 + grid * grid:
        state["pos_embed"] = resample_pos_embed(pos_embed, grid)  # 37×37 (518 px) -> 28×28 (392 px)
    return _check_and_load(model, state, path)


def load_point_mae(model: nn.Module, path: str | Path) -> LoadReport:
    """Load the 156 `module.MAE_encoder.*` keys of Point-MAE's `pretrain.pth` (`base_model` dict).

    Decoder, decoder position embedding, increase_dim and mask token are ignored by design; any other
    key outside the encoder is an error.
    """
    path = Path(path)
    checkpoint = _read(path, POINT_MAE_SOURCE)
    if not isinstance(checkpoint.get("base_model"), Mapping):
        raise ConfigError(
            f"{path}: not a Point-MAE checkpoint (no 'base_model' dict); expected {POINT_MAE_SOURCE}"
        )
    base = checkpoint["base_model"]
    ignored = tuple(
        k for k in base if k in POINT_MAE_IGNORED_KEYS or k.startswith(POINT_MAE_IGNORED_PREFIXES)
    )
    state = {
        key.removeprefix(POINT_MAE_ENCODER_PREFIX) if key.startswith(POINT_MAE_ENCODER_PREFIX) else key: value
        for key, value in base.items()
        if key not in ignored
    }
    return _check_and_load(model, state, path, ignored)


@torch.no_grad()
def random_init(model: nn.Module, seed: int) -> nn.Module:
    """Seeded, order-independent-of-global-RNG init (m3dm-random preset): same seed, same weights.

    Matrices and tokens: normal std 0.02 clamped at ±2 std; biases 0; norm weights and LayerScale gammas 1;
    BatchNorm running stats reset to mean 0, var 1.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if param.dim() >= 2 or leaf in ("cls_token", "pos_embed", "mask_token"):
            # normal + clamp at 2 std: torch's trunc_normal_ is ~20x slower on CPU for ViT-sized tensors
            param.normal_(0.0, 0.02, generator=generator).clamp_(-0.04, 0.04)
        elif leaf == "bias":
            param.zero_()
        else:  # LayerNorm / BatchNorm weight, LayerScale gamma
            param.fill_(1.0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
    return model
