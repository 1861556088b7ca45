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

from protocol.frames import (
    Limits,
    ProtocolError,
    check_map_meta,
    decode,
    dequantise_map,
    encode,
    quantise_map,
)
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


def _error(frames, limits: Limits = SMALL, accept=ALL_MESSAGES) -> ProtocolError:
    with pytest.raises(ProtocolError, match=r"^[a-z_]+: ") as err:
        decode(frames, accept, limits)
    return err.value


def test_protocol_error_carries_code_and_reason_and_prints_both() -> None:
    err = ProtocolError("too_large", "header of 9 bytes > 8")
    assert (err.code, err.reason, str(err)) == (
        "too_large",
        "header of 9 bytes > 8",
        "too_large: header of 9 bytes > 8",
    )


def test_each_size_limit_takes_its_exact_value_and_refuses_one_more() -> None:
    header = bytes(encode(Heartbeat(sender="s", epoch=1, ts=1.0))[0])
    exact = Limits(
        max_header_bytes=len(header), max_blob_bytes=10, max_total_bytes=len(header) + 20, max_frames=3
    )
    message, blobs = decode([header, b"x" * 10, b"y" * 10], Heartbeat, exact)  # every limit met exactly
    assert message.ts == 1.0 and blobs == [b"x" * 10, b"y" * 10]
    cases = [
        ([header, b"", b"", b""], "4 frames > 3"),
        ([header, b"x" * 10, b"y" * 11], f"message of {len(header) + 21} bytes > {len(header) + 20}"),
        ([header + b"\x00", b"x" * 2], f"header of {len(header) + 1} bytes > {len(header)}"),
        ([header, b"x" * 11], "blob of 11 bytes > 10"),
    ]
    for frames, reason in cases:
        err = _error(frames, exact, Heartbeat)
        assert (err.code, err.reason) == ("too_large", reason)
    assert (_error([]).code, _error([]).reason) == ("bad_message", "empty message")


def test_memoryview_and_zmq_frames_decode_like_bytes() -> None:
    message, blobs = nok_result()
    frames = encode(message, blobs)
    as_views = [memoryview(bytes(f)) for f in frames]
    as_zmq = [zmq.Frame(bytes(f)) for f in frames]
    for variant in (as_views, as_zmq):
        decoded, got = decode(variant, ALL_MESSAGES, Limits())
        assert decoded == message and got == [bytes(b) for b in blobs]


