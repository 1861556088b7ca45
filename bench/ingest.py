"""Collector ingest throughput: 8 simulated stations (processes) on loopback into `m3dm collector serve`.

    python bench/ingest.py [--stations 8] [--seconds 10] [--window 1000] [--backends sqlite,postgresql]
                           [--pg-url URL] [--json-out test-artifacts/ingest.json] [--write-benchmarks]

Each station is a process with a CURVE DEALER that keeps up to `--window` results in flight (unacked) and
sends as fast as acks free the window, for `--seconds`; then it waits for the last acks. So the figure is
the collector's sustained rate, not a sender's: results/s = acked results / (last ack - first send).
Ack latency = ack received - result sent, per result (cumulative acks cover every seq below them).
Two payloads: "no maps" (header only, ~400 B) and "maps" (every result carries a 224x224 anomaly map,
uint8 + zlib as the station sends it, which the collector turns into a PNG blob row: the worst case; a
real station sends maps for NOK parts and 1 in N OK parts). The database must end with exactly the acked
set (checked). PostgreSQL comes from --pg-url or M3DM_TEST_PG_URL (a role that may CREATE DATABASE).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

M3DM = str(Path(sys.executable).with_name("m3dm"))


def _smooth_map(seed: int) -> np.ndarray:
    """A map shaped like a real one: smooth background plus a blob (compresses like station maps)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:224, 0:224].astype(np.float32)
    cy, cx = rng.uniform(40, 184, 2)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 18.0**2))
    return (0.2 + 0.05 * np.sin(xx / 17.0) * np.cos(yy / 23.0) + blob).astype(np.float32)


def _result(cls: Any, station_id: str, epoch: int, seq: int, meta: Any) -> Any:
    ts = time.time()
    return cls(
        station_id=station_id, epoch=epoch, seq=seq, frame_id=f"{station_id}-{seq}", capture_ts=ts - 0.02,
        decision_ts=ts, bundle_id="f" * 32, bundle_version="1.0.0", variant="rgb+point+fusion", decision="OK",
        image_score=0.42, threshold=1.0, bank_scores={"rgb": 0.3, "point": 0.4, "fusion": 0.5},
        latency_ms={"capture": 2.0, "preprocess": 9.0, "features": 60.0, "score": 8.0, "total": 80.0},
        anomaly_map=meta,
    )  # fmt: skip


