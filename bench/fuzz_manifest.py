"""Property-based fuzzing of the bundle manifest parser, `protocol.manifest.manifest_from_json`.

A station parses manifest.json before it trusts anything in a bundle, so the parser sees attacker bytes.
Property: for ANY input it either returns a BundleManifest that survives a canonical round trip, or raises
`protocol.errors.SchemaError`; no other exception escapes, and nothing hangs.

Four hypothesis strategies share the case budget:
  bytes     arbitrary bytes (mostly not UTF-8 / not JSON);
  json      arbitrary JSON documents (nested objects, arrays, big ints, floats, unicode);
  mutate    a valid sealed manifest with one to three edits at random paths (replace a value by any JSON
            value, delete a key, add an unknown key, wrap in a list);
  splice    byte-level edits of the valid manifest's canonical JSON (flip, cut, insert, duplicate a span).

Usage: python bench/fuzz_manifest.py [--cases 100000] [--seed 0] [--json-out test-artifacts/fuzz.json]
Exit 0 when no input broke the property, 1 otherwise (the first failing input is printed, shrunk).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from protocol.errors import SchemaError  # noqa: E402
from protocol.manifest import canonical_json, manifest_from_json  # noqa: E402

SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64
STRATEGIES = ("bytes", "json", "mutate", "splice")


def valid_manifest_bytes() -> bytes:
    """A sealed manifest with every optional part filled (DLF, golden, provenance), as canonical JSON."""
    from manifest_factory import draft_manifest

    from protocol.manifest import (
        ArtifactRef,
        BankSpec,
        DLFCoefficients,
        FeatureSpec,
        GoldenSample,
        Provenance,
        ScoringSpec,
        Thresholds,
    )

    manifest = draft_manifest(
        version="1.2.3",
        anti_rollback_counter=7,
        feature_spec=FeatureSpec("free", "free", 48, 48, 96, 28, 56, 1024, 128),
        networks={"uff": ArtifactRef("onnx/uff.onnx", SHA_A, 10)},
        banks={"rgb": BankSpec("banks/rgb.npz", "pq", 300, 48, 28, feat_mean=0.1, feat_std=2.0, pq_m=6)},
        scoring=ScoringSpec(
            0.1,
            4.0,
            3,
            224,
            {"rgb": {"image_mean": 1.0}},
            {"rgb+point": DLFCoefficients((1.0, 2.0), 0.0, (3.0,), 1.5)},
        ),
        thresholds=Thresholds("rgb+point+fusion", 2.5, 0.01),
        provenance=Provenance("synthetic", {"lr": 0.003, "layers": [3, 7]}, "deadbeef", "0.1.0", "host"),
        golden=[GoldenSample("golden/0.npz", 1.25, SHA_C, 0.5, 1e-3)],
        files={"onnx/uff.onnx": SHA_A, "banks/rgb.npz": SHA_B, "golden/0.npz": SHA_C},
    )
    return canonical_json(manifest)


class Tally:
    """What the property saw: cases per strategy, parsed vs refused, and any escaped exception."""

    def __init__(self) -> None:
        self.cases: Counter[str] = Counter()
        self.parsed: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.escaped: list[str] = []

    def check(self, strategy: str, data: bytes) -> None:
        self.cases[strategy] += 1
        try:
            manifest = manifest_from_json(data)
        except SchemaError:
            self.refused[strategy] += 1
            return
        except Exception as exc:  # the property: nothing else may escape
            self.escaped.append(f"{strategy}: {type(exc).__name__}: {exc} <- {data[:200]!r}")
            raise
        # Whatever parses is a real, sealed manifest whose canonical form parses to the same thing.
        again = manifest_from_json(canonical_json(manifest))
        assert again == manifest, "canonical round trip changed the manifest"
        self.parsed[strategy] += 1


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=24)
        | st.sampled_from(["", "fp32", "pq", "uff", "rgb", "../x", "/etc/passwd", "m3dm-bundle/1", SHA_A])
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
        max_leaves=max_leaves,
    )


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indices) inside a JSON document, the root included."""
    out = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            out += _paths(value, (*prefix, index))
    return out


