"""`just reliability`: the whole fault / attack / bad-input / fuzz suite, then the fleet load bench.

    python bench/reliability.py [--quick] [--out test-artifacts]

Steps, each timed, each one's output kept under --out:
  1. pytest over every reliability-related test file (faults with real processes, attacks, bad input,
     protocol and manifest properties, bundle verification, the no-pickle scan), JUnit XML in
     reliability-junit.xml;
  2. bench/fuzz_manifest.py (100k hypothesis cases, as two 50k shards with seeds 0 and 1),
     bench/fuzz_protocol.py (10k hypothesis + 100k random-engine cases) and the deploy messages'
     fuzz test (tests/reliability/test_deploy_decoder_fuzz.py at 10k + 100k), all four side by side;
  3. bench/load.py, 16 stations x 20 fps x 300 s with maps for NOK parts, into `m3dm collector serve`.
--quick shrinks steps 2 and 3 (manifest 10k; wire and deploy 1k + 10k cases; 8 x 10 fps x 60 s) for a
machine others are using.
The summary (step, seconds, exit code, settings) goes to reliability_summary.json; RELIABILITY.md quotes the
figures. Exit 0 only when every step passed. Budget: under 30 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TEST_PATHS = [
    "tests/reliability",
    "tests/protocol",
    "tests/bench",
    "tests/architecture/test_no_pickle.py",
    "tests/trainer/test_synth_corrupt.py",
    "tests/edge/test_bundle.py",
    "tests/edge/test_bundle_precheck.py",
    "tests/edge/test_outbox.py",
    "tests/edge/test_uplink.py",
    "tests/edge/test_station.py",
    "tests/edge/test_pipeline.py",
    "tests/collector/test_service.py",
    "tests/collector/test_restart.py",
    "tests/deploy/test_registry.py",
    "tests/deploy/test_fleet.py",
]


def _step(name: str, cmd: list[str], log: Path, summary: list[dict], **settings: object) -> int:
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    with log.open("wb") as out:
        code = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = round(time.monotonic() - start, 1)
    summary.append({"step": name, "seconds": seconds, "exit": code, "log": str(log), **settings})
    print(f"   {'ok' if code == 0 else 'FAILED'} in {seconds} s (log {log})", flush=True)
    return code


def _parallel(steps: list[tuple[str, list[str], dict]], out: Path, summary: list[dict]) -> None:
    """Run independent steps at the same time; each is timed from the common start to its own end.

    A step's settings may hold "env": variables added to its environment (and recorded in the summary).
    """
    start = time.monotonic()
    running = []
    for name, cmd, settings in steps:
        print(f"== {name} (in parallel): {' '.join(cmd)}", flush=True)
        log = out / f"{name}.log"
        handle = log.open("wb")
        env = {**os.environ, **settings.get("env", {})}
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env)
        running.append((name, proc, handle, log, settings))
    while running:  # poll, so that each step's time is its own end, not that of a slower one before it
        for item in list(running):
            name, proc, handle, log, settings = item
            code = proc.poll()
            if code is None:
                continue
            running.remove(item)
            handle.close()
            seconds = round(time.monotonic() - start, 1)
            summary.append({"step": name, "seconds": seconds, "exit": code, "log": str(log), **settings})
            print(f"   {name} {'ok' if code == 0 else 'FAILED'} after {seconds} s (log {log})", flush=True)
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller fuzz and load runs")
    parser.add_argument("--out", type=Path, default=REPO / "test-artifacts")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    cases = 10_000 if args.quick else 100_000
    load = ["--stations", "8", "--fps", "10", "--seconds", "60"] if args.quick else []
    load = load or ["--stations", "16", "--fps", "20", "--seconds", "300"]
    summary: list[dict] = []
    started = time.monotonic()
    tests = [p for p in TEST_PATHS if (REPO / p).exists()]
    junit = out / "reliability-junit.xml"
    _step(
        "pytest",
        [py, "-m", "pytest", "-q", "-rA", f"--junitxml={junit}", *tests],
        out / "pytest.log",
        summary,
    )
    # The fuzzers are single-threaded, and the manifest one is the slowest (~180 cases/s): it runs as two
    # shards of half the cases with different seeds, beside the wire-decoder fuzzer, so both cores stay busy.
    proto = ["--cases", "1000", "--random-cases", "10000"] if args.quick else []
    manifest_shards = [
        (
            f"fuzz_manifest_{shard}",
            [
                py,
                "bench/fuzz_manifest.py",
                "--cases",
                str(cases // 2),
                "--seed",
                str(shard),
                "--json-out",
                str(out / f"fuzz_manifest_{shard}.json"),
            ],
            {"cases": cases // 2, "seed": shard},
        )
        for shard in (0, 1)
    ]
    _parallel(
        [
            *manifest_shards,
            (
                # hypothesis cases, then a plain random engine (10k + 100k by default, its own split)
                "fuzz_protocol",
                [py, "bench/fuzz_protocol.py", *proto, "--json-out", str(out / "fuzz_protocol.json")],
                {"args": " ".join(proto) or "defaults (10k hypothesis + 100k random)"},
            ),
            (
                # the deploy messages, at the registry's and the station's decoder (CI runs 400 + 5,000)
                "fuzz_deploy",
                [py, "-m", "pytest", "-q", "-rA", "tests/reliability/test_deploy_decoder_fuzz.py"],
                {
                    "env": {
                        "M3DM_DEPLOY_FUZZ_CASES": str(cases // 10),
                        "M3DM_DEPLOY_FUZZ_RANDOM_CASES": str(cases),
                    }
                },
            ),
        ],
        out,
        summary,
    )
    _step(
        "load",
        [py, "bench/load.py", *load, "--json-out", str(out / "load.json")],
        out / "load.log",
        summary,
        args=" ".join(load),
    )
    total = round(time.monotonic() - started, 1)
    report = {"quick": args.quick, "total_s": total, "loadavg": os.getloadavg(), "steps": summary}
    (out / "reliability_summary.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    failed = [s["step"] for s in summary if s["exit"] != 0]
    print(f"reliability: {len(summary) - len(failed)}/{len(summary)} steps passed in {total} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
