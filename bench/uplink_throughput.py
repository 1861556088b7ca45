"""Results per second through one station uplink on loopback: Outbox (SQLite WAL) -> CURVE DEALER ->
the test ack server (ROUTER, SQLite, ack after commit), for outbox synchronous=FULL and NORMAL.

    python bench/uplink_throughput.py [--count 5000] [--nok-every 10]

For each setting: submit rate (what the scoring thread sees: one durable insert per result), and the
delivered rate (first submit until the outbox is empty, every result acked). Prints JSON with the load
average, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# tests/reliability itself: bench/reliability.py would shadow the `reliability` namespace package.
sys.path[:0] = [str(REPO / "tests" / "reliability"), str(REPO)]

from harness import AckServer, make_keys  # noqa: E402
from station_driver import JumpingClock, result_fields  # noqa: E402

from edge.outbox import Outbox  # noqa: E402
from edge.uplink import Uplink, UplinkConfig  # noqa: E402


def measure(workdir: Path, count: int, nok_every: int, synchronous: str) -> dict:
    keys = make_keys(workdir / "keys")
    station = keys.station("bench")
    clock = JumpingClock()
    items = [result_fields(i, "bench", nok_every > 0 and i % nok_every == 0, clock) for i in range(count)]
    with AckServer(workdir, keys) as server:
        outbox = Outbox(workdir / "ob.db", "bench", synchronous=synchronous)
        uplink = Uplink.from_paths(outbox, server.endpoint, station, keys.collector_public, UplinkConfig())
        uplink.start()
        try:
            t0 = time.perf_counter()
            for fields, blobs in items:
                uplink.submit(fields, blobs)
            t_submit = time.perf_counter() - t0
            drained = uplink.drain(timeout_s=300)
            t_all = time.perf_counter() - t0
            stats = uplink.stats()
        finally:
            uplink.close()
            outbox.close()
        stored = len(server.rows())
    return {
        "synchronous": synchronous,
        "count": count,
        "stored": stored,
        "drained": drained,
        "submit_per_s": round(count / t_submit),
        "submit_ms_per_result": round(1000 * t_submit / count, 3),
        "delivered_per_s": round(count / t_all),
        "resent": stats.resent,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--nok-every", type=int, default=10)
    args = p.parse_args(argv)
    runs = []
    for synchronous in ("FULL", "NORMAL"):
        with tempfile.TemporaryDirectory(prefix="uplink-bench-") as tmp:
            runs.append(measure(Path(tmp), args.count, args.nok_every, synchronous))
    report = {"runs": runs, "loadavg": os.getloadavg(), "cpus": os.cpu_count(), "nok_every": args.nok_every}
    print(json.dumps(report, indent=2))
    return 0 if all(r["stored"] == r["count"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
