"""The registry service: a CURVE ROUTER that answers station check-ins, serves bundle chunks, records
update reports, and drives rollouts between messages.

One thread owns the socket (ZeroMQ sockets are not thread-safe); the rollout engine ticks in the same loop,
so no lock is needed. Every state change is in the database first, so SIGKILL at any point loses nothing
but the in-flight reply (the station asks again). A bad message gets an ErrorReply and never stops the loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import zmq

from deploy.bundle_store import read_chunk
from deploy.config import RegistryConfig
from deploy.db import make_engine, open_db
from deploy.fleet import StationRefusedError, handle_checkin, handle_report
from deploy.rollout import RolloutEngine
from deploy.tables import bundles
from protocol.curve import AllowListAuthenticator, fingerprint, load_keypair
from protocol.deploy_messages import CheckIn, Chunk, ChunkRequest, DeployAck, UpdateReport, registry_accepts
from protocol.frames import DEFAULT_LIMITS, ProtocolError, decode, encode
from protocol.messages import Blob, ErrorReply

__all__ = ["Registry"]

log = logging.getLogger("m3dm.deploy")


class Registry:
    def __init__(self, cfg: RegistryConfig) -> None:
        self.cfg = cfg
        self.engine = open_db(cfg.db)
        self.collector_engine = make_engine(cfg.collector_db) if cfg.collector_db else self.engine
        self.rollouts = RolloutEngine(self.engine, self.collector_engine)
        self._stop = threading.Event()
        self.endpoint = ""
        self._auth: AllowListAuthenticator | None = None

    def stop(self) -> None:
        self._stop.set()

    def serve(self, ready: Any = None) -> None:
        """Run until stop() or SIGTERM/SIGINT. `ready(endpoint)` is called once the socket is bound."""
        ctx = zmq.Context()
        auth = self._auth = AllowListAuthenticator(ctx, self.cfg.allow_dir).start()
        sock = ctx.socket(zmq.ROUTER)
        try:
            load_keypair(self.cfg.curve_dir).apply_server(sock)
            sock.setsockopt(zmq.MAXMSGSIZE, DEFAULT_LIMITS.max_total_bytes)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
            sock.bind(self.cfg.bind)
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            log.info("registry listening on %s (store %s)", self.endpoint, self.cfg.store)
            if ready is not None:
                ready(self.endpoint)
            self._loop(sock)
        finally:
            sock.close(0)
            auth.stop()
            ctx.term()

    def _loop(self, sock: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        next_tick = 0.0
        while not self._stop.is_set():
            timeout_ms = max(0, int((next_tick - time.monotonic()) * 1000))
            if poller.poll(min(timeout_ms, 200)):
                frames = sock.recv_multipart(copy=False)
                reply = self._handle(frames)
                if reply is not None:
                    try:
                        sock.send_multipart([frames[0].bytes, *reply])
                    except zmq.ZMQError as err:
                        log.warning("reply dropped: %s", err)
            if time.monotonic() >= next_tick:
                try:
                    self.rollouts.tick()
                except sa.exc.SQLAlchemyError as err:
                    log.error("rollout tick failed: %s", err)
                next_tick = time.monotonic() + self.cfg.tick_s

    def _handle(self, frames: list[Any]) -> list[bytes] | None:
        if len(frames) < 2:
            return None
        try:
            user_id = frames[1].get("User-Id") or ""
        except zmq.ZMQError:
            user_id = ""
        peer = fingerprint(user_id.encode()) if user_id else ""
        if self._auth is not None and user_id.encode() not in self._auth.allowed():
            # ZAP checks a key once per connection; a key revoked since then must not keep a station in.
            log.warning("refused message from %s: key no longer allowed", peer or "?")
            return encode(
                ErrorReply(code="not_allowed", reason="this station's key is not (or no longer) allowed")
            )
        try:
            msg, _ = decode(frames[1:], registry_accepts)
            return self._dispatch(msg, peer)
        except ProtocolError as err:
            log.warning("refused message from %s: %s", peer or "?", err)
            return encode(ErrorReply(code=err.code, reason=err.reason))
        except StationRefusedError as err:
            log.warning("refused station: %s", err)
            return encode(ErrorReply(code="not_allowed", reason=str(err)))
        except (sa.exc.SQLAlchemyError, OSError) as err:
            log.error("internal error handling a message from %s: %s", peer or "?", err)
            return encode(ErrorReply(code="internal", reason=type(err).__name__))

    def _dispatch(self, msg: Any, peer: str) -> list[bytes]:
        if isinstance(msg, CheckIn):
            return encode(handle_checkin(self.engine, msg, peer, self.cfg.checkin_s))
        if isinstance(msg, ChunkRequest):
            return self._chunk(msg)
        if isinstance(msg, UpdateReport):
            handle_report(self.engine, msg, peer)
            return encode(DeployAck(bundle_id=msg.bundle_id, outcome=msg.outcome))
        raise ProtocolError("bad_message", f"unexpected {type(msg).__name__}")

    def _chunk(self, msg: ChunkRequest) -> list[bytes]:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(bundles).where(bundles.c.bundle_id == msg.bundle_id)).first()
        if row is None:
            raise ProtocolError("bad_message", f"unknown bundle {msg.bundle_id}")
        try:
            data = read_chunk(row, msg.index)
        except IndexError as err:
            raise ProtocolError("bad_message", str(err)) from None
        header = Chunk(
            bundle_id=msg.bundle_id,
            index=msg.index,
            offset=msg.index * row.chunk_bytes,
            sha256=hashlib.sha256(data).hexdigest(),
            data=Blob(frame=1, codec="raw", size_bytes=len(data)),
        )
        return encode(header, [data])


def _announce(cfg: RegistryConfig, endpoint: str) -> None:
    if cfg.ready_file is not None:
        tmp = Path(cfg.ready_file).with_suffix(".tmp")
        tmp.write_text(json.dumps({"zmq": endpoint, "pid": os.getpid()}))
        tmp.replace(cfg.ready_file)  # atomic: a reader never sees half a file
    log.info("registry ready on %s", endpoint)


def run_until_signal(cfg: RegistryConfig) -> None:
    registry = Registry(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: registry.stop())
    registry.serve(ready=lambda ep: _announce(cfg, ep))
