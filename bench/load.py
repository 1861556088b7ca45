"""Fleet load on loopback: N stations x M fps for T seconds into the real collector, with 0 lost.

    python bench/load.py [--stations 8] [--fps 10] [--seconds 60] [--nok-every 10] [--collector m3dm]
                         [--workdir DIR] [--json-out test-artifacts/load.json]

Each station is its own process running the real delivery path (`edge.outbox.Outbox` + `edge.uplink.Uplink`,
CURVE DEALER) and submits one result every 1/M s; every K-th result is NOK and carries its anomaly map
(224x224, quantised + zlib, as the station sends it) and a JPEG thumbnail. The collector is
`m3dm collector serve` (SQLite WAL) behind an allow-list of the stations' keys (`--collector ack-server`
uses the delivery tests' minimal endpoint instead, for comparison). Measured:
  - collector CPU (% of one core, process + children) and RSS, sampled every second with psutil;
  - ack latency per result (submit returned -> its ack processed by the station), p50 / p95 / p99 / max;
  - outbox depth over time (every 0.5 s per station; the fleet-wide maximum per 5 s window is reported);
  - reconciliation: the identities (station, epoch, seq) the stations assigned vs the rows the collector
    stored: lost, unexpected, duplicated (all must be 0).
Exit 0 when nothing was lost or duplicated and every outbox drained, else 1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# --------------------------------------------------------------------------------------------- station


def _timed_uplink_class() -> type:
    from edge.uplink import Uplink

    class TimedUplink(Uplink):
        """The real Uplink; records when each result's ack was processed (I/O thread), for latency."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.ack_t: dict[tuple[int, int], float] = {}
            self._acked_upto: dict[int, int] = {}

        def _on_ack(self, ack: Any) -> None:
            super()._on_ack(ack)  # deleted from the outbox first: that is what "acked" means here
            now = time.monotonic()
            start = self._acked_upto.get(ack.epoch, 0)
            for seq in range(start + 1, ack.upto_seq + 1):
                self.ack_t.setdefault((ack.epoch, seq), now)
            self._acked_upto[ack.epoch] = max(start, ack.upto_seq)
            for seq in ack.seqs:
                self.ack_t.setdefault((ack.epoch, seq), now)

    return TimedUplink