def test_a_cold_decoder_cache_builds_one_strict_decoder_per_accepted_type(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The forked mutation workers (and a fresh station) start with an empty cache: the first decode builds it.
    import protocol.frames as frames

    monkeypatch.setattr(frames, "_decoders", {})
    beat = encode(Heartbeat(sender="s", epoch=1, ts=2.0))
    assert decode(beat, Heartbeat)[0].ts == 2.0
    cached = frames._decoders[Heartbeat]
    assert decode(beat, Heartbeat)[0].ts == 2.0 and frames._decoders[Heartbeat] is cached
    err = _error(beat, Limits(), InspectionResult)  # a cold decoder for another type is just as strict
    assert err.code == "bad_message" and err.reason.startswith("heartbeat: ")


def test_blob_reference_errors_name_the_frame() -> None:
    message, blobs = nok_result()
    missing = _error(encode(message, blobs[:1]), Limits())
    assert missing.reason == "blob reference to missing frame 2"
    short = _error(encode(message, [blobs[0], blobs[1][:-1]]), Limits())
    assert short.reason == f"frame 2 is not {len(blobs[1])} bytes"
    cut = _error([bytes(encode(message)[0])[:5]], Limits())
    assert cut.code == "bad_message" and cut.reason.startswith("header is not a message: ")


def test_quantised_map_round_trips_within_half_a_step() -> None:
    map_hw = np.linspace(-1.0, 3.0, 15, dtype=np.float64).reshape(3, 5)  # not square, lo != 0
    meta, payload = quantise_map(map_hw, frame=2)
    assert (meta.height, meta.width) == (3, 5)
    assert meta.offset == pytest.approx(-1.0) and meta.scale == pytest.approx(4.0 / 255.0)
    assert meta.blob == Blob(frame=2, codec="u8-zlib", size_bytes=len(payload))
    codes = np.frombuffer(zlib.decompress(payload), np.uint8)  # lo -> 0, hi -> 255, evenly between
    assert codes[0] == 0 and codes[-1] == 255 and (np.diff(codes.astype(int)) > 0).all()
    back = dequantise_map(meta, payload)
    assert back.dtype == np.float32 and back.shape == (3, 5)
    assert np.abs(back - map_hw).max() <= meta.scale / 2 + 1e-6
    assert back.min() == pytest.approx(-1.0, abs=1e-6) and back.max() == pytest.approx(3.0, abs=1e-5)


def test_a_constant_map_round_trips_exactly_with_unit_scale() -> None:
    meta, payload = quantise_map(np.full((4, 4), 2.5, np.float32), frame=1)
    assert meta.scale == 1.0 and meta.offset == 2.5
    np.testing.assert_array_equal(dequantise_map(meta, payload), np.full((4, 4), 2.5, np.float32))


@pytest.mark.parametrize(
    "bad", [np.zeros(4), np.zeros((2, 2, 2)), np.array([[0.0, np.nan]]), np.array([[np.inf]])]
)
def test_quantise_refuses_what_is_not_a_finite_2d_map(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"^anomaly map must be a finite 2-D array, got shape \("):
        quantise_map(bad, frame=1)


def _meta(height: int = 8, width: int = 8, offset: float = 0.0, scale: float = 1.0) -> MapMeta:
    return MapMeta(
        height=height,
        width=width,
        offset=offset,
        scale=scale,
        blob=Blob(frame=1, codec="u8-zlib", size_bytes=1),
    )


F32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize(
    "meta",
    [_meta(1, 1), _meta(1, 4096 * 4096), _meta(4096, 4096), _meta(offset=-5.0, scale=F32_MAX / 255.5)],
    ids=["1x1", "1xmax", "max-square", "top-just-under-float32-max"],
)
def test_map_headers_at_the_limits_are_accepted(meta: MapMeta) -> None:
    check_map_meta(meta)


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        (_meta(0, 8), "anomaly map of 0x8 is out of range"),
        (_meta(8, 0), "anomaly map of 8x0 is out of range"),
        (_meta(-2, -2), "anomaly map of -2x-2 is out of range"),
        (_meta(1, 4096 * 4096 + 1), "anomaly map of 1x16777217 is out of range"),
        (_meta(4097, 4096), "anomaly map of 4097x4096 is out of range"),
        (_meta(offset=float("nan")), "map offset nan, scale 1.0: not finite"),
        (_meta(scale=float("nan")), "map offset 0.0, scale nan: not finite"),
        (_meta(scale=float("inf")), "map offset 0.0, scale inf: not finite"),
        (_meta(scale=F32_MAX / 200), f"map offset 0.0, scale {F32_MAX / 200}: not finite"),
        (_meta(offset=-F32_MAX, scale=1.0), f"map offset {-F32_MAX}, scale 1.0: not finite"),
    ],
)
def test_map_headers_no_station_writes_are_refused(meta: MapMeta, reason: str) -> None:
    with pytest.raises(ProtocolError, match="^bad_message: ") as err:
        check_map_meta(meta)
    assert (err.value.code, err.value.reason) == ("bad_message", reason)


def test_dequantise_names_each_corruption() -> None:
    meta, payload = quantise_map(np.arange(64, dtype=np.float32).reshape(8, 8), frame=1)
    cases = [
        (payload[:-3], "anomaly map payload is truncated"),
        (zlib.compress(b"\0" * (8 * 1024 * 1024)), "anomaly map payload is truncated"),  # a bomb: cut at 65 B
        (zlib.compress(b"\0" * 10), "anomaly map has the wrong number of pixels"),
    ]
    for data, reason in cases:
        with pytest.raises(ProtocolError, match="^bad_message: anomaly map ") as err:
            dequantise_map(meta, data)
        assert (err.value.code, err.value.reason) == ("bad_message", reason)
    with pytest.raises(ProtocolError, match="^bad_message: anomaly map does not decompress: ") as err:
        dequantise_map(meta, b"not zlib at all")
    assert err.value.code == "bad_message" and err.value.reason.startswith(
        "anomaly map does not decompress: "
    )
