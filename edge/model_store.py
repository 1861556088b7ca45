"""Load a fitted model folder (`model.json` + `.npy` banks) into the station's FrameScorer. numpy only.

The same loader serves `m3dm eval --model` (trainer, torch UFF runner) and a station or `m3dm eval --bundle`
(ONNX Runtime UFF runner), so both score through one path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from core.config import FeaturePreset, PreprocessConfig, ScoreConfig
from core.errors import ConfigError, CorruptFileError
from core.fusion import LinearOneClassSVM, ScoreNormaliser
from core.model import BANKS, COMBINATIONS, FrameScorer
from core.runner import Runner
from core.scoring import MemoryBank

MODEL_FORMAT = "m3dm-model/1"


@dataclass(frozen=True)
class ModelInfo:
    """What a model folder says about itself (model.json), parsed into frozen configs."""

    root: Path
    class_name: str
    preset: FeaturePreset
    preprocess: PreprocessConfig
    score: ScoreConfig
    thresholds: dict[str, float]
    false_reject_rate: float
    raw: dict[str, Any]


def _dataclass_from(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
    return cls(**kwargs)


def read_model_json(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "model.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{model_dir} is not a model folder (no model.json)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"unreadable model.json: {err}", path) from None
    if raw.get("format") != MODEL_FORMAT:
        raise ConfigError(f"{path}: unsupported model format {raw.get('format')!r}, expected {MODEL_FORMAT}")
    return raw


def load_model_info(model_dir: Path) -> ModelInfo:
    raw = read_model_json(model_dir)
    return ModelInfo(
        root=Path(model_dir),
        class_name=raw["class_name"],
        preset=_dataclass_from(FeaturePreset, raw["preset"]),
        preprocess=_dataclass_from(PreprocessConfig, raw["preprocess"]),
        score=_dataclass_from(ScoreConfig, raw["score"]),
        thresholds={k: float(v) for k, v in raw.get("thresholds", {}).items()},
        false_reject_rate=float(raw.get("false_reject_rate", 0.01)),
        raw=raw,
    )


def load_array(path: Path) -> np.ndarray:
    """A .npy array, never unpickled."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CorruptFileError(f"unreadable array: {err}", path) from None


def load_banks(info: ModelInfo) -> dict[str, MemoryBank]:
    banks = {}
    for name in BANKS:
        spec = info.raw["banks"][name]
        banks[name] = MemoryBank(
            name=name,
            feats_mc=load_array(info.root / spec["file"]),
            grid=int(spec["grid"]),
            feat_mean_c=load_array(info.root / spec["mean_file"]),
            feat_scale=load_array(info.root / spec["scale_file"])
            if spec.get("scale_file")
            else float(spec["feat_scale"]),
        )
    return banks


def load_dlf(raw: dict[str, Any]) -> dict[str, tuple[LinearOneClassSVM, LinearOneClassSVM]]:
    return {
        variant: (
            LinearOneClassSVM(
                np.asarray(raw["dlf"][variant]["image"]["coef"]), raw["dlf"][variant]["image"]["offset"]
            ),
            LinearOneClassSVM(
                np.asarray(raw["dlf"][variant]["pixel"]["coef"]), raw["dlf"][variant]["pixel"]["offset"]
            ),
        )
        for variant in COMBINATIONS
    }


def load_normaliser(raw: dict[str, Any]) -> ScoreNormaliser | None:
    norm = raw.get("normaliser")
    if norm is None:
        return None
    return ScoreNormaliser(**{k: np.asarray(v, dtype=np.float64) for k, v in norm.items()})


def load_scorer(
    info: ModelInfo, uff: Runner | None, banks: dict[str, MemoryBank] | None = None
) -> FrameScorer:
    """The FrameScorer of a model folder. `uff` is None only for a model fitted without UFF."""
    if info.raw.get("uff") is not None and uff is None:
        raise ConfigError(f"model {info.root} was fitted with UFF; a UFF runner is required")
    return FrameScorer(
        banks=banks if banks is not None else load_banks(info),
        dlf=load_dlf(info.raw),
        normaliser=load_normaliser(info.raw),
        uff=uff,
        score_cfg=info.score,
    )