def station_main(args: argparse.Namespace) -> int:
    """One simulated station: window-limited sending for --seconds, then drain; JSON report on stdout."""
    import zmq

    from protocol.curve import load_keypair, load_public_key
    from protocol.frames import encode, quantise_map
    from protocol.messages import InspectionResult

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    load_keypair(Path(args.curve_dir)).apply_client(sock, load_public_key(Path(args.collector_key)))
    sock.connect(args.endpoint)
    meta, payload = quantise_map(_smooth_map(hash(args.station_id) % 1000), 1) if args.maps else (None, b"")
    epoch = int(time.time() * 1000)
    sent_at: dict[int, float] = {}
    latencies_ms: list[float] = []
    next_seq, errors = 1, 0
    t_first = t_last_ack = 0.0
    deadline = time.monotonic() + args.seconds
    drain_deadline = deadline + 120.0
    while True:
        now = time.monotonic()
        sending = now < deadline
        if not sending and not sent_at:
            break
        if now > drain_deadline:
            break
        while sending and len(sent_at) < args.window:
            msg = _result(InspectionResult, args.station_id, epoch, next_seq, meta)
            sock.send_multipart(encode(msg, [payload] if meta else []))
            sent_at[next_seq] = time.monotonic()
            t_first = t_first or sent_at[next_seq]
            next_seq += 1
        if not sock.poll(50):
            continue
        got_ack, bad = _receive(sock, sent_at, latencies_ms)
        errors += bad
        t_last_ack = got_ack or t_last_ack
    sock.close(0)
    ctx.term()
    acked = len(latencies_ms)
    report = {"station_id": args.station_id, "epoch": epoch, "sent": next_seq - 1, "acked": acked}
    report.update(errors=errors, unacked=len(sent_at), t_first=t_first, t_last_ack=t_last_ack)
    # a sample keeps the report small; the percentiles are taken over all stations' samples
    report["latencies_ms"] = latencies_ms[:: max(1, acked // 5000)]
    sys.stdout.write(json.dumps(report) + "\n")
    return 0 if not sent_at else 1


def _receive(sock: Any, sent_at: dict[int, float], latencies_ms: list[float]) -> tuple[float, int]:
    """Read every waiting reply; acked seqs leave `sent_at`. Returns (time of the last useful ack, errors)."""
    import zmq

    from protocol.frames import decode
    from protocol.messages import Ack, ErrorReply, Heartbeat

    t_ack, errors = 0.0, 0
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return t_ack, errors
        reply, _ = decode(frames, Ack | Heartbeat | ErrorReply)
        if isinstance(reply, ErrorReply):
            errors += 1
        if not isinstance(reply, Ack):
            continue
        t = time.monotonic()
        done = [s for s in sent_at if s <= reply.upto_seq or s in reply.seqs]
        for s in done:
            latencies_ms.append((t - sent_at.pop(s)) * 1000.0)
        if done:
            t_ack = t


def _keys(work: Path, n: int) -> dict[str, Path]:
    from protocol.curve import generate_keypair

    generate_keypair(work / "keys" / "collector", "collector")
    allow = work / "keys" / "allow"
    allow.mkdir(parents=True)
    stations = {}
    for i in range(n):
        name = f"bench-{i:02d}"
        public, _ = generate_keypair(work / "keys" / name, name)
        shutil.copy(public, allow / public.name)
        stations[name] = work / "keys" / name
    return {"collector": work / "keys" / "collector", "allow": allow, **stations}


def _pg_database(base: str) -> tuple[str, Any]:
    import sqlalchemy as sa

    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    name = f"m3dm_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False), drop


def _start_collector(work: Path, db_url: str, keys: dict[str, Path]) -> tuple[subprocess.Popen, str]:
    ready = work / "ready.json"
    cmd = [M3DM, "collector", "serve", "--bind", "tcp://127.0.0.1:*", "--db", db_url, "--http", ""]
    cmd += ["--curve-dir", str(keys["collector"]), "--allow", str(keys["allow"]), "--ready-file", str(ready)]
    with (work / "collector.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"collector did not start: {(work / 'collector.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["zmq"]


def run_case(args: argparse.Namespace, backend: str, maps: bool) -> dict[str, Any]:
    import psutil

    from collector.store import Store

    work = Path(tempfile.mkdtemp(prefix=f"ingest-{backend}-"))
    drop = None
    try:
        keys = _keys(work, args.stations)
        if backend == "sqlite":
            db_url = f"sqlite:///{work / 'fleet.db'}"
        else:
            db_url, drop = _pg_database(args.pg_url)
        collector, endpoint = _start_collector(work, db_url, keys)
        ps = psutil.Process(collector.pid)
        ps.cpu_percent(None)
        cpu_start = ps.cpu_times()
        try:
            procs = []
            for i in range(args.stations):
                name = f"bench-{i:02d}"
                cmd = [sys.executable, __file__, "--station", name, "--endpoint", endpoint]
                cmd += ["--curve-dir", str(keys[name]), "--collector-key", str(keys["collector"])]
                cmd += ["--seconds", str(args.seconds), "--window", str(args.window)] + (
                    ["--maps"] if maps else []
                )
                # a file, not a pipe: a report bigger than the pipe buffer would block the station's exit
                with (work / f"{name}.json").open("wb") as out:
                    procs.append(subprocess.Popen(cmd, stdout=out))
            cpu, rss = [], []
            while any(p.poll() is None for p in procs):
                time.sleep(1.0)
                cpu.append(ps.cpu_percent(None))
                rss.append(ps.memory_info().rss / 2**20)
            reports = [json.loads((work / f"bench-{i:02d}.json").read_text()) for i in range(args.stations)]
            cpu_end = ps.cpu_times()
            cpu_s = (cpu_end.user + cpu_end.system) - (cpu_start.user + cpu_start.system)
        finally:
            collector.send_signal(signal.SIGTERM)
            collector.wait(30)
        store = Store.open(db_url)
        stored = store.count()
        store.close()
    finally:
        if drop is not None:
            drop()
        shutil.rmtree(work, ignore_errors=True)
    acked = sum(r["acked"] for r in reports)
    t0 = min(r["t_first"] for r in reports)
    t1 = max(r["t_last_ack"] for r in reports)
    lat = np.concatenate([np.asarray(r["latencies_ms"]) for r in reports])
    return {
        "backend": backend,
        "maps": maps,
        "stations": args.stations,
        "acked": acked,
        "stored_rows": stored,
        "exact": stored == acked and all(r["unacked"] == 0 for r in reports),
        "errors": sum(r["errors"] for r in reports),
        "results_per_s": acked / (t1 - t0),
        "ack_latency_ms": {f"p{p}": float(np.percentile(lat, p)) for p in (50, 95, 99)},
        "collector_cpu_s": cpu_s,
        "results_per_collector_cpu_s": acked / cpu_s if cpu_s > 0 else None,
        "collector_cpu_pct_mean": float(np.mean(cpu[1:] or cpu)) if cpu else None,
        "collector_rss_mb_max": max(rss, default=None),
    }


def _markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "## Collector ingest (bench/ingest.py)",
        "",
        f"`{meta['command']}` on {meta['machine']}; load average before/after "
        f"{meta['load_before']} / {meta['load_after']} (other work shared the machine). {meta['stations']} "
        f"simulated stations (processes, CURVE DEALER, window {meta['window']} unacked) -> one "
        "`m3dm collector serve` (group commit: 500 messages or 5 ms), loopback, "
        f"{meta['seconds']} s per case. Maps: every result carries a 224x224 map (worst case; stored as "
        "PNG). 'per collector CPU-s': results stored per second of the collector process's CPU time, the "
        "figure that does not depend on what else loads the machine.",
        "",
        "| database | maps | results/s | per collector CPU-s | ack p50 ms | ack p95 ms | ack p99 ms | "
        "collector CPU % | RSS MB | exact |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        a = r["ack_latency_ms"]
        cells = [r["backend"], "yes" if r["maps"] else "no", f"{r['results_per_s']:.0f}"]
        cells += [f"{r['results_per_collector_cpu_s']:.0f}"]
        cells += [f"{a['p50']:.1f}", f"{a['p95']:.1f}", f"{a['p99']:.1f}"]
        cells += [f"{r['collector_cpu_pct_mean']:.0f}", f"{r['collector_rss_mb_max']:.0f}"]
        cells += [f"{'yes' if r['exact'] else 'NO'} ({r['stored_rows']} rows)"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stations", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--window", type=int, default=1000)
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--pg-url", default=os.environ.get("M3DM_TEST_PG_URL"))
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--write-benchmarks", action="store_true", help="Append the table to BENCHMARKS.md.")
    # station mode (internal: one simulated station process)
    p.add_argument("--station", dest="station_id", default=None, help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    p.add_argument("--curve-dir", help=argparse.SUPPRESS)
    p.add_argument("--collector-key", help=argparse.SUPPRESS)
    p.add_argument("--maps", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.station_id:
        return station_main(args)
    backends = [b for b in args.backends.split(",") if b]
    if "postgresql" in backends and not args.pg_url:
        p.error("postgresql needs --pg-url or M3DM_TEST_PG_URL")
    load_before = tuple(round(x, 1) for x in os.getloadavg())
    results = []
    for backend in backends:
        for maps in (False, True):
            r = run_case(args, backend, maps)
            print(json.dumps(r), flush=True)
            results.append(r)
    meta = {
        "command": "python bench/ingest.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{os.cpu_count()} cores ({platform.processor() or platform.machine()})",
        "load_before": load_before,
        "load_after": tuple(round(x, 1) for x in os.getloadavg()),
        "stations": args.stations,
        "window": args.window,
        "seconds": args.seconds,
    }
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    table = _markdown(results, meta)
    print(table)
    if args.write_benchmarks:
        with (REPO / "BENCHMARKS.md").open("a") as f:
            f.write("\n" + table)
    return 0 if all(r["exact"] and r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
