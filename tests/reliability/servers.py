"""Server roles as real processes for the reliability tests: `m3dm collector serve`, `m3dm deploy serve`.

Each `Server` is stopped (SIGTERM, then SIGKILL) by whoever started it, in a finally or a `with`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

M3DM = [sys.executable, "-m", "m3dm"]
ENDPOINT = re.compile(r"tcp://127\.0\.0\.1:\d+")


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


class Server:
    """A server command as a process; `endpoint` is read from the first log line that names one."""

    def __init__(self, cmd: list[str], log: Path, timeout_s: float = 60.0) -> None:
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env())
        deadline = time.monotonic() + timeout_s
        self.endpoint = ""
        while not self.endpoint:
            found = ENDPOINT.search(log.read_text(errors="replace"))
            if found:
                self.endpoint = found.group(0)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{cmd[2:5]} did not start: {log.read_text(errors='replace')[-3000:]}")
            else:
                time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._out.close()
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def collector(workdir: Path, curve_dir: Path, allow_dir: Path) -> Server:
    """`m3dm collector serve` on an OS-chosen loopback port, SQLite at workdir/c.db, no HTTP."""
    cmd = [*M3DM, "collector", "serve", "--bind", "tcp://127.0.0.1:0", "--db", db_url(workdir)]
    cmd += ["--curve-dir", str(curve_dir), "--allow", str(allow_dir), "--http", ""]
    return Server(cmd, workdir / "collector.log")


def registry(workdir: Path, curve_dir: Path, allow_dir: Path, signing_public: Path, *extra: str) -> Server:
    """`m3dm deploy serve` on an OS-chosen loopback port, SQLite at workdir/r.db; `extra` flags appended."""
    cmd = [*M3DM, "deploy", "serve", "--store", str(workdir / "store"), "--bind", "tcp://127.0.0.1:0"]
    cmd += ["--db", registry_db_url(workdir), "--curve-dir", str(curve_dir)]
    cmd += ["--allow", str(allow_dir), "--signing-key", str(signing_public), *extra]
    return Server(cmd, workdir / "registry.log")


def registry_db_url(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'r.db'}"


def db_url(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'c.db'}"


def stored_identities(workdir: Path) -> set[tuple[str, int, int]]:
    """(station, epoch, seq) of every result the collector at `workdir` stored."""
    from collector.store import Store

    store = Store.open(db_url(workdir), migrate=False)
    try:
        return {tuple(row) for row in store.identities()}
    finally:
        store.close()


def stored_count(workdir: Path, station: str | None = None) -> int:
    from collector.store import Store

    if not (workdir / "c.db").exists():
        return 0
    store = Store.open(db_url(workdir), migrate=False)
    try:
        return store.count(station=station)
    finally:
        store.close()
