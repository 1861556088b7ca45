"""Property-based fuzzing of the wire decoder, `protocol.frames.decode` (and `dequantise_map`).

Every role decodes frames that come off the network, so the decoder sees attacker bytes. Property: for ANY
multipart message it returns a typed message from the accepted union or raises `ProtocolError`
(bad_message / too_large / unsupported_version); no other exception escapes. Anomaly-map payloads that
decoded go through `dequantise_map` too (same property).

Strategies sharing the case budget:
  frames   arbitrary lists of binary frames;
  splice   a valid header of every message type with byte edits, plus random blob frames;
  doc      arbitrary msgpack documents with plausible `v`/`type` keys (schema-level attacks);
  mutate   a valid message with one field replaced by any msgpack value (type confusion), blobs kept.

Hypothesis drives `--cases` (default 10 000, it is slow per case); a plain `random` engine then runs
`--random-cases` more (default 100 000) of the splice / mutate / frames kinds at a few thousand per second.

Usage: python bench/fuzz_protocol.py [--cases 10000] [--random-cases 100000] [--seed 0] [--json-out F]
Prints the number of cases per strategy and the outcome counts; exit 0 when nothing escaped, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import msgspec
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from wire_samples import ALL_MESSAGES, msgpack_values, samples  # noqa: E402

from protocol.frames import ProtocolError, blob_bytes, decode, dequantise_map, encode  # noqa: E402
from protocol.messages import InspectionResult  # noqa: E402

STRATEGIES = ("frames", "splice", "doc", "mutate")
SAMPLES = samples()
HEADERS = [bytes(encode(m)[0]) for m, _ in SAMPLES]
DOCS = [msgspec.to_builtins(m) for m, _ in SAMPLES]


class Tally:
    def __init__(self) -> None:
        self.cases: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.escaped: list[str] = []

    def check(self, strategy: str, frames: list[bytes]) -> None:
        self.cases[strategy] += 1
        try:
            message, blobs = decode(frames, ALL_MESSAGES)
            if isinstance(message, InspectionResult) and message.anomaly_map is not None:
                dequantise_map(message.anomaly_map, blob_bytes(blobs, message.anomaly_map.blob))
        except ProtocolError as err:
            self.outcomes[err.code] += 1
            return
        except Exception as exc:  # the property: nothing else may escape
            self.escaped.append(f"{strategy}: {type(exc).__name__}: {exc} <- {[f[:80] for f in frames]!r}")
            raise
        assert isinstance(message, ALL_MESSAGES.__args__)
        self.outcomes[f"decoded:{type(message).__name__}"] += 1


def build(strategy: str, data: st.DataObject) -> list[bytes]:
    if strategy == "frames":
        return data.draw(st.lists(st.binary(max_size=300), max_size=10))
    if strategy == "splice":
        which = data.draw(st.integers(0, len(HEADERS) - 1))
        header = bytearray(HEADERS[which])
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(header) - 1))
            header[at : at + data.draw(st.integers(0, 6))] = data.draw(st.binary(max_size=8))
        blobs = (
            SAMPLES[which][1]
            if data.draw(st.booleans())
            else data.draw(st.lists(st.binary(max_size=64), max_size=3))
        )
        return [bytes(header), *blobs]
    if strategy == "doc":
        doc = data.draw(st.dictionaries(st.text(max_size=10), msgpack_values, max_size=6))
        doc["v"] = data.draw(st.sampled_from([1, 1, 2, 0, -1, "1", None]))
        doc["type"] = data.draw(st.sampled_from(["result", "ack", "heartbeat", "event", "error", "x", 3]))
        return [msgspec.msgpack.encode(doc)]
    which = data.draw(st.integers(0, len(DOCS) - 1))
    doc = dict(DOCS[which])
    key = data.draw(st.sampled_from(sorted(doc)))
    doc[key] = data.draw(msgpack_values)
    return [msgspec.msgpack.encode(doc), *SAMPLES[which][1]]


def make_property(tally: Tally, strategy: str, n: int, rng_seed: int):
    @seed(rng_seed)
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def prop(data: st.DataObject) -> None:
        tally.check(strategy, build(strategy, data))

    return prop


def random_cases(tally: Tally, n: int, rng_seed: int) -> None:
    """The same kinds of input from the stdlib RNG: many more cases per second than hypothesis."""
    import random

    rng = random.Random(rng_seed)
    leaves = [None, True, -1, 0, 2**64 - 1, -(2**63), 1e308, float("nan"), "", "x" * 9, b"\0" * 9, [], {}]
    for i in range(n):
        kind = ("r-splice", "r-mutate", "r-frames")[i % 3]
        which = rng.randrange(len(SAMPLES))
        if kind == "r-splice":
            header = bytearray(HEADERS[which])
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(header))
                header[at : at + rng.randint(0, 6)] = rng.randbytes(rng.randint(0, 8))
            frames = [bytes(header), *SAMPLES[which][1]]
        elif kind == "r-mutate":
            doc = dict(DOCS[which])
            doc[rng.choice(sorted(doc))] = rng.choice(leaves)
            if rng.random() < 0.2:
                doc[rng.choice(["extra", "v", "type"])] = rng.choice(leaves)
            frames = [msgspec.msgpack.encode(doc), *SAMPLES[which][1]]
        else:
            frames = [rng.randbytes(rng.randint(0, 200)) for _ in range(rng.randint(0, 9))]
        tally.check(kind, frames)


def run(cases: int, rng_seed: int) -> Tally:
    tally = Tally()
    per = max(cases // len(STRATEGIES), 1)
    for strategy in STRATEGIES:
        make_property(tally, strategy, per, rng_seed)()
    return tally


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=10_000, help="hypothesis cases")
    p.add_argument("--random-cases", type=int, default=100_000, help="stdlib-random cases after those")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        tally = run(args.cases, args.seed)
        random_cases(tally, args.random_cases, args.seed)
    except Exception as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t0
    total = sum(tally.cases.values())
    report = {
        "cases": total,
        "hypothesis_cases": args.cases,
        "random_cases": args.random_cases,
        "per_strategy": dict(tally.cases),
        "outcomes": dict(tally.outcomes),
        "escaped": len(tally.escaped),
        "seconds": round(elapsed, 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(report, indent=2))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"{total} cases, 0 escaped exceptions, {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
