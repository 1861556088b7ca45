"""Envelope codec: typed message + binary blobs <-> one ZeroMQ multipart message, strictly checked.

Frame layout:
  frame 0      msgpack header: a `protocol.messages.Message` struct, `{"type": ..., "v": ..., ...}`
  frame 1..n   raw blobs, referenced from the header by `Blob.frame` (maps, thumbnails, chunks)

`decode` never raises anything but `ProtocolError`: it checks the frame count and sizes first, then the
schema version, then the type against the union the caller accepts, then every field (msgspec), then that
each referenced blob exists and has the stated size. Sockets should also set `zmq.MAXMSGSIZE` to
`Limits.max_total_bytes` so an oversized message is dropped before it is even buffered.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from protocol.messages import PROTOCOL_VERSION, Blob, MapMeta, Message

__all__ = [
    "DEFAULT_LIMITS",
    "Limits",
    "ProtocolError",
    "blob_bytes",
    "check_map_meta",
    "decode",
    "dequantise_map",
    "encode",
    "quantise_map",
]


class ProtocolError(Exception):
    """A malformed, oversized, unknown or unsupported message. `code` is the ErrorReply code to send back."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")


@dataclass(frozen=True)
class Limits:
    """Size limits of one multipart message (bytes)."""

    max_header_bytes: int = 64 * 1024
    max_blob_bytes: int = 8 * 1024 * 1024
    max_total_bytes: int = 16 * 1024 * 1024
    max_frames: int = 8


DEFAULT_LIMITS = Limits()
_MAX_MAP_PIXELS = 4096 * 4096
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class _Head(msgspec.Struct):
    """Just enough of a header to check version and type before the full, strict decode."""

    v: int
    type: str


_encoder = msgspec.msgpack.Encoder()
_head_decoder = msgspec.msgpack.Decoder(_Head)
_decoders: dict[Any, msgspec.msgpack.Decoder] = {}


def encode(message: Message, blobs: Sequence[bytes | memoryview] = ()) -> list[bytes | memoryview]:
    """[header, *blobs]; the header's Blob references must point at these blobs (1-based)."""
    return [_encoder.encode(message), *blobs]


def _decoder_for(accept: Any) -> msgspec.msgpack.Decoder:
    decoder = _decoders.get(accept)
    if decoder is None:
        decoder = _decoders[accept] = msgspec.msgpack.Decoder(accept)
    return decoder


def _blob_refs(message: Any) -> list[Blob]:
    refs = []
    for name in message.__struct_fields__:
        value = getattr(message, name)
        if isinstance(value, Blob):
            refs.append(value)
        elif isinstance(value, MapMeta):
            refs.append(value.blob)
    return refs


def _frame_len(frame: Any) -> int:
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


def _checked_frames(frames: Sequence[Any], limits: Limits) -> list[bytes]:
    """Frame count and sizes, checked before any parsing."""
    if not frames:
        raise ProtocolError("bad_message", "empty message")
    if len(frames) > limits.max_frames:
        raise ProtocolError("too_large", f"{len(frames)} frames > {limits.max_frames}")
    raw = [bytes(getattr(f, "buffer", f)) for f in frames]
    total = sum(len(f) for f in raw)
    if total > limits.max_total_bytes:
        raise ProtocolError("too_large", f"message of {total} bytes > {limits.max_total_bytes}")
    if len(raw[0]) > limits.max_header_bytes:
        raise ProtocolError("too_large", f"header of {len(raw[0])} bytes > {limits.max_header_bytes}")
    for blob in raw[1:]:
        if len(blob) > limits.max_blob_bytes:
            raise ProtocolError("too_large", f"blob of {len(blob)} bytes > {limits.max_blob_bytes}")
    return raw


