"""One valid instance of every wire message in `protocol.messages`, with its blobs (tests and bench/fuzz)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from protocol.frames import quantise_map
from protocol.messages import Ack, Blob, ErrorReply, Heartbeat, InspectionResult, StationEvent

ALL_MESSAGES = InspectionResult | Heartbeat | StationEvent | Ack | ErrorReply


def nok_result() -> tuple[InspectionResult, list[bytes]]:
    """A NOK result carrying a quantised anomaly map (frame 1) and a JPEG-coded thumbnail (frame 2)."""
    meta, payload = quantise_map(np.linspace(0.0, 3.0, 56 * 56, dtype=np.float32).reshape(56, 56), frame=1)
    thumb = bytes(range(256)) * 4
    result = InspectionResult(
        station_id="st-1",
        epoch=1796170000,
        seq=42,
        frame_id="ring/test/crack/000",
        capture_ts=1796170000.25,
        decision_ts=1796170000.5,
        bundle_id="ring-free",
        bundle_version="1.2.3",
        variant="rgb+point+fusion",
        decision="NOK",
        image_score=3.5,
        bank_scores={"rgb": 1.0, "point": 2.0, "fusion": 0.5},
        threshold=2.5,
        threshold_version=3,
        latency_ms={"capture": 1.0, "preprocess": 5.0, "features": 40.0, "score": 9.0, "total": 60.0},
        shadow=False,
        anomaly_map=meta,
        thumbnail=Blob(frame=2, codec="jpeg", size_bytes=len(thumb)),
        labels={"lot": "L7"},
    )
    return result, [payload, thumb]


def samples() -> list[tuple[object, list[bytes]]]:
    """(message, blobs) for every message type, including an ERROR result naming its file."""
    error = InspectionResult(
        station_id="st-1",
        epoch=1,
        seq=1,
        frame_id="f0",
        capture_ts=1.0,
        decision_ts=2.0,
        bundle_id="b",
        bundle_version="1",
        variant="rgb+point+fusion",
        decision="ERROR",
        error_reason="truncated TIFF",
        error_file="/data/xyz/000.tiff",
    )
    return [
        nok_result(),
        (error, []),
        (
            Heartbeat(
                sender="st-1", epoch=1, ts=3.0, fps=12.5, outbox_depth=4, dropped=1, health={"rss_mb": 9.0}
            ),
            [],
        ),
        (StationEvent(station_id="st-1", epoch=1, event_id="ab" * 16, ts=4.0, kind="bundle_loaded"), []),
        (Ack(epoch=1, upto_seq=10, seqs=(12, 14), event_ids=("ab" * 16,)), []),
        (ErrorReply(code="bad_message", reason="no", ref_epoch=1, ref_seq=3), []),
    ]


# Any msgpack-encodable value, nested a little: what the fuzzers splice into real headers (bench and tests).
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
