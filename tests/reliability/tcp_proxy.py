"""A small TCP proxy for network-cut tests: forwards 127.0.0.1:PORT to a target, can cut the link and heal.

    proxy = TcpProxy("127.0.0.1", collector_port).start()
    proxy.cut("reset")       # every connection reset (RST), new ones refused: a switch that reboots
    proxy.cut("blackhole")   # bytes stop moving both ways, new connections hang: a pulled cable
    proxy.heal()             # forwarding resumes (blackholed connections resume where they stopped)
    proxy.cut_for(3.0, "blackhole")   # cut now, heal in 3 s (a timer thread)
    proxy.close()

As a script (for bench runs): `python tcp_proxy.py --target HOST:PORT [--port P] --cut-every S --cut-s N
--mode reset|blackhole` prints the port it listens on, then cuts the link for N s every S s.
"""

from __future__ import annotations

import argparse
import select
import socket
import struct
import sys
import threading
import time

__all__ = ["TcpProxy"]

_MODES = ("up", "reset", "blackhole")


class TcpProxy:
    """Thread-per-connection TCP forwarder with a link switch (see module doc)."""

    def __init__(self, target_host: str, target_port: int, listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", listen_port))
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self.mode = "up"
        self.connections_accepted = 0
        self.connections_reset = 0
        self.bytes_forwarded = 0
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._spawn(self._accept_loop)
        return self

    def cut(self, mode: str = "reset") -> None:
        if mode not in ("reset", "blackhole"):
            raise ValueError(f"mode must be reset or blackhole, not {mode!r}")
        with self._lock:
            self.mode = mode
            if mode == "reset":
                pairs, self._pairs = self._pairs, []
                for pair in pairs:
                    self.connections_reset += 1
                    for sock in pair:
                        _shut(sock)  # the pump thread owns the fd and closes it

    def heal(self) -> None:
        with self._lock:
            self.mode = "up"

    def cut_for(self, seconds: float, mode: str = "reset") -> threading.Timer:
        self.cut(mode)
        timer = threading.Timer(seconds, self.heal)
        timer.daemon = True
        timer.start()
        return timer

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                _shut(sock)
        for thread in self._threads:
            thread.join(timeout=2)
        self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.mode == "reset":
                _reset(client)
                continue
            self.connections_accepted += 1
            self._spawn(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        while self.mode == "blackhole" and not self._closed.is_set():
            time.sleep(0.02)  # a new connection during a blackhole hangs until the link heals
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            _reset(client)
            return
        with self._lock:
            if self.mode == "reset":
                _reset(client)
                _reset(upstream)
                return
            self._pairs.append((client, upstream))
        self._pump(client, upstream)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        try:
            while not self._closed.is_set():
                if self.mode == "blackhole":
                    time.sleep(
                        0.02
                    )  # nothing read: TCP flow control stalls both ends, as with a pulled cable
                    continue
                readable, _, _ = select.select([a, b], [], [], 0.05)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peer[sock].sendall(data)
                    self.bytes_forwarded += len(data)
        except (OSError, ValueError):
            return  # reset by cut() or by a peer
        finally:
            for sock in (a, b):
                _reset(sock)
            with self._lock:
                self._pairs = [p for p in self._pairs if p != (a, b)]


def _shut(sock: socket.socket) -> None:
    """Cut a connection another thread is pumping: RST-on-close armed, both directions shut (wakes select)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a failing link does; ignore a socket already closed."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="HOST:PORT")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cut-every", type=float, default=0.0, help="seconds between cuts (0: never)")
    p.add_argument("--cut-s", type=float, default=3.0)
    p.add_argument("--mode", choices=("reset", "blackhole"), default="reset")
    args = p.parse_args(argv)
    host, port = args.target.rsplit(":", 1)
    proxy = TcpProxy(host, int(port), args.port).start()
    print(proxy.port, flush=True)
    try:
        while True:
            if args.cut_every <= 0:
                time.sleep(3600)
                continue
            time.sleep(args.cut_every)
            print(f"cut {args.mode} for {args.cut_s} s", flush=True)
            proxy.cut(args.mode)
            time.sleep(args.cut_s)
            proxy.heal()
            print("healed", flush=True)
    except KeyboardInterrupt:
        return 0
    finally:
        proxy.close()


if __name__ == "__main__":
    sys.exit(main())
