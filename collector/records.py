"""Wire message -> database rows: one `ResultRecord` per InspectionResult, built before the transaction.

The anomaly map travels as zlib'd uint8 codes (`protocol.frames.quantise_map`); it is stored as a grayscale
PNG of those same codes (lossless, viewable as is) with the offset/scale kept in the inspection row, so
`value = map_offset + pixel * map_scale` recovers the float map. The thumbnail is stored as sent (JPEG/PNG).
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol.frames import ProtocolError, blob_bytes, check_map_meta
from protocol.messages import Blob, InspectionResult, MapMeta

__all__ = ["ResultRecord", "codes_png", "map_png", "png_to_map", "result_record"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_THUMB_TYPES = {"jpeg": "image/jpeg", "jpg": "image/jpeg", "png": "image/png"}


@dataclass(frozen=True)
class ResultRecord:
    """An inspections row plus the blob rows it references (key -> (media type, bytes))."""

    row: dict[str, Any]
    blobs: dict[str, tuple[str, bytes]] = field(default_factory=dict)

    @property
    def identity(self) -> tuple[str, int, int]:
        return self.row["station_id"], self.row["epoch"], self.row["seq"]


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def codes_png(codes: np.ndarray) -> bytes:
    """8-bit grayscale PNG of a (height, width) uint8 array.

    Written directly (PNG filter "Sub" on every row, zlib level 1) rather than through Pillow's encoder,
    which tries filters per row: at ingest rates that was most of a map's cost (about 2x the time here for
    the same size). Any PNG reader (Pillow, browsers) reads it.
    """
    h, w = codes.shape
    rows = np.empty((h, w + 1), dtype=np.uint8)
    # filter type Sub: each byte minus its left neighbour (smooth maps -> runs of small values)
    rows[:, 0] = 1
    rows[:, 1] = codes[:, 0]
    np.subtract(codes[:, 1:], codes[:, :-1], out=rows[:, 2:])  # uint8 wrap-around is what PNG specifies
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit, grayscale, deflate, no interlace
    idat = zlib.compress(rows.tobytes(), 1)
    return _PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def map_png(meta: MapMeta, payload: bytes) -> bytes:
    """PNG (8-bit grayscale) of a quantised map's codes; a corrupt payload raises ProtocolError."""
    if meta.blob.codec != "u8-zlib":
        raise ProtocolError("bad_message", f"anomaly map codec {meta.blob.codec!r}; expected 'u8-zlib'")
    check_map_meta(meta)  # sides > 0, bounded pixel count, finite offset/scale
    pixels = meta.height * meta.width
    try:
        # max_length bounds the output: a tiny payload must not inflate into gigabytes.
        raw = zlib.decompressobj().decompress(payload, pixels + 1)
    except zlib.error as err:
        raise ProtocolError("bad_message", f"anomaly map does not decompress: {err}") from None
    if len(raw) != pixels:
        raise ProtocolError("bad_message", "anomaly map has the wrong number of pixels")
    return codes_png(np.frombuffer(raw, dtype=np.uint8).reshape(meta.height, meta.width))


def png_to_map(png: bytes, offset: float, scale: float) -> np.ndarray:
    """The float32 (height, width) map back from a stored PNG and its row's offset/scale."""
    from PIL import Image

    codes = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    return (np.float32(offset) + codes * np.float32(scale)).astype(np.float32)


def _thumb(ref: Blob, blobs: list[bytes]) -> tuple[str, bytes]:
    media = _THUMB_TYPES.get(ref.codec.lower())
    if media is None:
        raise ProtocolError("bad_message", f"thumbnail codec {ref.codec!r}; expected jpeg or png")
    return media, blob_bytes(blobs, ref)


def result_record(
    msg: InspectionResult, blobs: list[bytes], received_ts: float | None = None
) -> ResultRecord:
    """The row (every field of the message) and its blobs; blob references were checked by `decode`."""
    base = f"{msg.station_id}/{msg.epoch}/{msg.seq}"
    stored: dict[str, tuple[str, bytes]] = {}
    row: dict[str, Any] = {
        "station_id": msg.station_id,
        "epoch": msg.epoch,
        "seq": msg.seq,
        "frame_id": msg.frame_id,
        "capture_ts": msg.capture_ts,
        "decision_ts": msg.decision_ts,
        "received_ts": time.time() if received_ts is None else received_ts,
        "bundle_id": msg.bundle_id,
        "bundle_version": msg.bundle_version,
        "variant": msg.variant,
        "decision": msg.decision,
        "image_score": msg.image_score,
        "bank_scores": dict(msg.bank_scores),
        "threshold": msg.threshold,
        "threshold_version": msg.threshold_version,
        "latency_ms": dict(msg.latency_ms),
        "latency_total_ms": msg.latency_ms.get("total"),
        "error_reason": msg.error_reason,
        "error_file": msg.error_file,
        "shadow": msg.shadow,
        "labels": dict(msg.labels),
        "map_key": None,
        "map_height": None,
        "map_width": None,
        "map_offset": None,
        "map_scale": None,
        "thumb_key": None,
    }
    if msg.anomaly_map is not None:
        meta = msg.anomaly_map
        key = f"{base}/map.png"
        stored[key] = ("image/png", map_png(meta, blob_bytes(blobs, meta.blob)))
        row.update(map_key=key, map_height=meta.height, map_width=meta.width)
        row.update(map_offset=meta.offset, map_scale=meta.scale)
    if msg.thumbnail is not None:
        media, data = _thumb(msg.thumbnail, blobs)
        key = f"{base}/thumb.{'png' if media == 'image/png' else 'jpg'}"
        stored[key] = (media, data)
        row["thumb_key"] = key
    return ResultRecord(row=row, blobs=stored)