def _thumbnail_jpeg(i: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(i)
    img = (rng.random((96, 96, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _result(i: int, station: str, nok: bool, map_hw: np.ndarray, thumb: bytes) -> tuple[dict, list[bytes]]:
    from protocol.frames import quantise_map
    from protocol.messages import Blob

    now = time.time()
    fields: dict[str, Any] = {
        "frame_id": f"{station}-{i:07d}",
        "capture_ts": now - 0.05,
        "decision_ts": now,
        "bundle_id": "0" * 32,
        "bundle_version": "1.0.0",
        "variant": "rgb+point+fusion",
        "decision": "NOK" if nok else "OK",
        "image_score": 2.5 if nok else 0.4,
        "bank_scores": {"rgb": 0.5, "point": 0.6, "fusion": 0.7},
        "threshold": 1.0,
        "latency_ms": {"preprocess": 12.0, "features": 60.0, "score": 8.0, "total": 85.0},
    }
    blobs: list[bytes] = []
    if nok:
        meta, payload = quantise_map(map_hw + np.float32(i % 7) * 0.01, frame=1)
        fields["anomaly_map"] = meta
        fields["thumbnail"] = Blob(frame=2, codec="jpeg", size_bytes=len(thumb))
        blobs = [payload, thumb]
    return fields, blobs


def run_station(args: argparse.Namespace) -> int:
    """One station process: submit at --fps for --seconds, drain, write its measurements as JSON."""
    from edge.outbox import Outbox, OutboxLimits
    from edge.uplink import UplinkConfig

    rng = np.random.default_rng(abs(hash(args.station_id)) % 2**32)
    map_hw = rng.random((224, 224), dtype=np.float32)
    thumb = _thumbnail_jpeg(0)
    outbox = Outbox(args.outbox, args.station_id, OutboxLimits())
    uplink = _timed_uplink_class().from_paths(
        outbox, args.collector, args.curve_dir, args.collector_key, UplinkConfig(heartbeat_s=1.0)
    )
    uplink.start()
    uplink.set_status(fps=args.fps, bundle_id="0" * 32, bundle_version="1.0.0")
    submit_t: dict[tuple[int, int], float] = {}
    depth: list[tuple[float, int]] = []
    count = int(args.fps * args.seconds)
    t0 = time.monotonic()
    next_sample = t0
    try:
        for i in range(count):
            delay = t0 + i / args.fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            fields, blobs = _result(
                i, args.station_id, args.nok_every > 0 and i % args.nok_every == 0, map_hw, thumb
            )
            started = time.monotonic()
            key = uplink.submit(fields, blobs)
            submit_t[key] = started
            if started >= next_sample:
                depth.append((round(started - t0, 2), outbox.depth()))
                next_sample += 0.5
        submit_s = time.monotonic() - t0
        drained = uplink.drain(args.drain_s)
        depth.append((round(time.monotonic() - t0, 2), outbox.depth()))
        stats = uplink.stats()
    finally:
        uplink.close()
        outbox.close()
    latencies = [(uplink.ack_t[k] - t) * 1000 for k, t in submit_t.items() if k in uplink.ack_t]
    epochs: dict[int, int] = {}
    for epoch, seq in submit_t:
        epochs[epoch] = max(epochs.get(epoch, 0), seq)
    report = {
        "station_id": args.station_id,
        "submitted": len(submit_t),
        "assigned": {str(e): n for e, n in epochs.items()},  # seqs 1..n per epoch
        "submit_s": submit_s,
        "drained": drained,
        "acked_seen": len(latencies),
        "ack_ms": latencies,
        "outbox_depth": depth,
        "resent": stats.resent,
        "reconnects": stats.reconnects,
        "dropped": stats.dropped,
    }
    Path(args.out).write_text(json.dumps(report), encoding="utf-8")
    return 0 if drained else 1


# --------------------------------------------------------------------------------------------- fleet


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"collector exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"collector did not listen on {port} within {timeout_s} s")


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _start_collector(kind: str, work: Path, keys: dict[str, Path], port: int) -> tuple[subprocess.Popen, str]:
    endpoint = f"tcp://127.0.0.1:{port}"
    log = (work / "collector.log").open("wb")
    if kind == "m3dm":
        db_url = f"sqlite:///{work / 'collector.db'}"
        cmd = [
            str(Path(sys.executable).with_name("m3dm")),
            "collector",
            "serve",
            "--bind",
            endpoint,
            "--db",
            db_url,
            "--curve-dir",
            str(keys["collector"]),
            "--allow",
            str(keys["allow"]),
            "--http",
            "",
        ]
    else:
        db_url = str(work / "ack.db")
        cmd = [sys.executable, str(REPO / "tests" / "reliability" / "ack_server.py"), "--bind", endpoint]
        cmd += ["--db", db_url, "--curve-dir", str(keys["collector"]), "--allow", str(keys["allow"])]
        cmd += ["--endpoint-file", str(work / "endpoint")]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=work)
    return proc, db_url


def _stored_identities(kind: str, db_url: str) -> list[tuple[str, int, int]]:
    if kind == "m3dm":
        from collector.store import Store

        store = Store.open(db_url, migrate=False)
        try:
            return [tuple(r) for r in store.identities()]
        finally:
            store.close()
    import sqlite3

    with sqlite3.connect(db_url) as db:
        return [tuple(r) for r in db.execute("SELECT station_id, epoch, seq FROM results")]


def _make_keys(work: Path, n: int) -> dict[str, Any]:
    from protocol.curve import generate_keypair

    generate_keypair(work / "keys" / "collector", "collector")
    allow = work / "keys" / "allow"
    allow.mkdir(parents=True)
    stations = {}
    for i in range(n):
        name = f"station-{i:02d}"
        public, _ = generate_keypair(work / "keys" / name, name)
        shutil.copy(public, allow / public.name)
        stations[name] = work / "keys" / name
    return {"collector": work / "keys" / "collector", "allow": allow, "stations": stations}


def _percentile(values: list[float], q: float) -> float | None:
    return None if not values else float(np.percentile(np.asarray(values), q))


def _sample(proc: Any, cpu: list[float], rss: list[float]) -> None:
    import psutil

    try:
        procs = [proc, *proc.children(recursive=True)]
        cpu.append(sum(p.cpu_percent(None) for p in procs))
        rss.append(sum(p.memory_info().rss for p in procs) / 2**20)
    except psutil.Error:
        pass


def _depth_windows(reports: list[dict], window_s: float = 5.0) -> list[tuple[float, int]]:
    """Fleet-wide maximum outbox depth per window: [(window start s, max depth over every station)]."""
    peaks: dict[int, int] = {}
    for r in reports:
        for t, d in r["outbox_depth"]:
            w = int(t // window_s)
            peaks[w] = max(peaks.get(w, 0), d)
    return [(w * window_s, peaks[w]) for w in sorted(peaks)]


def _reconcile(reports: list[dict], stored: list[tuple[str, int, int]]) -> dict[str, int]:
    expected = {
        (r["station_id"], int(e), s)
        for r in reports
        for e, n in r["assigned"].items()
        for s in range(1, n + 1)
    }
    stored_set = set(stored)
    return {
        "sent": len(expected),
        "stored": len(stored_set),
        "lost": len(expected - stored_set),
        "unexpected": len(stored_set - expected),
        "duplicated": len(stored) - len(stored_set),
    }


def run_fleet(args: argparse.Namespace) -> dict:  # noqa: PLR0915 - one linear experiment
    import psutil

    work = Path(args.workdir or tempfile.mkdtemp(prefix="m3dm-load-"))
    work.mkdir(parents=True, exist_ok=True)
    keys = _make_keys(work, args.stations)
    port = _free_port()
    load_before = os.getloadavg()
    collector, db_url = _start_collector(args.collector, work, keys, port)
    stations: list[subprocess.Popen] = []
    cpu: list[float] = []
    rss: list[float] = []
    try:
        _wait_port(port, collector, 60)
        ps = psutil.Process(collector.pid)
        _sample(ps, [], [])  # prime cpu_percent
        endpoint = f"tcp://127.0.0.1:{port}"
        t0 = time.monotonic()
        for name, key_dir in keys["stations"].items():
            cmd = [
                sys.executable,
                __file__,
                "station",
                "--station-id",
                name,
                "--outbox",
                str(work / f"{name}.db"),
            ]
            cmd += [
                "--collector",
                endpoint,
                "--curve-dir",
                str(key_dir),
                "--collector-key",
                str(keys["collector"]),
            ]
            cmd += [
                "--fps",
                str(args.fps),
                "--seconds",
                str(args.seconds),
                "--nok-every",
                str(args.nok_every),
            ]
            cmd += ["--out", str(work / f"{name}.json"), "--drain-s", str(args.drain_s)]
            log = (work / f"{name}.log").open("wb")
            stations.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=work))
        deadline = t0 + args.seconds + args.drain_s + 60
        while any(p.poll() is None for p in stations) and time.monotonic() < deadline:
            time.sleep(1.0)
            _sample(ps, cpu, rss)
        wall_s = time.monotonic() - t0
        codes = [p.poll() for p in stations]
    finally:
        for p in stations:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        if collector.poll() is None:
            collector.send_signal(signal.SIGTERM)
            try:
                collector.wait(15)
            except subprocess.TimeoutExpired:
                collector.kill()
                collector.wait(10)
    reports = [
        json.loads((work / f"{n}.json").read_text())
        for n in keys["stations"]
        if (work / f"{n}.json").exists()
    ]
    latencies = [x for r in reports for x in r["ack_ms"]]
    recon = _reconcile(reports, _stored_identities(args.collector, db_url))
    windows = _depth_windows(reports)
    summary = {
        "settings": {
            "stations": args.stations,
            "fps_per_station": args.fps,
            "seconds": args.seconds,
            "nok_every": args.nok_every,
            "map": "224x224 u8-zlib + 96x96 JPEG thumbnail on NOK",
            "collector": "m3dm collector serve (SQLite WAL)" if args.collector == "m3dm" else "ack-server",
            "cores": os.cpu_count(),
        },
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "wall_s": round(wall_s, 1),
        "results_per_s": round(
            recon["sent"] / max(max((r["submit_s"] for r in reports), default=1.0), 1e-9), 1
        ),
        "station_exit_codes": codes,
        "all_drained": all(r["drained"] for r in reports) and len(reports) == args.stations,
        "reconciliation": recon,
        "ack_ms": {
            "p50": _percentile(latencies, 50),
            "p95": _percentile(latencies, 95),
            "p99": _percentile(latencies, 99),
            "max": max(latencies, default=None),
            "n": len(latencies),
        },
        "collector_cpu_pct": {"mean": float(np.mean(cpu)) if cpu else None, "max": max(cpu, default=None)},
        "collector_rss_mb": {"max": max(rss, default=None), "last": rss[-1] if rss else None},
        "outbox_depth_max": max((d for _, d in windows), default=0),
        "outbox_depth_by_5s": windows,
        "resent": sum(r["resent"] for r in reports),
        "reconnects": sum(r["reconnects"] for r in reports),
        "dropped": sum(r["dropped"] for r in reports),
        "workdir": str(work),
    }
    return summary


def _ok(summary: dict) -> bool:
    recon = summary["reconciliation"]
    return summary["all_drained"] and recon["lost"] == recon["duplicated"] == recon["unexpected"] == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="role")
    fleet = sub.add_parser("fleet", help="the benchmark (default)")
    fleet.add_argument("--stations", type=int, default=8)
    fleet.add_argument("--fps", type=float, default=10.0)
    fleet.add_argument("--seconds", type=float, default=60.0)
    fleet.add_argument("--nok-every", type=int, default=10)
    fleet.add_argument("--collector", choices=["m3dm", "ack-server"], default="m3dm")
    fleet.add_argument("--drain-s", type=float, default=60.0)
    fleet.add_argument("--workdir", type=Path, default=None)
    fleet.add_argument("--keep", action="store_true", help="keep the work folder (databases, logs)")
    fleet.add_argument("--json-out", type=Path, default=None)
    station = sub.add_parser("station", help="one station process (started by the fleet run)")
    for name in ("--station-id", "--outbox", "--collector", "--curve-dir", "--collector-key", "--out"):
        station.add_argument(name, required=True)
    station.add_argument("--fps", type=float, required=True)
    station.add_argument("--seconds", type=float, required=True)
    station.add_argument("--nok-every", type=int, default=10)
    station.add_argument("--drain-s", type=float, default=60.0)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("fleet", "station", "-h", "--help"):
        argv = ["fleet", *argv]
    args = parser.parse_args(argv)
    if args.role == "station":
        return run_station(args)
    summary = run_fleet(args)
    if not args.keep and args.workdir is None:
        shutil.rmtree(summary["workdir"], ignore_errors=True)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n", encoding="utf-8")
    return 0 if _ok(summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
