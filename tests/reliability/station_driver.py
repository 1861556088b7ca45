"""A station process without a model: synthetic results through the real Outbox + Uplink, for delivery tests.

    python tests/reliability/station_driver.py --outbox PATH --station-id S --collector tcp://H:P \
        --curve-dir D --collector-key K --count N [--rate R] [--nok-every K] [--clock-jump-back S --jump-at I]
        [--drain-s T]

It submits `count` results (every `nok-every`-th one NOK with an anomaly-map blob, the rest OK), at most
`rate` per second, and prints one JSON line per stored result (`{"epoch": E, "seq": S, "frame_id": F}`,
flushed) once `submit` returned, i.e. once the result is durable. Then it waits until the outbox is empty
(`--drain-s`) and prints `{"drained": true|false, "stats": {...}}`. Exit 0 when drained, 1 otherwise.

`--clock-jump-back S --jump-at I` makes the clock the outbox and the results use jump S seconds backwards
from the I-th result on, like an NTP step on a station: ordering and dedup must not care.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

import numpy as np

from edge.outbox import Outbox, OutboxLimits
from edge.uplink import Uplink, UplinkConfig
from protocol.frames import quantise_map


class JumpingClock:
    """time.time(), minus `back_s` once `jump()` was called."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() - self.offset_s


def result_fields(i: int, run: str, nok: bool, clock: JumpingClock) -> tuple[dict, list[bytes]]:
    now = clock()
    fields = {
        "frame_id": f"{run}-{i:06d}",
        "capture_ts": now - 0.01,
        "decision_ts": now,
        "bundle_id": "driver",
        "bundle_version": "1",
        "variant": "rgb+point+fusion",
        "decision": "NOK" if nok else "OK",
        "image_score": 0.9 if nok else 0.1,
        "bank_scores": {"rgb": 0.5, "point": 0.5, "fusion": 0.5},
        "threshold": 0.5,
        "latency_ms": {"total": 10.0},
    }
    blobs: list[bytes] = []
    if nok:
        meta, payload = quantise_map(np.random.default_rng(i).random((56, 56), dtype=np.float32), frame=1)
        fields["anomaly_map"] = meta
        blobs.append(payload)
    return fields, blobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outbox", required=True)
    p.add_argument("--station-id", required=True)
    p.add_argument("--collector", required=True)
    p.add_argument("--curve-dir", required=True)
    p.add_argument("--collector-key", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0, help="results/s (0: as fast as possible)")
    p.add_argument("--nok-every", type=int, default=10)
    p.add_argument("--run", default="run", help="frame id prefix")
    p.add_argument("--clock-jump-back", type=float, default=0.0)
    p.add_argument("--jump-at", type=int, default=-1)
    p.add_argument("--drain-s", type=float, default=30.0)
    p.add_argument("--heartbeat-s", type=float, default=0.5)
    p.add_argument("--dead-after", type=int, default=4)
    p.add_argument("--ack-timeout-s", type=float, default=2.0)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s station={args.station_id} %(message)s",
    )
    clock = JumpingClock()
    config = UplinkConfig(
        heartbeat_s=args.heartbeat_s, dead_after=args.dead_after, ack_timeout_s=args.ack_timeout_s
    )
    outbox = Outbox(args.outbox, args.station_id, OutboxLimits(), clock=clock)
    uplink = Uplink.from_paths(
        outbox, args.collector, args.curve_dir, args.collector_key, config, clock=clock
    )
    uplink.start()
    uplink.set_status(bundle_id="driver", bundle_version="1")
    uplink.event("started", {"run": args.run})
    t0 = time.monotonic()
    try:
        for i in range(args.count):
            if i == args.jump_at:
                clock.offset_s = args.clock_jump_back
            if args.rate > 0:
                delay = t0 + i / args.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            fields, blobs = result_fields(i, args.run, args.nok_every > 0 and i % args.nok_every == 0, clock)
            epoch, seq = uplink.submit(fields, blobs)
            sys.stdout.write(json.dumps({"epoch": epoch, "seq": seq, "frame_id": fields["frame_id"]}) + "\n")
            sys.stdout.flush()
        drained = uplink.drain(args.drain_s)
        stats = dataclasses.asdict(uplink.stats())
        sys.stdout.write(json.dumps({"drained": drained, "stats": stats, "epoch": outbox.epoch}) + "\n")
        sys.stdout.flush()
        return 0 if drained else 1
    finally:
        uplink.close()
        outbox.close()


if __name__ == "__main__":
    sys.exit(main())
