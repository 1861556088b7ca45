"""protocol/deploy_messages.py's wire contract: tags, what each end accepts, defaults an older peer relies on,
strict nested records, the chunk size against the envelope's limit, and the outcome vocabulary.

The module is declarations only (mutmut 3 finds nothing to mutate in it), so these pin the declarations
themselves; tests/reliability/test_deploy_decoder_fuzz.py fuzzes both decoders.
"""

from __future__ import annotations

import typing

import msgspec
import pytest

from protocol import deploy_messages as dm
from protocol.frames import DEFAULT_LIMITS, ProtocolError, decode, encode
from protocol.messages import PROTOCOL_VERSION, Blob, ErrorReply

OFFER = dm.BundleOffer(
    bundle_id="a" * 32,
    version="1.1.0",
    size_bytes=3,
    sha256="b" * 64,
    chunk_bytes=dm.CHUNK_BYTES,
    chunk_sha256=("c" * 64,),
)


def _raw(doc: dict) -> list[bytes]:
    return [msgspec.msgpack.encode(doc)]


def _header(message: msgspec.Struct) -> dict:
    return msgspec.msgpack.decode(encode(message)[0])


def test_each_message_travels_under_its_own_tag() -> None:
    tagged = [
        (dm.CheckIn(station_id="s", epoch=1, ts=1.0), "checkin"),
        (dm.CheckInReply(), "checkin_reply"),
        (dm.ChunkRequest(station_id="s", bundle_id="a" * 32, index=0), "chunk_request"),
        (dm.Chunk(bundle_id="a" * 32, index=0, offset=0, sha256="9" * 64, data=Blob(1, "raw", 0)), "chunk"),
        (
            dm.UpdateReport(station_id="s", epoch=1, ts=1.0, bundle_id="a" * 32, outcome="failed"),
            "update_report",
        ),
        (dm.DeployAck(bundle_id="a" * 32, outcome="installed"), "deploy_ack"),
    ]
    for message, tag in tagged:
        header = _header(message)
        assert (header["type"], header["v"]) == (tag, PROTOCOL_VERSION), type(message).__name__


def test_each_end_accepts_exactly_its_own_messages() -> None:
    assert set(typing.get_args(dm.registry_accepts)) == {dm.CheckIn, dm.ChunkRequest, dm.UpdateReport}
    assert set(typing.get_args(dm.station_accepts)) == {dm.CheckInReply, dm.Chunk, dm.DeployAck, ErrorReply}
    refusal = ErrorReply(code="not_allowed", reason="unknown station")
    assert decode(encode(refusal), dm.station_accepts)[0] == refusal  # a station must read the registry's no
    checkin = dm.CheckIn(station_id="s", epoch=1, ts=1.0)
    with pytest.raises(ProtocolError, match="^bad_message: checkin: ") as err:
        decode(encode(checkin), dm.station_accepts)
    assert err.value.code == "bad_message"


def test_every_update_outcome_is_a_valid_report_and_nothing_else_is() -> None:
    assert dm.UPDATE_OUTCOMES == typing.get_args(dm.UpdateOutcome)
    assert dm.UPDATE_OUTCOMES == (
        "installed",
        "failed",
        "deferred",
        "rolled_back",
        "shadow_loaded",
        "shadow_failed",
    )
    for outcome in dm.UPDATE_OUTCOMES:
        report = dm.UpdateReport(station_id="s", epoch=1, ts=1.0, bundle_id="a" * 32, outcome=outcome)
        assert decode(encode(report), dm.registry_accepts)[0] == report
    doc = _header(dm.UpdateReport(station_id="s", epoch=1, ts=1.0, bundle_id="a" * 32, outcome="failed"))
    with pytest.raises(ProtocolError, match="bad_message: update_report: Invalid enum value 'exploded'"):
        decode(_raw(doc | {"outcome": "exploded"}), dm.registry_accepts)


