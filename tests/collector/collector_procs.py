"""Helpers for collector tests with real processes: keys, a `m3dm collector serve` process, a CURVE client."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from protocol.curve import generate_keypair, load_keypair, load_public_key
from protocol.frames import decode, encode
from protocol.messages import Ack, ErrorReply, Heartbeat

M3DM = str(Path(sys.executable).with_name("m3dm"))
Reply = Ack | Heartbeat | ErrorReply


def make_keys(root: Path, stations: list[str], allowed: list[str]) -> dict[str, Path]:
    """root/collector (keypair), root/NAME per station, root/allow with the allowed stations' public keys."""
    generate_keypair(root / "collector", "collector")
    (root / "allow").mkdir(parents=True)
    for name in stations:
        public, _ = generate_keypair(root / name, name)
        if name in allowed:
            (root / "allow" / public.name).write_bytes(public.read_bytes())
    return {"collector": root / "collector", "allow": root / "allow", **{n: root / n for n in stations}}


class Collector:
    """`m3dm collector serve` as a child process; `endpoint` and `http` once it is ready."""

    def __init__(
        self, work: Path, db_url: str, keys: dict[str, Path], bind: str = "tcp://127.0.0.1:*"
    ) -> None:
        self.work, self.db_url, self.keys, self.bind = work, db_url, keys, bind
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""
        self.http = ""
        self.starts = 0

    def start(self, timeout_s: float = 30.0, extra: tuple[str, ...] = ()) -> Collector:
        ready = self.work / "ready.json"
        ready.unlink(missing_ok=True)
        self.starts += 1
        cmd = [M3DM, "collector", "serve", "--bind", self.bind, "--db", self.db_url, "--http", "127.0.0.1:0"]
        cmd += ["--curve-dir", str(self.keys["collector"]), "--allow", str(self.keys["allow"])]
        cmd += ["--ready-file", str(ready), *extra]
        with (self.work / f"collector-{self.starts}.log").open("wb") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"collector did not start: {self.log_text()[-2000:]}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.endpoint = info["zmq"]
        self.http = f"http://127.0.0.1:{info['http_port']}"
        self.bind = self.endpoint  # a restart binds the same port, so stations reconnect by themselves
        return self

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.work.glob("collector-*.log")))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Client:
    """A station-side CURVE DEALER sending raw frames and reading decoded replies."""

    def __init__(self, endpoint: str, own_keys: Path, collector_keys: Path) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        load_keypair(own_keys).apply_client(self.sock, load_public_key(collector_keys))
        self.sock.connect(endpoint)

    def send(self, message: Any, blobs: list[bytes] = ()) -> None:
        self.send_frames(encode(message, blobs))

    def send_frames(self, frames: list[Any]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float = 5.0) -> Any | None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return decode(self.sock.recv_multipart(), Reply)[0]

    def recv_until(self, predicate, timeout_s: float = 10.0) -> list[Any]:
        """Replies until one satisfies `predicate` (returned last); AssertionError on timeout."""
        got: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            reply = self.recv(max(0.01, deadline - time.monotonic()))
            if reply is not None:
                got.append(reply)
                if predicate(reply):
                    return got
        raise AssertionError(f"no matching reply within {timeout_s} s; got {got}")

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
