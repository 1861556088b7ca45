"""bench/fuzz_manifest.py in reduced form: arbitrary and mutated manifests raise only SchemaError."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fuzz_manifest.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("fuzz_manifest", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_exception_but_schema_error_escapes_the_manifest_parser() -> None:
    report = _bench_module().run(cases=800, rng_seed=1)
    assert report["escaped"] == 0, report["escaped_examples"]
    assert report["cases"] == 800
    assert all(n == 200 for n in report["per_strategy"].values())
    # The mutations must reach both outcomes, or they test nothing: some still parse, most are refused.
    mutated = report["parsed"]["mutate"] + report["parsed"]["splice"]
    assert 0 < mutated < 200
    assert report["refused_schema_error"]["bytes"] == 200


def test_the_tally_catches_an_escaping_exception(monkeypatch) -> None:
    module = _bench_module()
    tally = module.Tally()
    tally.check("sanity", module.valid_manifest_bytes())
    tally.check("bytes", b"\xff")
    assert tally.parsed["sanity"] == 1 and tally.refused["bytes"] == 1 and not tally.escaped

    def broken(data: bytes) -> None:
        raise KeyError("a parser bug")

    monkeypatch.setattr(module, "manifest_from_json", broken)
    with pytest.raises(KeyError, match="a parser bug"):
        tally.check("json", b"{}")
    assert len(tally.escaped) == 1 and "KeyError" in tally.escaped[0]
