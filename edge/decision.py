"""Scores -> decision -> the `InspectionResult` (and its binary blobs) a station sends.

`epoch` and `seq` are left 0 here: the outbox assigns (station_id, epoch, seq) when it stores a result,
so numbering is contiguous in the order results become durable. Blobs: the anomaly map (uint8-quantised,
zlib; every NOK and 1 in n OK) and a small JPEG thumbnail of the capture (every NOK).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from core.model import FrameScores
from edge.model_slot import SlotState
from edge.sources import Frame
from protocol.frames import quantise_map
from protocol.messages import Blob, InspectionResult

__all__ = ["ResultOptions", "decide", "error_result", "scored_result", "thumbnail_jpeg"]


@dataclass(frozen=True)
class ResultOptions:
    station_id: str
    thumbnail_px: int = 128  # longest side of the NOK thumbnail; 0 = none
    thumbnail_quality: int = 80


def decide(image_score: float, threshold: float) -> str:
    """NOK when the image score is above the threshold (as the manifest defines it)."""
    return "NOK" if image_score > threshold else "OK"


def thumbnail_jpeg(rgb_hwc_u8: np.ndarray, longest_px: int, quality: int) -> bytes:
    img = Image.fromarray(np.ascontiguousarray(rgb_hwc_u8))
    img.thumbnail((longest_px, longest_px), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _labels(frame: Frame) -> dict[str, str]:
    return {"source_file": frame.source_file}


def scored_result(
    frame: Frame,
    state: SlotState,
    scores: FrameScores,
    latency_ms: dict[str, float],
    opts: ResultOptions,
    with_map: bool,
    shadow: bool = False,
) -> tuple[InspectionResult, list[bytes]]:
    """The result of a scored frame. with_map: attach the map even if OK (the 1-in-n sample)."""
    model, variant = state.model, state.variant
    score = float(scores.image[variant])
    decision = decide(score, state.threshold)
    blobs: list[bytes] = []
    map_meta = thumb = None
    map_hw = scores.maps[variant]
    if (decision == "NOK" or with_map) and np.isfinite(map_hw).all():
        map_meta, payload = quantise_map(map_hw, frame=len(blobs) + 1)
        blobs.append(payload)
    if decision == "NOK" and opts.thumbnail_px > 0 and frame.raw is not None:
        jpeg = thumbnail_jpeg(frame.raw.rgb_hwc_u8, opts.thumbnail_px, opts.thumbnail_quality)
        blobs.append(jpeg)
        thumb = Blob(frame=len(blobs), codec="jpeg", size_bytes=len(jpeg))
    result = InspectionResult(
        station_id=opts.station_id,
        epoch=0,
        seq=0,
        frame_id=frame.frame_id,
        capture_ts=frame.capture_ts,
        decision_ts=time.time(),
        bundle_id=model.manifest.bundle_id,
        bundle_version=model.manifest.version,
        variant=variant,
        decision=decision,
        image_score=score,
        bank_scores={name: float(scores.bank_image[i]) for i, name in enumerate(scores.bank_names)},
        threshold=state.threshold,
        threshold_version=state.threshold_version,
        latency_ms=latency_ms,
        shadow=shadow,
        anomaly_map=map_meta,
        thumbnail=thumb,
        labels=_labels(frame),
    )
    return result, blobs


def error_result(
    frame: Frame,
    state: SlotState,
    reason: str,
    error_file: str,
    latency_ms: dict[str, float],
    opts: ResultOptions,
) -> InspectionResult:
    """An ERROR result: no score, the reason and the file at fault."""
    return InspectionResult(
        station_id=opts.station_id,
        epoch=0,
        seq=0,
        frame_id=frame.frame_id,
        capture_ts=frame.capture_ts,
        decision_ts=time.time(),
        bundle_id=state.model.manifest.bundle_id,
        bundle_version=state.model.manifest.version,
        variant=state.variant,
        decision="ERROR",
        threshold_version=state.threshold_version,
        latency_ms=latency_ms,
        error_reason=reason,
        error_file=error_file,
        labels=_labels(frame),
    )
