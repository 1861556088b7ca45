"""Real processes for delivery tests: CURVE keys, the ack server, the station driver, exact reconciliation.

Every process started here is killed by the context manager that started it, whatever the test does.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from protocol.curve import generate_keypair

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@dataclass(frozen=True)
class Keys:
    collector_dir: Path
    collector_public: Path
    allow_dir: Path
    root: Path

    def station(self, name: str, allowed: bool = True) -> Path:
        """A station's keypair folder; its public key goes into the allow folder if `allowed`."""
        folder = self.root / name
        public, _ = generate_keypair(folder, name)
        if allowed:
            (self.allow_dir / public.name).write_bytes(public.read_bytes())
        return folder


def make_keys(root: Path) -> Keys:
    collector_dir = root / "collector"
    public, _ = generate_keypair(collector_dir, "collector")
    allow = root / "allow"
    allow.mkdir(parents=True)
    return Keys(collector_dir, public, allow, root)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 5.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)


class AckServer:
    """tests/reliability/ack_server.py as a process; `rows()` reads what it stored."""

    def __init__(
        self, workdir: Path, keys: Keys, refuse_frame: str | None = None, bind: str = "tcp://127.0.0.1:0"
    ):
        self.db = workdir / "collector.db"
        self.log = workdir / "ack_server.log"
        endpoint_file = workdir / "ack_server.endpoint"
        endpoint_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(HERE / "ack_server.py"), "--bind", bind, "--db", str(self.db)]
        cmd += ["--curve-dir", str(keys.collector_dir), "--allow", str(keys.allow_dir)]
        cmd += ["--endpoint-file", str(endpoint_file)]
        if refuse_frame:
            cmd += ["--refuse-frame", refuse_frame]
        self._log_file = self.log.open("ab")
        self.proc = subprocess.Popen(cmd, env=_env(), stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not endpoint_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ack server did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.endpoint = endpoint_file.read_text()
        self.port = int(self.endpoint.rsplit(":", 1)[1])

    def stop(self) -> None:
        _stop(self.proc)
        self._log_file.close()

    def __enter__(self) -> AckServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _query(self, sql: str) -> list[tuple]:
        db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()

    def rows(self) -> list[tuple]:
        """(station_id, epoch, seq, frame_id, decision, capture_ts, nblobs) ordered by identity."""
        return self._query("SELECT * FROM results ORDER BY station_id, epoch, seq")

    def duplicates(self) -> int:
        found = self._query("SELECT value FROM counters WHERE name='duplicates'")
        return found[0][0] if found else 0

    def events(self) -> list[tuple]:
        return self._query("SELECT * FROM events")

    def heartbeats(self) -> list[tuple]:
        return self._query("SELECT * FROM heartbeats")


class Driver:
    """tests/reliability/station_driver.py as a process; stdout JSON lines are collected as they come."""

    def __init__(
        self, workdir: Path, station: str, curve_dir: Path, keys: Keys, collector: str, count: int, *extra
    ):
        self.outbox = workdir / f"{station}.outbox.db"
        self.lines: list[dict] = []
        self.final: dict | None = None
        self.stderr_path = workdir / f"{station}.driver.log"
        cmd = [sys.executable, str(HERE / "station_driver.py"), "--outbox", str(self.outbox)]
        cmd += ["--station-id", station, "--collector", collector, "--curve-dir", str(curve_dir)]
        cmd += ["--collector-key", str(keys.collector_public), "--count", str(count), *map(str, extra)]
        self._stderr = self.stderr_path.open("ab")
        self.proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            record = json.loads(line)
            if "drained" in record:
                self.final = record
            else:
                self.lines.append(record)

    def wait_lines(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.lines) < n:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(
                    f"driver printed {len(self.lines)} < {n} results; log: {self.log()[-2000:]}"
                )
            time.sleep(0.01)

    def wait(self, timeout_s: float) -> int:
        rc = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=5)
        return rc

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)
        self._reader.join(timeout=5)

    def log(self) -> str:
        return self.stderr_path.read_text()

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self.proc.stdout.close()
        self._stderr.close()


def outbox_epochs(outbox: Path) -> dict[int, int]:
    """epoch -> number of seqs the outbox assigned in it (from its `epochs` table)."""
    db = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)
    try:
        return {e: n - 1 for e, n in db.execute("SELECT epoch, next_seq FROM epochs")}
    finally:
        db.close()


def outbox_depth(outbox: Path) -> int:
    db = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM results").fetchone()[0]
    finally:
        db.close()


def reconcile(rows: list[tuple], station: str, assigned: dict[int, int], printed: list[dict]) -> dict:
    """Exact reconciliation of one station: collector rows vs what the outbox assigned and the driver saw.

    Asserts: every assigned (epoch, seq) stored exactly once, nothing else stored, frame ids unique per epoch,
    and every result the driver saw stored (durable) is stored with the same frame id. Returns figures.
    """
    mine = [r for r in rows if r[0] == station]
    keys = [(r[1], r[2]) for r in mine]
    assert len(keys) == len(set(keys)), "a result is stored twice"
    expected = {(e, s) for e, n in assigned.items() for s in range(1, n + 1)}
    stored = set(keys)
    lost = expected - stored
    extra = stored - expected
    assert not lost, f"{len(lost)} result(s) lost, e.g. {sorted(lost)[:5]}"
    assert not extra, f"{len(extra)} result(s) stored that the outbox never assigned: {sorted(extra)[:5]}"
    frames = Counter((r[1], r[3]) for r in mine)  # a restarted station may see the same frames again
    dup_frames = [f for f, n in frames.items() if n > 1]
    assert not dup_frames, f"frames stored under two identities in one epoch: {dup_frames[:5]}"
    by_key = {(r[1], r[2]): r[3] for r in mine}
    for line in printed:
        assert by_key.get((line["epoch"], line["seq"])) == line["frame_id"], f"durable result missing: {line}"
    return {"stored": len(mine), "epochs": dict(sorted(assigned.items()))}
