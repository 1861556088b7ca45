"""Issue 13, bad input: fuzzing of the deploy wire messages, through both ends' decoders.

bench/fuzz_protocol.py fuzzes the collector's messages (results, heartbeats, events, acks). The registry
decodes `registry_accepts` (CheckIn, ChunkRequest, UpdateReport) from stations, and a station decodes
`station_accepts` (CheckInReply with its nested offer/policy/shadow, Chunk with its blob, DeployAck,
ErrorReply) from the registry. Property: for ANY multipart message, `protocol.frames.decode` returns a
message of that union or raises `ProtocolError`; nothing else escapes.

Cases come from the same four kinds as the collector's fuzzer (arbitrary frames, byte-spliced valid
headers, schema-level documents, one field replaced by any msgpack value), first from hypothesis, then
from a stdlib-random engine (much faster per case). Sizes from the environment: CI runs the defaults
(400 + 5,000), `just reliability` sets M3DM_DEPLOY_FUZZ_CASES=10000 and M3DM_DEPLOY_FUZZ_RANDOM_CASES=100000.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from reliability.figures import record
from wire_samples import msgpack_values

from protocol.deploy_messages import (
    BundleOffer,
    CheckIn,
    CheckInReply,
    Chunk,
    ChunkRequest,
    DeployAck,
    PolicySpec,
    ShadowSpec,
    UpdateReport,
    registry_accepts,
    station_accepts,
)
from protocol.frames import ProtocolError, decode, encode
from protocol.messages import Blob, ErrorReply

HYPOTHESIS_CASES = int(os.environ.get("M3DM_DEPLOY_FUZZ_CASES", "400"))
RANDOM_CASES = int(os.environ.get("M3DM_DEPLOY_FUZZ_RANDOM_CASES", "5000"))
ENDS = {"registry": registry_accepts, "station": station_accepts}


def _samples() -> list[tuple[Any, list[bytes]]]:
    """(message, blobs) for every deploy message type, every optional part filled in."""
    offer = BundleOffer(
        bundle_id="a" * 32,
        version="1.1.0",
        size_bytes=2_300_000,
        sha256="b" * 64,
        chunk_bytes=1024 * 1024,
        chunk_sha256=("c" * 64, "d" * 64, "e" * 64),
        anti_rollback_counter=2,
    )
    data = bytes(range(256)) * 8
    return [
        (
            CheckIn(
                station_id="st-1",
                epoch=1796170000,
                ts=1796170000.5,
                tags=("class=ring", "line=1"),
                active_bundle_id="f" * 32,
                active_version="1.0.0",
                previous_bundle_id="0" * 32,
                previous_version="0.9.0",
                policy_version=3,
                shadow_bundle_id="a" * 32,
                locked=True,
                health={"fps": 5.0, "outbox_depth": 2.0},
            ),
            [],
        ),
        (ChunkRequest(station_id="st-1", bundle_id="a" * 32, index=2), []),
        (
            UpdateReport(
                station_id="st-1",
                epoch=1796170000,
                ts=1796170001.0,
                bundle_id="a" * 32,
                outcome="failed",
                version="1.1.0",
                check="golden",
                reason="3 of 3 golden samples off",
                rollout_id="r" * 32,
                active_bundle_id="f" * 32,
                timings_ms={"download_ms": 120.0, "golden_ms": 800.0},
            ),
            [],
        ),
        (
            CheckInReply(
                bundle=offer,
                policy=PolicySpec(version=4, variant="rgb+point+fusion", threshold=0.7, map_every_n_ok=10),
                shadow=ShadowSpec(offer=offer, sample_every_n=3),
                clear_shadow=True,
                rollout_id="r" * 32,
                checkin_s=0.5,
            ),
            [],
        ),
        (
            Chunk(
                bundle_id="a" * 32,
                index=1,
                offset=1024 * 1024,
                sha256="9" * 64,
                data=Blob(frame=1, codec="raw", size_bytes=len(data)),
            ),
            [data],
        ),
        (DeployAck(bundle_id="a" * 32, outcome="installed"), []),
        (ErrorReply(code="bad_message", reason="header is not a message"), []),
    ]


SAMPLES = _samples()
HEADERS = [bytes(encode(m)[0]) for m, _ in SAMPLES]
DOCS = [msgspec.to_builtins(m) for m, _ in SAMPLES]
TYPES = sorted({d["type"] for d in DOCS}) + ["result", "x", 3]
LEAVES = [None, True, -1, 0, 2**64 - 1, -(2**63), 1e308, float("nan"), "", "x" * 9, b"\0" * 9, [], {}]


class Tally:
    def __init__(self) -> None:
        self.cases: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()

    def check(self, kind: str, frames: list[bytes]) -> None:
        """Decode `frames` at both ends; anything but a union member or a ProtocolError fails the test."""
        self.cases[kind] += 1
        for end, accept in ENDS.items():
            try:
                message, _ = decode(frames, accept)
            except ProtocolError as err:
                self.outcomes[f"{end}:{err.code}"] += 1
                continue
            assert isinstance(message, accept.__args__), (end, message)
            self.outcomes[f"{end}:decoded:{type(message).__name__}"] += 1


def _splice(header: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    out = bytearray(header)
    for at, cut, insert in edits:
        at %= max(len(out), 1)
        out[at : at + cut] = insert
    return bytes(out)


def _build(kind: str, data: st.DataObject) -> list[bytes]:
    if kind == "frames":
        return data.draw(st.lists(st.binary(max_size=300), max_size=10))
    which = data.draw(st.integers(0, len(SAMPLES) - 1))
    if kind == "splice":
        edits = data.draw(
            st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 6), st.binary(max_size=8)), min_size=1)
        )
        blobs = SAMPLES[which][1] if data.draw(st.booleans()) else data.draw(st.lists(st.binary(max_size=64)))
        return [_splice(HEADERS[which], edits[:4]), *blobs[:3]]
    if kind == "doc":
        doc = data.draw(st.dictionaries(st.text(max_size=12), msgpack_values, max_size=6))
        doc["v"] = data.draw(st.sampled_from([1, 1, 2, 0, -1, "1", None]))
        doc["type"] = data.draw(st.sampled_from(TYPES))
        return [msgspec.msgpack.encode(doc)]
    doc = dict(DOCS[which])
    doc[data.draw(st.sampled_from(sorted(doc)))] = data.draw(msgpack_values)
    return [msgspec.msgpack.encode(doc), *SAMPLES[which][1]]


def _random_frames(rng: random.Random, i: int) -> tuple[str, list[bytes]]:
    kind = ("r-splice", "r-mutate", "r-frames")[i % 3]
    which = rng.randrange(len(SAMPLES))
    if kind == "r-splice":
        edits = [
            (rng.randrange(10_000), rng.randint(0, 6), rng.randbytes(rng.randint(0, 8)))
            for _ in range(rng.randint(1, 4))
        ]
        return kind, [_splice(HEADERS[which], edits), *SAMPLES[which][1]]
    if kind == "r-mutate":
        doc = dict(DOCS[which])
        doc[rng.choice(sorted(doc))] = rng.choice(LEAVES)
        if rng.random() < 0.2:
            doc[rng.choice(["extra", "v", "type"])] = rng.choice(LEAVES)
        return kind, [msgspec.msgpack.encode(doc), *SAMPLES[which][1]]
    return kind, [rng.randbytes(rng.randint(0, 200)) for _ in range(rng.randint(0, 9))]


def _property(tally: Tally, kind: str, n: int) -> Any:
    @seed(0)
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def prop(data: st.DataObject) -> None:
        tally.check(kind, _build(kind, data))

    return prop


def test_every_deploy_sample_decodes_at_its_own_end_only() -> None:
    """The seeds are valid: each sample decodes to itself where it is meant to, and is refused elsewhere."""
    for message, blobs in SAMPLES:
        frames = encode(message, blobs)
        ends = [end for end, accept in ENDS.items() if isinstance(message, accept.__args__)]
        assert len(ends) == 1, message
        assert decode(frames, ENDS[ends[0]])[0] == message
        other = ENDS["station" if ends[0] == "registry" else "registry"]
        try:
            decode(frames, other)
        except ProtocolError as err:
            assert err.code == "bad_message"
        else:
            raise AssertionError(f"{type(message).__name__} decoded at the wrong end")


def test_deploy_decoders_raise_only_protocol_error_on_anything() -> None:
    tally = Tally()
    kinds = ("frames", "splice", "doc", "mutate")
    for kind in kinds:
        _property(tally, kind, max(HYPOTHESIS_CASES // len(kinds), 1))()
    rng = random.Random(0)
    for i in range(RANDOM_CASES):
        tally.check(*_random_frames(rng, i))
    total = sum(tally.cases.values())
    assert total >= HYPOTHESIS_CASES // 2 + RANDOM_CASES  # hypothesis may stop early on a small space
    decoded = {k for k in tally.outcomes if ":decoded:" in k}
    # the mutations are near enough to valid that every message type still decodes sometimes
    assert {k.rsplit(":", 1)[1] for k in decoded} >= {type(m).__name__ for m, _ in SAMPLES}
    record(
        "fuzz_deploy_decoders",
        cases=total,
        hypothesis_cases=HYPOTHESIS_CASES,
        random_cases=RANDOM_CASES,
        per_kind=dict(tally.cases),
        outcomes=dict(sorted(tally.outcomes.items())),
        escaped=0,
    )
