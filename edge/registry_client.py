"""The station's request/reply link to the registry: a CURVE DEALER, one request in flight at a time.

A request that gets no answer within the timeout closes the socket (linger 0) and opens a new one, so a
late reply to an abandoned request can never be taken for the answer to the next one. Replies of an
unexpected type are logged and skipped. Raises `RegistryUnavailable` when no answer came.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import zmq

from protocol.curve import load_keypair, load_public_key
from protocol.deploy_messages import station_accepts
from protocol.frames import DEFAULT_LIMITS, ProtocolError, decode, encode
from protocol.messages import ErrorReply, Message

__all__ = ["RegistryClient", "RegistryRefusedError", "RegistryUnavailableError"]

log = logging.getLogger("m3dm.updater")


class RegistryUnavailableError(ConnectionError):
    """No reply from the registry in time."""


class RegistryRefusedError(RuntimeError):
    """The registry answered with an ErrorReply."""

    def __init__(self, reply: ErrorReply) -> None:
        self.code, self.reason = reply.code, reply.reason
        super().__init__(f"registry refused: {reply.code}: {reply.reason}")


class RegistryClient:
    def __init__(self, endpoint: str, curve_dir: Path, registry_key: Path, timeout_s: float = 5.0) -> None:
        self.endpoint = endpoint
        self.keypair = load_keypair(curve_dir)
        self.server_public = load_public_key(registry_key)
        self.timeout_s = timeout_s
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            self.keypair.apply_client(sock, self.server_public)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, DEFAULT_LIMITS.max_total_bytes)
            sock.setsockopt(zmq.RECONNECT_IVL, 200)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def reset(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def close(self) -> None:
        self.reset()

    def request(
        self, msg: Message, expect: type | tuple[type, ...], blobs: tuple[bytes, ...] = ()
    ) -> tuple[Any, list[bytes]]:
        """Send `msg`, wait for a reply of type `expect` (or raise RegistryRefusedError / Unavailable)."""
        sock = self._socket()
        try:
            sock.send_multipart(encode(msg, blobs), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.reset()
            raise RegistryUnavailableError(f"registry {self.endpoint}: send queue full") from None
        deadline = time.monotonic() + self.timeout_s
        while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            if not sock.poll(left_ms, zmq.POLLIN):
                break
            frames = sock.recv_multipart()
            try:
                reply, reply_blobs = decode(frames, station_accepts)
            except ProtocolError as err:
                log.warning("bad reply from registry: %s", err)
                continue
            if isinstance(reply, ErrorReply):
                raise RegistryRefusedError(reply)
            if isinstance(reply, expect):
                return reply, reply_blobs
            log.debug("skipping stale %s from registry", type(reply).__name__)
        self.reset()
        raise RegistryUnavailableError(f"registry {self.endpoint}: no reply within {self.timeout_s:g} s")
