"""bench/fuzz_protocol.py in reduced form: arbitrary and mutated wire messages raise only ProtocolError."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fuzz_protocol.py"


def test_only_protocol_error_escapes_the_wire_decoder() -> None:
    spec = importlib.util.spec_from_file_location("fuzz_protocol", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tally = module.run(cases=40, rng_seed=3)
    module.random_cases(tally, 2000, rng_seed=3)
    assert tally.escaped == []
    assert sum(tally.cases.values()) == 2040
    # Each kind must reach both outcomes or it tests nothing: some inputs still decode, most are refused.
    decoded = sum(n for k, n in tally.outcomes.items() if k.startswith("decoded:"))
    assert 0 < decoded < 2040
    assert tally.outcomes["bad_message"] > 1000 and tally.outcomes["unsupported_version"] > 0