def decode(frames: Sequence[Any], accept: Any, limits: Limits = DEFAULT_LIMITS) -> tuple[Any, list[bytes]]:
    """Strictly decode one multipart message into (message, blobs).

    accept: the message type or `Union[...]` of types this endpoint takes; anything else is refused.
    frames may be bytes, memoryviews or zmq Frames (anything with the buffer protocol).
    """
    raw = _checked_frames(frames, limits)
    try:
        head = _head_decoder.decode(raw[0])
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise ProtocolError("bad_message", f"header is not a message: {err}") from None
    if head.v != PROTOCOL_VERSION:
        raise ProtocolError(
            "unsupported_version", f"schema version {head.v}; this end speaks {PROTOCOL_VERSION}"
        )
    try:
        message = _decoder_for(accept).decode(raw[0])
    except msgspec.ValidationError as err:
        raise ProtocolError("bad_message", f"{head.type}: {err}") from None
    except msgspec.DecodeError as err:
        raise ProtocolError("bad_message", f"undecodable header: {err}") from None
    blobs = raw[1:]
    for ref in _blob_refs(message):
        if not 1 <= ref.frame <= len(blobs):
            raise ProtocolError("bad_message", f"blob reference to missing frame {ref.frame}")
        if len(blobs[ref.frame - 1]) != ref.size_bytes:
            raise ProtocolError("bad_message", f"frame {ref.frame} is not {ref.size_bytes} bytes")
    return message, blobs


def blob_bytes(blobs: Sequence[bytes], ref: Blob) -> bytes:
    """The bytes a (checked) Blob reference points at."""
    return blobs[ref.frame - 1]


def quantise_map(map_hw: np.ndarray, frame: int) -> tuple[MapMeta, bytes]:
    """A float anomaly map -> (MapMeta, zlib'd uint8 bytes): min..max mapped to 0..255 (max error scale/2)."""
    values = np.asarray(map_hw, dtype=np.float32)
    if values.ndim != 2 or not np.isfinite(values).all():
        raise ValueError(f"anomaly map must be a finite 2-D array, got shape {values.shape}")
    lo, hi = float(values.min()), float(values.max())
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    q = np.clip(np.rint((values - lo) / scale), 0, 255).astype(np.uint8)
    payload = zlib.compress(q.tobytes(), 6)
    blob = Blob(frame=frame, codec="u8-zlib", size_bytes=len(payload))
    return MapMeta(height=values.shape[0], width=values.shape[1], offset=lo, scale=scale, blob=blob), payload


def check_map_meta(meta: MapMeta) -> None:
    """Refuse a map header no station writes: a side <= 0 (-2 x -2 is 4 pixels), too many pixels, or an
    offset/scale that makes any code non-finite in float32 (a NaN heatmap poisons every view of it)."""
    if not (0 < meta.height and 0 < meta.width and meta.height * meta.width <= _MAX_MAP_PIXELS):
        raise ProtocolError("bad_message", f"anomaly map of {meta.height}x{meta.width} is out of range")
    top = abs(meta.offset) + 255.0 * abs(meta.scale)
    if not (math.isfinite(meta.offset) and math.isfinite(meta.scale) and top < _FLOAT32_MAX):
        raise ProtocolError("bad_message", f"map offset {meta.offset}, scale {meta.scale}: not finite")


def dequantise_map(meta: MapMeta, payload: bytes) -> np.ndarray:
    """(height, width) float32 map back from `quantise_map` output; a corrupt payload raises ProtocolError."""
    check_map_meta(meta)
    pixels = meta.height * meta.width
    try:
        # max_length bounds the output: a tiny payload must not inflate into gigabytes.
        inflater = zlib.decompressobj()
        raw = inflater.decompress(payload, pixels + 1)
    except zlib.error as err:
        raise ProtocolError("bad_message", f"anomaly map does not decompress: {err}") from None
    if not inflater.eof:  # a cut stream can still yield every pixel; only the end marks it complete
        raise ProtocolError("bad_message", "anomaly map payload is truncated")
    if len(raw) != pixels:
        raise ProtocolError("bad_message", "anomaly map has the wrong number of pixels")
    q = np.frombuffer(raw, dtype=np.uint8).reshape(meta.height, meta.width)
    return (meta.offset + q.astype(np.float32) * np.float32(meta.scale)).astype(np.float32)
