"""core.config: every validation bound at its edge, the presets' derived facts, and score_config_for."""

from __future__ import annotations

import pytest

from core.config import (
    IMAGE_RULES,
    LOCAL_NORM_KEYS,
    POINT_BN_MODES,
    PRESETS,
    SITE_BACKBONE,
    CoresetConfig,
    FeaturePreset,
    PreprocessConfig,
    ScoreConfig,
    check_backbones,
    get_preset,
    score_config_for,
)
from core.errors import ConfigError


def _preset(**changes: object) -> FeaturePreset:
    fields: dict[str, object] = {
        "name": "t",
        "rgb_backbone": "free",
        "point_backbone": "free",
        "rgb_input_size": 224,
        "rgb_dim": 3,
        "point_dim": 5,
    }
    return FeaturePreset(**(fields | changes))  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["image_size", "rgb_input_size"])
def test_preprocess_sizes_must_be_positive(field: str) -> None:
    assert getattr(PreprocessConfig(**{field: 1}), field) == 1  # the smallest size is accepted
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="^sizes must be positive$"):
            PreprocessConfig(**{field: bad})


@pytest.mark.parametrize("field", ["ransac_threshold_m", "plane_removal_m"])
def test_plane_thresholds_lie_strictly_between_0_and_1_metre(field: str) -> None:
    for ok in (1e-9, 0.5, 0.999):
        assert getattr(PreprocessConfig(**{field: ok}), field) == ok
    for bad in (0.0, -0.001, 1.0, 2.0):
        with pytest.raises(ConfigError, match=r"^plane thresholds are metres and must lie in \(0, 1\)$"):
            PreprocessConfig(**{field: bad})


def test_every_image_rule_and_local_key_is_accepted_and_others_refused() -> None:
    for rule in IMAGE_RULES:
        for key in LOCAL_NORM_KEYS:
            assert ScoreConfig(image_rule=rule, local_key=key).image_rule == rule
            assert _preset(image_rule=rule, image_local_key=key).image_local_key == key
    with pytest.raises(ConfigError, match=r"^image_rule must be one of \('max_patch', .*\), got 'max'$"):
        ScoreConfig(image_rule="max")
    with pytest.raises(ConfigError, match=r"^local_key must be one of \('row', 'position'\), got 'cell'$"):
        ScoreConfig(local_key="cell")
    with pytest.raises(ConfigError, match="^image_rule must be one of"):
        _preset(image_rule="mean")
    with pytest.raises(ConfigError, match="^local_key must be one of"):
        _preset(image_local_key="rows")


def test_topk_fraction_lies_in_the_half_open_unit_interval() -> None:
    assert ScoreConfig(topk_fraction=1.0).topk_fraction == 1.0
    assert _preset(image_topk_fraction=1e-6).image_topk_fraction == 1e-6
    for bad in (0.0, -0.5, 1.0001):
        with pytest.raises(ConfigError, match=rf"^topk_fraction must lie in \(0, 1\], got {bad}$"):
            ScoreConfig(topk_fraction=bad)
        with pytest.raises(ConfigError, match=r"^topk_fraction must lie in \(0, 1\]"):
            _preset(image_topk_fraction=bad)


def test_point_bn_modes() -> None:
    assert [_preset(point_bn=mode).point_bn for mode in POINT_BN_MODES] == ["batch", "stored"]
    with pytest.raises(ConfigError, match=r"^point_bn must be one of \('batch', 'stored'\), got 'train'$"):
        _preset(point_bn="train")


def test_fusion_dim_is_the_sum_of_both_modalities() -> None:
    assert _preset(rgb_dim=3, point_dim=5).fusion_dim == 8
    for preset in PRESETS.values():
        assert preset.fusion_dim == preset.rgb_dim + preset.point_dim


@pytest.mark.parametrize(
    ("rgb", "point", "networks"),
    [
        ("free", "free", False),
        ("dino_vitb8", "free", True),
        ("free", "point_mae", True),
        (SITE_BACKBONE, "free", True),
    ],
)
def test_uses_networks_when_either_backbone_is_not_free(rgb: str, point: str, networks: bool) -> None:
    assert _preset(rgb_backbone=rgb, point_backbone=point).uses_networks is networks


def test_get_preset_returns_the_named_preset_or_lists_the_known_ones() -> None:
    for name, preset in PRESETS.items():
        assert get_preset(name) is preset and preset.name == name
    assert get_preset("m3dm-free").uses_networks is False and get_preset("m3dm").uses_networks is True
    known = ", ".join(PRESETS)
    with pytest.raises(ConfigError, match=rf"^unknown preset 'm3dm-x'; known: {known}$") as caught:
        get_preset("m3dm-x")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize("field", ["rgb_fraction", "point_fraction", "fusion_fraction"])
def test_each_coreset_fraction_lies_in_the_half_open_unit_interval(field: str) -> None:
    assert getattr(CoresetConfig(**{field: 1.0}), field) == 1.0
    assert getattr(CoresetConfig(**{field: 1e-6}), field) == 1e-6
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ConfigError, match=r"^coreset fractions must lie in \(0, 1\]$"):
            CoresetConfig(**{field: bad})


def test_score_config_for_takes_the_rule_from_the_preset_and_the_rest_from_the_base() -> None:
    preset = _preset(image_rule="local_norm", image_topk_fraction=0.2, image_local_key="position")
    base = ScoreConfig(reweight_k=5, blur_sigma_px=2.0, output_size=112, rgb_lambda=0.3)
    got = score_config_for(preset, base)
    assert (got.image_rule, got.topk_fraction, got.local_key) == ("local_norm", 0.2, "position")
    assert (got.reweight_k, got.blur_sigma_px, got.output_size, got.rgb_lambda) == (5, 2.0, 112, 0.3)
    default = score_config_for(_preset(image_rule="topk_mean"))
    assert default == ScoreConfig(image_rule="topk_mean")


def test_every_preset_names_backbones_that_pass_the_station_check() -> None:
    for preset in PRESETS.values():
        check_backbones(preset.rgb_backbone, preset.point_backbone)


@pytest.mark.parametrize(
    ("rgb", "point", "message"),
    [
        ("site_cnn", "free", f"older input \\({SITE_BACKBONE} now\\): retrain"),
        ("site_cnn_v2", "free", "older input"),
        ("resnet18", "free", "unknown rgb backbone 'resnet18'; known: dino_vitb8"),
        ("free", "pointnet", "unknown point backbone 'pointnet'; known: free, point_mae"),
    ],
)
def test_backbones_this_code_does_not_run_are_refused_with_what_to_do(
    rgb: str, point: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        check_backbones(rgb, point)