def _edit(doc: Any, path: tuple, op: str, value: Any, new_key: str) -> Any:
    """A copy of `doc` with one edit at `path`."""
    if not path:  # the document itself
        if op == "add" and isinstance(doc, dict):
            return {**doc, new_key: value}
        return {"replace": value, "delete": {}, "add": value, "wrap": [doc]}[op]
    head, rest = path[0], path[1:]
    copy = dict(doc) if isinstance(doc, dict) else list(doc)
    if rest:
        copy[head] = _edit(copy[head], rest, op, value, new_key)
        return copy
    if op == "replace":
        copy[head] = value
    elif op == "delete":
        del copy[head]
    elif op == "wrap":
        copy[head] = [copy[head]]
    elif isinstance(copy[head], dict):
        copy[head] = {**copy[head], new_key: value}
    else:
        copy[head] = value
    return copy


_SMALL_JSON = json_values(6)
_KEYS = st.text(min_size=1, max_size=10)
_OPS = st.sampled_from(["replace", "delete", "add", "wrap"])


def _lookup_ok(doc: Any, path: tuple) -> bool:
    for key in path:
        if (
            isinstance(doc, dict)
            and key in doc
            or isinstance(doc, list)
            and isinstance(key, int)
            and key < len(doc)
        ):
            doc = doc[key]
        else:
            return False
    return True


def mutated_manifests(base: dict) -> st.SearchStrategy[bytes]:
    """One to three edits of `base`, each at a path of the original (skipped once an edit removed it)."""
    paths = _paths(base)
    edit = st.tuples(st.sampled_from(paths), _OPS, _SMALL_JSON, _KEYS)

    def apply(edits: list) -> bytes:
        doc = base
        for path, op, value, new_key in edits:
            if _lookup_ok(doc, path):
                doc = _edit(doc, path, op, value, new_key)
        return json.dumps(doc).encode()

    return st.lists(edit, min_size=1, max_size=3).map(apply)


@st.composite
def spliced_bytes(draw: st.DrawFn, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup", "truncate"]))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "insert":
            data[at:at] = draw(
                st.binary(min_size=1, max_size=8)
                | st.sampled_from([b"1e999", b"NaN", b'"', b"{", b"\\u0000"])
            )
        elif op == "dup":
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
        else:
            del data[at:]
    return bytes(data)


def _property(name: str, strategy: st.SearchStrategy, config: settings, rng_seed: int, tally: Tally) -> Any:
    @seed(rng_seed)
    @config
    @given(strategy)
    def prop(data: bytes) -> None:
        tally.check(name, data)

    return prop


def run(cases: int, rng_seed: int) -> dict:
    """Fuzz with `cases` inputs in all, split evenly over STRATEGIES; returns the tally as a dict."""
    base_bytes = valid_manifest_bytes()
    base_doc = json.loads(base_bytes)
    tally = Tally()
    tally.check("sanity", base_bytes)
    assert tally.parsed["sanity"] == 1, "the seed manifest must parse, or the mutations mean nothing"
    per = max(1, cases // len(STRATEGIES))
    strategies = {
        "bytes": st.binary(max_size=512),
        "json": json_values().map(lambda v: json.dumps(v).encode()),
        "mutate": mutated_manifests(base_doc),
        "splice": spliced_bytes(base_bytes),
    }
    start = time.perf_counter()
    for name, strategy in strategies.items():
        config = settings(
            max_examples=per,
            deadline=None,
            database=None,
            derandomize=False,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )

        _property(name, strategy, config, rng_seed, tally)()
    seconds = time.perf_counter() - start
    total = sum(v for k, v in tally.cases.items() if k != "sanity")
    return {
        "target": "protocol.manifest.manifest_from_json",
        "cases": total,
        "per_strategy": {k: tally.cases[k] for k in STRATEGIES},
        "parsed": {k: tally.parsed[k] for k in STRATEGIES},
        "refused_schema_error": {k: tally.refused[k] for k in STRATEGIES},
        "escaped": len(tally.escaped),
        "escaped_examples": tally.escaped[:5],
        "seconds": round(seconds, 1),
        "cases_per_s": round(total / seconds) if seconds else None,
        "seed": rng_seed,
        "loadavg": os.getloadavg(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    try:
        report = run(args.cases, args.seed)
    except Exception as exc:  # hypothesis re-raises the shrunk failing example
        print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n", encoding="utf-8")
    return 0 if report["escaped"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
