"""Run the fleet's roles as real child processes for the demo: start, wait until ready, stop, leave nothing.

Each child runs in its own session (process group), writes stdout+stderr to `logs/<name>.log`, and is
stopped with SIGTERM, then SIGKILL after a grace period, whether the demo ends normally, fails, or is
interrupted. `ProcessGroup` is a context manager so a failing stage can never orphan a process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = ["ChildExitedError", "ManagedProcess", "ProcessGroup", "free_port", "m3dm_argv", "port_open"]


class ChildExitedError(RuntimeError):
    """A child process ended (or never became ready); `log_path` is where to look."""

    def __init__(self, name: str, message: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        super().__init__(f"{name}: {message} (log: {log_path})")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS reports free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True once something listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((host, port)) == 0


def m3dm_argv(*args: str) -> list[str]:
    """`m3dm ARGS...` with this interpreter, so children use the same environment as the demo."""
    return [sys.executable, "-m", "m3dm", *args]


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ProcessGroup:
    """Children of one demo run; `stop_all` (also on exit of the `with` block) ends every one of them."""

    log_dir: Path
    grace_s: float = 8.0
    children: list[ManagedProcess] = field(default_factory=list)

    def __enter__(self) -> ProcessGroup:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        ready: Callable[[], bool] | None = None,
        timeout_s: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> ManagedProcess:
        """Start `argv` as `name`; with `ready`, wait until it returns True (or fail, naming the log)."""
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("wb")
        popen = subprocess.Popen(
            list(argv),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        log_file.close()
        child = ManagedProcess(name, list(argv), log_path, popen)
        self.children.append(child)
        if ready is not None:
            self.wait_until(child, ready, timeout_s, "did not become ready")
        return child

    def wait_until(
        self, child: ManagedProcess, condition: Callable[[], bool], timeout_s: float, what: str
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            if not child.alive():
                raise ChildExitedError(
                    child.name, f"exited with code {child.popen.returncode}", child.log_path
                )
            time.sleep(0.1)
        raise ChildExitedError(child.name, f"{what} within {timeout_s:.0f} s", child.log_path)

    def check_alive(self) -> None:
        """Raise for the first child that died unexpectedly."""
        for child in self.children:
            if child.popen.poll() not in (None, 0):
                raise ChildExitedError(
                    child.name, f"exited with code {child.popen.returncode}", child.log_path
                )

    def wait_exit(self, child: ManagedProcess, timeout_s: float) -> int:
        """Wait for a child that is expected to finish by itself (e.g. a station run with --once)."""
        try:
            return child.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ChildExitedError(
                child.name, f"still running after {timeout_s:.0f} s", child.log_path
            ) from None

    def stop(self, child: ManagedProcess) -> None:
        if child.alive():
            self._signal(child, signal.SIGTERM)
            try:
                child.popen.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                self._signal(child, signal.SIGKILL)
                child.popen.wait(timeout=5)

    def stop_all(self) -> None:
        # Reverse start order: stations before the collector they flush to, collector before the registry.
        for child in reversed(self.children):
            self.stop(child)

    @staticmethod
    def _signal(child: ManagedProcess, sig: signal.Signals) -> None:
        try:
            os.killpg(child.popen.pid, sig)
        except ProcessLookupError:
            pass
