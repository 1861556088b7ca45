"""Write a fitted model folder: model.json + draft manifest.json + .npy banks + UFF safetensors. No pickles.

Every write of model.json also rewrites the folder's draft manifest (`edge.model_store`), so the scoring facts
a station loads from a bundle and the ones `m3dm eval --model` loads come from the same schema.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np

from core.fusion import LinearOneClassSVM, ScoreNormaliser
from core.scoring import MemoryBank
from edge.model_store import MODEL_FORMAT, draft_manifest_from_model_json, write_draft_manifest


def bank_to_files(bank: MemoryBank, model_dir: Path) -> dict[str, Any]:
    (model_dir / "banks").mkdir(parents=True, exist_ok=True)
    feats_rel, mean_rel = f"banks/{bank.name}.npy", f"banks/{bank.name}_mean.npy"
    stats_rel = f"banks/{bank.name}_stats.npy"
    np.save(model_dir / feats_rel, np.asarray(bank.feats_mc, dtype=np.float32), allow_pickle=False)
    np.save(model_dir / mean_rel, bank.feat_mean_c, allow_pickle=False)
    scale = np.asarray(bank.feat_scale, dtype=np.float32)
    # The manifest's bank layout (as in a bundle): row 0 per-channel mean, row 1 per-channel scale.
    scale_c = np.broadcast_to(scale, bank.feat_mean_c.shape)
    np.save(
        model_dir / stats_rel, np.stack([bank.feat_mean_c, scale_c]).astype(np.float32), allow_pickle=False
    )
    scale_entry: dict[str, Any] = {"feat_scale": float(scale) if scale.ndim == 0 else None}
    if scale.ndim:
        scale_entry = {"feat_scale": None, "scale_file": f"banks/{bank.name}_scale.npy"}
        np.save(model_dir / scale_entry["scale_file"], scale, allow_pickle=False)
    if bank.local_scale_k is not None:  # the local_norm image-score rule's per-row / per-position scales
        scale_entry["local_scale_file"] = f"banks/{bank.name}_local_scale.npy"
        np.save(model_dir / scale_entry["local_scale_file"], bank.local_scale_k, allow_pickle=False)
    return {
        "file": feats_rel,
        "mean_file": mean_rel,
        "stats_file": stats_rel,
        **scale_entry,
        "grid": bank.grid,
        "rows": int(bank.feats_mc.shape[0]),
        "dim": bank.dim,
        "encoding": "fp32",
    }


def svm_to_dict(svm: LinearOneClassSVM) -> dict[str, Any]:
    return {"coef": svm.coef_f.tolist(), "offset": svm.offset}


def normaliser_to_dict(norm: ScoreNormaliser | None) -> dict[str, list[float]] | None:
    if norm is None:
        return None
    return {k: np.asarray(getattr(norm, k)).tolist() for k in norm._fields()}


def write_model_json(model_dir: Path, payload: dict[str, Any]) -> Path:
    payload = {"format": MODEL_FORMAT, **payload}
    path = model_dir / "model.json"
    tmp = path.with_suffix(".json.tmp")
    text = json.dumps(payload, indent=2, sort_keys=True, default=_json_default)
    tmp.write_text(text)
    tmp.replace(path)
    draft = draft_manifest_from_model_json(json.loads(text), package_version("m3dm-fleet"), platform.node())
    write_draft_manifest(model_dir, draft)
    return path


def _json_default(obj: object) -> object:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)  # type: ignore[arg-type]
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
