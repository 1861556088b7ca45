"""The wire messages every role shares, as typed msgspec structs (schema version `PROTOCOL_VERSION`).

A message travels as one ZeroMQ multipart message (see `protocol.frames`): frame 0 is the msgpack header,
a struct below tagged by its `type` field; frames 1.. are raw binary blobs (anomaly maps, thumbnails, bundle
chunks) that the header references by index through `Blob`. Arrays never go inside the header.

Flows:
  station -> collector   InspectionResult, Heartbeat, StationEvent
  collector -> station   Ack (cumulative per boot epoch), Heartbeat, ErrorReply
Deploy messages (station <-> registry) live in `protocol.deploy_messages` on the same envelope.

Identity of a result is (station_id, epoch, seq): `epoch` is fixed per station boot (a restart opens a new
one, unless the station resumes its outbox's epoch), `seq` counts up from 1 within it without gaps.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "DECISIONS",
    "PROTOCOL_VERSION",
    "Ack",
    "Blob",
    "Decision",
    "ErrorReply",
    "Heartbeat",
    "InspectionResult",
    "MapMeta",
    "Message",
    "StationEvent",
]

PROTOCOL_VERSION = 1

Decision = Literal["OK", "NOK", "ERROR"]
DECISIONS: tuple[str, ...] = ("OK", "NOK", "ERROR")


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", forbid_unknown_fields=True):
    """Base of every wire message: the schema version travels in every header as `v`."""

    v: int = PROTOCOL_VERSION


class Blob(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A reference from the header to binary frame `frame` (1-based: frame 0 is the header).

    codec: "u8-zlib" (quantised map, zlib), "jpeg", "png", or "raw".
    """

    frame: int
    codec: str
    size_bytes: int
    sha256: str = ""


class MapMeta(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a float anomaly map was quantised to uint8: value = offset + q * scale, shape (height, width)."""

    height: int
    width: int
    offset: float
    scale: float
    blob: Blob


class InspectionResult(Message, frozen=True, tag="result"):
    """One scored (or failed) frame. `image_score` and `threshold` are None for an ERROR.

    Times are Unix seconds (float, the station's wall clock); latencies are milliseconds per stage
    (capture, preprocess, features, score, decide, total). `bank_scores` maps bank name -> raw image score.
    `threshold_version` is 0 for the bundle's own threshold, else the runtime policy version that set it.
    """

    station_id: str
    epoch: int
    seq: int
    frame_id: str
    capture_ts: float
    decision_ts: float
    bundle_id: str
    bundle_version: str
    variant: str
    decision: Decision
    image_score: float | None = None
    bank_scores: dict[str, float] = {}
    threshold: float | None = None
    threshold_version: int = 0
    latency_ms: dict[str, float] = {}
    error_reason: str | None = None
    error_file: str | None = None
    shadow: bool = False
    anomaly_map: MapMeta | None = None
    thumbnail: Blob | None = None
    labels: dict[str, str] = {}  # free-form context: lot, recipe, part serial, source file


class Heartbeat(Message, frozen=True, tag="heartbeat"):
    """Liveness, both ways. A station sends its health; the collector answers with its own."""

    sender: str
    epoch: int
    ts: float
    bundle_id: str = ""
    bundle_version: str = ""
    fps: float = 0.0
    outbox_depth: int = 0
    dropped: int = 0
    health: dict[str, float] = {}


class StationEvent(Message, frozen=True, tag="event"):
    """Something that happened on a station (bundle_loaded, update_failed, source_ended, ...).

    `event_id` (uuid4 hex) makes delivery idempotent: events are resent until acked, like results.
    """

    station_id: str
    epoch: int
    event_id: str
    ts: float
    kind: str
    bundle_id: str = ""
    bundle_version: str = ""
    detail: dict[str, str] = {}


class Ack(Message, frozen=True, tag="ack"):
    """From the collector after the transaction holding these results committed.

    Every result of `epoch` with seq <= `upto_seq` is stored (cumulative); `seqs` lists stored seqs
    above it (out of order); `event_ids` lists stored events.
    """

    epoch: int
    upto_seq: int
    seqs: tuple[int, ...] = ()
    event_ids: tuple[str, ...] = ()


class ErrorReply(Message, frozen=True, tag="error"):
    """A refused message. `code`: bad_message | unsupported_version | too_large | not_allowed | internal."""

    code: str
    reason: str
    ref_epoch: int | None = None
    ref_seq: int | None = None
