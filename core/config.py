"""Frozen configuration: preprocessing, feature presets, fitting and scoring. Validated on construction.

Model-side facts (sizes, normalisation, dims) travel in the bundle manifest built from these.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from core.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessConfig:
    """M3DM preprocessing (spec §2). Distances in metres."""

    image_size: int = 224  # xyz / mask / descriptor grid size
    rgb_input_size: int = 224  # 224 for ViT-B/8, 392 for DINOv2 ViT-B/14
    border_px: int = 10  # plane is fitted on points in the border strips
    ransac_threshold_m: float = 0.004
    ransac_n: int = 50
    ransac_iterations: int = 1000
    plane_removal_m: float = 0.005
    pad_multiple: int = 100  # pad to a square rounded up to this multiple
    keep_largest_cluster: bool = False
    cluster_eps_m: float = 0.006
    cluster_min_points: int = 30
    seed: int = 0
    rgb_mean: tuple[float, float, float] = IMAGENET_MEAN
    rgb_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.rgb_input_size <= 0:
            raise ConfigError("sizes must be positive")
        if not 0 < self.ransac_threshold_m < 1 or not 0 < self.plane_removal_m < 1:
            raise ConfigError("plane thresholds are metres and must lie in (0, 1)")


POINT_BN_MODES = ("batch", "stored")
# How a bank turns its patch distances into one image score (core.scoring.bank_image_score):
# "max_patch" PatchCore-reweighted max patch distance (M3DM, spec §6); "max_blurred_map" max of the blurred,
# upsampled map; "topk_mean" mean of the top `topk_fraction` of patch distances; "local_norm" max of each
# patch distance divided by the variability training normals show there (per nearest bank row, or per grid
# position), fitted by the trainer and shipped with the bank.
IMAGE_RULES = ("max_patch", "max_blurred_map", "topk_mean", "local_norm")
LOCAL_NORM_KEYS = ("row", "position")


def _check_image_rule(rule: str, topk_fraction: float, local_key: str) -> None:
    if rule not in IMAGE_RULES:
        raise ConfigError(f"image_rule must be one of {IMAGE_RULES}, got {rule!r}")
    if not 0 < topk_fraction <= 1:
        raise ConfigError(f"topk_fraction must lie in (0, 1], got {topk_fraction}")
    if local_key not in LOCAL_NORM_KEYS:
        raise ConfigError(f"local_key must be one of {LOCAL_NORM_KEYS}, got {local_key!r}")


@dataclass(frozen=True)
class FeaturePreset:
    """A named feature configuration. `rgb_backbone`/`point_backbone` select the extractor."""

    name: str
    rgb_backbone: str  # "dino_vitb8" | "dinov2_vitb14" | "free"
    point_backbone: str  # "point_mae" | "free"
    rgb_input_size: int
    rgb_dim: int
    point_dim: int
    rgb_grid: int = 28
    point_grid: int = 56
    num_groups: int = 1024
    group_size: int = 128
    point_layers: tuple[int, ...] = (3, 7, 11)
    needs_weights: bool = False
    random_weights: bool = False
    # "scalar": one std per bank (M3DM, network features share units); "per_dim": per-channel std, for
    # hand-made descriptors whose channels have unrelated units (measured: +0.11 I-AUROC for free rgb).
    bank_norm: str = "scalar"
    # Point-MAE BatchNorm: "batch" normalises each cloud by its own statistics over its G x K points, as the
    # original code does (it never calls eval(), and its published numbers come from that mode); "stored"
    # uses the checkpoint's running statistics (ShapeNet, unit-sphere data). Drop-path is off in both.
    point_bn: str = "stored"
    # The official preprocessing keeps the largest cluster of the cloud; on for the pretrained presets so a
    # raw MVTec 3D-AD scan is prepared as the published numbers assume (core.plane.keep_largest_cluster).
    largest_cluster: bool = False
    # The image-score rule of every bank (ScoreConfig.image_rule and its parameters), chosen per preset on
    # validation defects (bench/image_score_rules.py, BENCHMARKS.md "Image-score rule (issue 15)").
    image_rule: str = "max_patch"
    image_topk_fraction: float = 0.01
    image_local_key: str = "row"

    def __post_init__(self) -> None:
        if self.point_bn not in POINT_BN_MODES:
            raise ConfigError(f"point_bn must be one of {POINT_BN_MODES}, got {self.point_bn!r}")
        _check_image_rule(self.image_rule, self.image_topk_fraction, self.image_local_key)

    @property
    def fusion_dim(self) -> int:
        return self.rgb_dim + self.point_dim

    @property
    def uses_networks(self) -> bool:
        return self.rgb_backbone != "free" or self.point_backbone != "free"


# Dimensions of the weight-free descriptors (core/free_features.py owns their definition).
FREE_RGB_DIM = 35
FREE_POINT_DIM = 9

# `m3dm-site`: an rgb CNN trained per class on its own normals (trainer/site); stations run its ONNX graph.
# The id carries the version of its input (`core.features.site_network_input`): a CNN only means something
# on the input it was trained on, so a bundle of an older input names an id no station runs and is refused
# at load instead of being scored silently wrong. v1 (ImageNet-normalised scan) -> v2 (interior mean colour
# removed) -> v3 (background and rim filled from the interior, `statistics_mask`'s interior).
SITE_BACKBONE = "site_cnn_v3"
# Every backbone id a station can run; a manifest naming another is refused (`check_backbones`).
RGB_BACKBONES = frozenset({"free", "dino_vitb8", "dinov2_vitb14", SITE_BACKBONE})
POINT_BACKBONES = frozenset({"free", "point_mae"})
SITE_WIDTH = 32  # base channels of trainer.site.model.SiteEncoder
SITE_RGB_DIM = 7 * SITE_WIDTH  # its tokens: stride-4, -8 and -16 maps (1 + 2 + 4 widths) on the 28x28 grid

PRESETS: dict[str, FeaturePreset] = {
    "m3dm": FeaturePreset(
        "m3dm",
        "dino_vitb8",
        "point_mae",
        224,
        768,
        1152,
        needs_weights=True,
        point_bn="batch",
        largest_cluster=True,
    ),
    "m3dm-v2": FeaturePreset(
        "m3dm-v2",
        "dinov2_vitb14",
        "point_mae",
        392,
        768,
        1152,
        needs_weights=True,
        point_bn="batch",
        largest_cluster=True,
    ),
    "m3dm-random": FeaturePreset(
        "m3dm-random", "dino_vitb8", "point_mae", 224, 768, 1152, random_weights=True, point_bn="batch"
    ),
    # Image rule: max of the blurred map. The reweighted max patch picks single-patch spikes of the point
    # descriptor's sensor noise on good scans; a defect is a blob of several patches, which the blur keeps
    # (chosen on validation defects of both families, BENCHMARKS.md "Image-score rule (issue 15)").
    "m3dm-free": FeaturePreset(
        "m3dm-free",
        "free",
        "free",
        224,
        FREE_RGB_DIM,
        FREE_POINT_DIM,
        bank_norm="per_dim",
        image_rule="max_blurred_map",
    ),
    # Learned rgb features from the class's training normals, the weight-free point descriptor; per-channel
    # bank norm because the point half keeps its mixed units. Image rule: max of the blurred map, as for
    # m3dm-free: best on both families' validation defects together with the 2400-step encoder, where the
    # local_norm rules that led on family A alone fell to last on family B (BENCHMARKS.md, "m3dm-site: image
    # rule on both families' validation defects").
    "m3dm-site": FeaturePreset(
        "m3dm-site",
        SITE_BACKBONE,
        "free",
        224,
        SITE_RGB_DIM,
        FREE_POINT_DIM,
        bank_norm="per_dim",
        image_rule="max_blurred_map",
    ),
}


def check_backbones(rgb_backbone: str, point_backbone: str) -> None:
    """ConfigError unless both ids are ones this code runs; a stale site id says to retrain."""
    if rgb_backbone not in RGB_BACKBONES:
        stale = rgb_backbone.startswith("site_cnn")
        hint = (
            f"it is an m3dm-site model trained on an older input ({SITE_BACKBONE} now): retrain the class"
            if stale
            else f"known: {', '.join(sorted(RGB_BACKBONES))}"
        )
        raise ConfigError(f"unknown rgb backbone {rgb_backbone!r}; {hint}")
    if point_backbone not in POINT_BACKBONES:
        raise ConfigError(
            f"unknown point backbone {point_backbone!r}; known: {', '.join(sorted(POINT_BACKBONES))}"
        )


def get_preset(name: str) -> FeaturePreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class CoresetConfig:
    """Greedy k-centre coreset per bank, each sized from its own row count."""

    rgb_fraction: float = 0.1
    point_fraction: float = 0.1
    fusion_fraction: float = 0.1
    projection_eps: float = 0.9
    # Optional cap on every bank's rows (`--max-bank-rows`); None keeps the method's fractions. The
    # trainer warns when it binds; it is recorded in model.json and the bundle's training config.
    max_rows: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for f in (self.rgb_fraction, self.point_fraction, self.fusion_fraction):
            if not 0 < f <= 1:
                raise ConfigError("coreset fractions must lie in (0, 1]")


@dataclass(frozen=True)
class UFFConfig:
    """Unsupervised feature fusion training (spec §7)."""

    mlp_ratio: int = 4
    head_dim: int = 256
    temperature: float = 1.0
    lr: float = 0.003
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    epochs: int = 3
    warmup_epochs: int = 1
    min_steps: int = 60  # per-class data sets are small; see trainer/train_uff.py
    batch_images: int = 16
    max_patches_per_step: int = 4096
    seed: int = 0


@dataclass(frozen=True)
class ScoreConfig:
    """Per-bank scoring (spec §6): PatchCore reweighting and map smoothing, and the image-score rule."""

    reweight_k: int = 3
    blur_sigma_px: float = 4.0
    output_size: int = 224
    rgb_lambda: float = 0.1
    image_rule: str = "max_patch"
    topk_fraction: float = 0.01  # used by "topk_mean": share of the g·g patches averaged
    local_key: str = "row"  # used by "local_norm": what the training variability is indexed by

    def __post_init__(self) -> None:
        _check_image_rule(self.image_rule, self.topk_fraction, self.local_key)


def score_config_for(preset: FeaturePreset, base: ScoreConfig | None = None) -> ScoreConfig:
    """`base` (default ScoreConfig()) with the preset's image-score rule."""
    return replace(
        base or ScoreConfig(),
        image_rule=preset.image_rule,
        topk_fraction=preset.image_topk_fraction,
        local_key=preset.image_local_key,
    )


@dataclass(frozen=True)
class DLFConfig:
    """Decision-layer fusion one-class SVMs (spec §8)."""

    nu: float = 0.5
    max_iter: int = 1000
    seed: int = 42
    pixel_samples_per_image: int = 4096


@dataclass(frozen=True)
class FitConfig:
    """Everything `m3dm train` needs, composed once at the CLI."""

    preset: FeaturePreset
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    coreset: CoresetConfig = field(default_factory=CoresetConfig)
    uff: UFFConfig = field(default_factory=UFFConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    dlf: DLFConfig = field(default_factory=DLFConfig)
    false_reject_rate: float = 0.01
    seed: int = 0
