"""The envelope codec: size limits, blob references, truncation, fuzzing, and the socket's own size limit."""

from __future__ import annotations

import time
import zlib

import msgspec
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire_samples import ALL_MESSAGES, nok_result, samples

from protocol.frames import Limits, ProtocolError, decode, dequantise_map, encode, quantise_map
from protocol.messages import Blob, Heartbeat, InspectionResult, MapMeta

SMALL = Limits(max_header_bytes=1024, max_blob_bytes=4096, max_total_bytes=6000, max_frames=3)


def _code(frames, limits: Limits = SMALL, accept=ALL_MESSAGES) -> str:
    with pytest.raises(ProtocolError, match=r"^[a-z_]+: ") as err:
        decode(frames, accept, limits)
    return err.value.code


def test_size_limits_refuse_before_parsing() -> None:
    beat = Heartbeat(sender="s", epoch=1, ts=1.0, health={f"k{i}": float(i) for i in range(200)})
    assert _code(encode(beat)) == "too_large"  # header over 1 KiB
    small = encode(Heartbeat(sender="s", epoch=1, ts=1.0))
    assert _code([*small, b"x" * 5000]) == "too_large"  # one blob over 4 KiB
    assert _code([*small, b"x" * 4000, b"y" * 4000]) == "too_large"  # total over 6000
    assert _code([*small, b"", b"", b""]) == "too_large"  # 4 frames > 3
    assert _code([]) == "bad_message"


def test_missing_or_wrong_size_blob_is_refused() -> None:
    message, blobs = nok_result()
    assert _code(encode(message, blobs[:1]), Limits()) == "bad_message"  # thumbnail frame 2 absent
    assert _code(encode(message, [blobs[0], blobs[1][:-1]]), Limits()) == "bad_message"  # wrong size
    bad_ref = msgspec.structs.replace(message, thumbnail=Blob(frame=0, codec="jpeg", size_bytes=0))
    assert _code(encode(bad_ref, blobs), Limits()) == "bad_message"  # frame 0 is the header


def test_every_truncation_of_every_header_is_refused() -> None:
    for message, blobs in samples():
        header = bytes(encode(message)[0])
        for cut in range(len(header)):
            with pytest.raises(ProtocolError, match="bad_message: header is not a message"):
                decode([header[:cut], *blobs], ALL_MESSAGES)


def test_corrupt_or_bomb_map_payloads_raise_protocol_error() -> None:
    meta, payload = quantise_map(np.ones((8, 8), np.float32), frame=1)
    with pytest.raises(ProtocolError, match="bad_message: anomaly map payload is truncated"):
        dequantise_map(meta, payload[:-3])
    bomb = zlib.compress(b"\0" * (8 * 1024 * 1024))  # 8 MiB of zeros in ~8 KiB
    with pytest.raises(ProtocolError, match="bad_message: anomaly map payload is truncated"):
        dequantise_map(MapMeta(height=8, width=8, offset=0, scale=1, blob=meta.blob), bomb)
    with pytest.raises(ProtocolError, match="bad_message: anomaly map of 1000000x1000000 is out of range"):
        dequantise_map(MapMeta(height=10**6, width=10**6, offset=0, scale=1, blob=meta.blob), payload)


def _valid_headers() -> list[bytes]:
    return [bytes(encode(m)[0]) for m, _ in samples()]


def _spliced(data: st.DataObject) -> list[bytes]:
    header = bytearray(data.draw(st.sampled_from(_valid_headers())))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, max(len(header) - 1, 0)))
        header[at : at + data.draw(st.integers(0, 4))] = data.draw(st.binary(max_size=6))
    return [bytes(header), *data.draw(st.lists(st.binary(max_size=64), max_size=3))]


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decode_raises_only_protocol_error_on_anything(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["bytes", "splice", "doc"]))
    if kind == "bytes":
        frames = data.draw(st.lists(st.binary(max_size=200), min_size=0, max_size=10))
    elif kind == "splice":
        frames = _spliced(data)
    else:
        doc = data.draw(st.dictionaries(st.text(max_size=10), msgpack_values, max_size=6))
        doc.update(
            data.draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "v": st.sampled_from([1, 2, "1"]),
                        "type": st.sampled_from(["result", "ack", "heartbeat", "event", "error", "x"]),
                    },
                )
            )
        )
        frames = [msgspec.msgpack.encode(doc)]
    try:
        message, blobs = decode(frames, ALL_MESSAGES)
    except ProtocolError as err:
        assert err.code in {"bad_message", "too_large", "unsupported_version"}
        return
    assert isinstance(message, ALL_MESSAGES.__args__)  # whatever decodes is a real, typed message


def test_oversized_message_is_dropped_by_the_socket_itself() -> None:
    """ZMQ_MAXMSGSIZE: the receiving socket drops the connection of a peer that sends too much; the message
    is never delivered to the application, and the server goes on serving."""
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    client = ctx.socket(zmq.DEALER)
    monitor = server.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        server.setsockopt(zmq.MAXMSGSIZE, 4096)
        server.setsockopt(zmq.LINGER, 0)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client.setsockopt(zmq.LINGER, 0)
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send_multipart(encode(Heartbeat(sender="s", epoch=1, ts=1.0)))
        assert server.poll(5000), "a small message must arrive"
        server.recv_multipart()

        client.send_multipart([*encode(Heartbeat(sender="s", epoch=1, ts=2.0)), b"x" * 10_000])
        assert monitor.poll(5000), "the server socket must drop the oversized peer's connection"
        assert not server.poll(300), "the oversized message must never reach the application"

        # The client reconnects on its own; the server still takes small messages.
        deadline = time.monotonic() + 5
        got = None
        while got is None and time.monotonic() < deadline:
            client.send_multipart(encode(Heartbeat(sender="s", epoch=1, ts=3.0)))
            if server.poll(200):
                got = decode(server.recv_multipart()[1:], Heartbeat)[0]
        assert got is not None and got.ts == 3.0
    finally:
        monitor.close(linger=0)
        client.close(linger=0)
        server.close(linger=0)
        ctx.term()


def test_result_without_optional_parts_decodes_with_defaults() -> None:
    message, _ = samples()[1]
    decoded, blobs = decode(encode(message), InspectionResult)
    assert decoded.anomaly_map is None and decoded.thumbnail is None and blobs == []
    assert decoded.error_file == "/data/xyz/000.tiff"
