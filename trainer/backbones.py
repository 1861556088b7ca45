"""Build the torch feature networks a preset needs, wrapped as Runners, from user-supplied weights.

No weights are ever downloaded: official checkpoints come from files the user gives, and a missing file is a
clear error. `m3dm-random` builds the official architecture with seeded random weights (benchmarks only).
`m3dm-site` has no checkpoint to give: its rgb encoder is trained per class (trainer/site) into the class's
model folder, so its runners need that folder (`class_dir`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from core.config import SITE_BACKBONE, FeaturePreset
from core.errors import ConfigError, MissingWeightsError
from core.features import FeatureRunners

log = logging.getLogger("m3dm.trainer")

WEIGHT_FILES = {
    "dino_vitb8": "dino_vitbase8_pretrain.pth",
    "dinov2_vitb14": "dinov2_vitb14_pretrain.pth",
    "point_mae": "pointmae_pretrain.pth",
}


@dataclass(frozen=True)
class WeightPaths:
    """Where the official checkpoints are. Any field left None is looked up in `weights_dir`."""

    weights_dir: Path | None = None
    dino: Path | None = None
    dinov2: Path | None = None
    point_mae: Path | None = None

    def path_for(self, backbone: str) -> Path:
        explicit = {"dino_vitb8": self.dino, "dinov2_vitb14": self.dinov2, "point_mae": self.point_mae}[
            backbone
        ]
        if explicit is not None:
            return Path(explicit)
        base = self.weights_dir if self.weights_dir is not None else Path("weights")
        return Path(base) / WEIGHT_FILES[backbone]


def _rgb_module(preset: FeaturePreset, weights: WeightPaths, class_dir: Path | None = None):  # noqa: ANN202
    if preset.rgb_backbone == SITE_BACKBONE:
        from trainer.site.train import SITE_WEIGHTS, load_site

        if class_dir is None:
            raise ConfigError(
                f"preset {preset.name}: its rgb encoder is per class; give the class's model folder"
            )
        return load_site(Path(class_dir) / SITE_WEIGHTS)
    from trainer.checkpoints import load_dino, load_dinov2, random_init
    from trainer.models.vit import build_rgb_backbone

    model = build_rgb_backbone(preset.rgb_backbone)
    if preset.random_weights:
        random_init(model, seed=0)
    elif preset.rgb_backbone == "dino_vitb8":
        load_dino(model, weights.path_for("dino_vitb8"))
    else:
        load_dinov2(model, weights.path_for("dinov2_vitb14"))
    return model.eval()


def _point_module(preset: FeaturePreset, weights: WeightPaths):  # noqa: ANN202 - torch module
    from trainer.checkpoints import load_point_mae, random_init
    from trainer.models.point_mae import POINT_MAE_DIM, build_point_backbone

    layers = tuple(preset.point_layers)
    if preset.point_dim != POINT_MAE_DIM * len(layers):
        raise ConfigError(
            f"preset {preset.name}: point_dim {preset.point_dim} != {POINT_MAE_DIM} x {len(layers)} "
            f"point_layers {layers}"
        )
    try:
        model = build_point_backbone(preset.point_bn, layers)
    except ValueError as err:
        raise ConfigError(f"preset {preset.name}: {err}") from None
    if preset.random_weights:
        random_init(model, seed=1)
    else:
        load_point_mae(model, weights.path_for("point_mae"))
    return model.eval()


def check_weights_available(preset: FeaturePreset, weights: WeightPaths) -> None:
    """Fail early, before any data is read, when an official checkpoint file is missing."""
    if not preset.needs_weights:
        return
    for backbone in (preset.rgb_backbone, preset.point_backbone):
        if backbone == "free":
            continue
        path = weights.path_for(backbone)
        if not path.is_file():
            raise MissingWeightsError(
                f"preset {preset.name} needs the official {backbone} checkpoint at {path} "
                f"(file {WEIGHT_FILES[backbone]}; see README 'Official weights'). Pass --weights-dir or the "
                "per-backbone option, or use --preset m3dm-free."
            )


def build_feature_runners(
    preset: FeaturePreset, weights: WeightPaths, class_dir: Path | None = None
) -> FeatureRunners:
    """Torch runners for the networks of `preset`; None for weight-free modalities.

    class_dir: the class's model folder, needed by presets whose networks are trained per class (m3dm-site).
    """
    from trainer.torch_runner import TorchRunner

    if not preset.uses_networks:
        return FeatureRunners()
    check_weights_available(preset, weights)
    rgb = point = None
    if preset.rgb_backbone != "free":
        rgb = TorchRunner(_rgb_module(preset, weights, class_dir), ["image"], ["tokens"])
    if preset.point_backbone != "free":
        point = TorchRunner(_point_module(preset, weights), ["neighborhood", "centers"], ["group_features"])
    if preset.random_weights:
        log.warning("preset %s: RANDOM WEIGHTS - features are meaningless, for speed tests only", preset.name)
    return FeatureRunners(rgb=rgb, point=point)


def rgb_module_for_export(preset: FeaturePreset, weights: WeightPaths, class_dir: Path | None = None):  # noqa: ANN201
    """The eval-mode rgb network (for ONNX export); class_dir as for build_feature_runners."""
    if preset.rgb_backbone == "free":
        raise ConfigError(f"preset {preset.name} has no rgb network")
    return _rgb_module(preset, weights, class_dir)


def point_module_for_export(preset: FeaturePreset, weights: WeightPaths):  # noqa: ANN201
    """The eval-mode point network (for ONNX export)."""
    if preset.point_backbone == "free":
        raise ConfigError(f"preset {preset.name} has no point network")
    return _point_module(preset, weights)