def test_a_full_chunk_fits_the_envelope_and_its_bytes_ride_in_a_blob_frame() -> None:
    assert dm.CHUNK_BYTES == 1024 * 1024
    assert dm.CHUNK_BYTES < DEFAULT_LIMITS.max_blob_bytes  # with room for the header
    data = bytes(range(256)) * (dm.CHUNK_BYTES // 256)
    chunk = dm.Chunk(
        bundle_id="a" * 32,
        index=3,
        offset=3 * dm.CHUNK_BYTES,
        sha256="9" * 64,
        data=Blob(1, "raw", len(data)),
    )
    frames = encode(chunk, [data])
    assert len(frames) == 2 and frames[1] == data and len(frames[0]) < 1024  # the header holds no bytes
    decoded, blobs = decode(frames, dm.station_accepts)
    assert decoded == chunk and blobs == [data]
    doc = _header(chunk) | {"data": "inline bytes"}
    with pytest.raises(ProtocolError, match="^bad_message: chunk: "):
        decode(_raw(doc), dm.station_accepts)


def test_what_an_omitted_field_means() -> None:
    """The defaults are what a peer that leaves a field out says: nothing locked, no wish, keep everything."""
    minimal = {"v": PROTOCOL_VERSION, "type": "checkin", "station_id": "s", "epoch": 1, "ts": 1.0}
    checkin = decode(_raw(minimal), dm.registry_accepts)[0]
    assert checkin == dm.CheckIn(station_id="s", epoch=1, ts=1.0)
    assert (checkin.tags, checkin.active_bundle_id, checkin.active_version) == ((), "", "")
    assert (checkin.previous_bundle_id, checkin.previous_version, checkin.shadow_bundle_id) == ("", "", "")
    assert (checkin.policy_version, checkin.locked, checkin.health) == (0, False, {})
    reply = decode(_raw({"v": PROTOCOL_VERSION, "type": "checkin_reply"}), dm.station_accepts)[0]
    assert (reply.bundle, reply.policy, reply.shadow) == (None, None, None)
    assert (reply.clear_shadow, reply.rollout_id, reply.checkin_s) == (False, "", 0.0)
    report = dm.UpdateReport(station_id="s", epoch=1, ts=1.0, bundle_id="a" * 32, outcome="deferred")
    assert (report.version, report.check, report.reason, report.rollout_id) == ("", "", "", "")
    assert (report.active_bundle_id, report.timings_ms) == ("", {})
    assert OFFER.anti_rollback_counter == 0
    assert dm.PolicySpec(version=2) == dm.PolicySpec(2, None, None, None)
    assert dm.ShadowSpec(offer=OFFER).sample_every_n == 1  # every frame, unless told otherwise


@pytest.mark.parametrize("part", ["bundle", "policy", "shadow", "shadow.offer"])
def test_an_unknown_field_inside_a_nested_record_is_refused(part: str) -> None:
    reply = dm.CheckInReply(bundle=OFFER, policy=dm.PolicySpec(version=1), shadow=dm.ShadowSpec(offer=OFFER))
    doc = _header(reply)
    target = doc
    *path, last = part.split(".")
    for key in path:
        target = target[key]
    target[last] = {**target[last], "colour": "red"}
    with pytest.raises(ProtocolError, match="^bad_message: checkin_reply: .*colour") as err:
        decode(_raw(doc), dm.station_accepts)
    assert err.value.code == "bad_message"


def test_records_are_frozen() -> None:
    for record, field in (
        (OFFER, "size_bytes"),
        (dm.PolicySpec(version=1), "threshold"),
        (dm.CheckInReply(), "bundle"),
    ):
        with pytest.raises(AttributeError, match="immutable type"):
            setattr(record, field, None)
    with pytest.raises(AttributeError, match="immutable type"):
        dm.ShadowSpec(offer=OFFER).sample_every_n = 5  # type: ignore[misc]
