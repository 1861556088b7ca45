"""Every wire message survives encode -> decode unchanged, and the schema refuses what it does not know."""

from __future__ import annotations

import msgspec
import pytest
from wire_samples import ALL_MESSAGES, samples

from protocol.frames import ProtocolError, blob_bytes, decode, dequantise_map, encode
from protocol.messages import PROTOCOL_VERSION, Ack, Heartbeat, InspectionResult


@pytest.mark.parametrize("sample", samples(), ids=lambda s: type(s[0]).__name__)
def test_every_message_round_trips(sample) -> None:
    message, blobs = sample
    frames = encode(message, blobs)
    assert len(frames) == 1 + len(blobs)
    decoded, got_blobs = decode(frames, ALL_MESSAGES)
    assert decoded == message and type(decoded) is type(message)
    assert got_blobs == blobs


def test_header_carries_version_and_type_tag() -> None:
    header = msgspec.msgpack.decode(encode(Ack(epoch=3, upto_seq=9))[0])
    assert header["v"] == PROTOCOL_VERSION and header["type"] == "ack"


def test_anomaly_map_and_thumbnail_come_back_from_their_frames() -> None:
    message, blobs = samples()[0]
    decoded, got = decode(encode(message, blobs), InspectionResult)
    restored = dequantise_map(decoded.anomaly_map, blob_bytes(got, decoded.anomaly_map.blob))
    assert restored.shape == (56, 56)
    assert abs(float(restored.max()) - 3.0) <= decoded.anomaly_map.scale / 2 + 1e-6
    assert blob_bytes(got, decoded.thumbnail) == blobs[1]


def _raw(doc: dict) -> list[bytes]:
    return [msgspec.msgpack.encode(doc)]


def test_unknown_version_is_refused_with_a_reason() -> None:
    doc = msgspec.to_builtins(Ack(epoch=1, upto_seq=1)) | {"v": PROTOCOL_VERSION + 1, "type": "ack"}
    with pytest.raises(
        ProtocolError, match="unsupported_version: schema version 2; this end speaks 1"
    ) as err:
        decode(_raw(doc), Ack)
    assert err.value.code == "unsupported_version" and str(PROTOCOL_VERSION + 1) in err.value.reason


@pytest.mark.parametrize(
    "doc",
    [
        {"v": PROTOCOL_VERSION, "type": "teleport", "epoch": 1},  # unknown type
        {"v": PROTOCOL_VERSION, "type": "ack", "epoch": 1, "upto_seq": 1, "colour": "red"},  # unknown field
        {"v": PROTOCOL_VERSION, "type": "ack", "epoch": "one", "upto_seq": 1},  # wrong field type
        {"v": PROTOCOL_VERSION, "type": "ack", "upto_seq": 1},  # missing field
        {"v": PROTOCOL_VERSION, "type": "result", "station_id": "s"},  # incomplete result
    ],
    ids=["unknown-type", "unknown-field", "wrong-type", "missing-field", "incomplete"],
)
def test_bad_headers_are_refused_as_bad_message(doc: dict) -> None:
    with pytest.raises(ProtocolError, match="^bad_message: ") as err:
        decode(_raw(doc), ALL_MESSAGES)
    assert err.value.code == "bad_message"


def test_a_type_this_endpoint_does_not_accept_is_refused() -> None:
    frames = encode(Heartbeat(sender="s", epoch=1, ts=1.0))
    with pytest.raises(ProtocolError, match="bad_message: heartbeat: Invalid value 'heartbeat'") as err:
        decode(frames, Ack)  # a station takes acks, not heartbeats-as-results
    assert err.value.code == "bad_message"


def test_decision_outside_ok_nok_error_is_refused() -> None:
    message, blobs = samples()[1]
    doc = msgspec.to_builtins(message) | {"decision": "MAYBE"}
    with pytest.raises(ProtocolError, match="bad_message: result: Invalid enum value 'MAYBE'"):
        decode(_raw(doc), InspectionResult)
