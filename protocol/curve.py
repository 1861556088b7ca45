"""CURVE keys and the allow-list every server role (collector, registry) shares. pyzmq only.

Key files are pyzmq's certificate format (`zmq.auth.create_certificates`): `NAME.key` holds the public key,
`NAME.key_secret` both. A server accepts a client only if the client's public key is in its allow folder;
`AllowListAuthenticator` re-reads that folder when it changes, so revoking a key (deleting its file) takes
effect without a restart. New connections are checked; the ZAP handshake happens once per connection, so
`disconnect_revoked` is how a server drops an already-connected peer whose key was revoked.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Any

__all__ = [
    "AllowListAuthenticator",
    "KeyPair",
    "fingerprint",
    "generate_keypair",
    "load_keypair",
    "load_public_key",
    "read_allow_folder",
]

log = logging.getLogger("m3dm.curve")


class KeyPair:
    """A CURVE keypair (z85-encoded bytes, as pyzmq wants them)."""

    def __init__(self, public: bytes, secret: bytes) -> None:
        self.public = public
        self.secret = secret

    def apply_server(self, socket: Any) -> None:
        """Make `socket` a CURVE server with this keypair."""
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def apply_client(self, socket: Any, server_public: bytes) -> None:
        """Make `socket` a CURVE client of the server whose public key is `server_public`."""
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_serverkey = server_public


def fingerprint(public_key: bytes) -> str:
    """Short stable id of a public key: first 16 hex digits of its sha256 (for logs and the station table)."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def generate_keypair(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write `out_dir/NAME.key` and `NAME.key_secret`; refuse to overwrite an existing secret key."""
    import zmq.auth

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    secret = out_dir / f"{name}.key_secret"
    if secret.exists():
        raise FileExistsError(f"{secret} exists; refusing to overwrite a secret key")
    public_path, secret_path = zmq.auth.create_certificates(str(out_dir), name)
    Path(secret_path).chmod(0o600)
    return Path(public_path), Path(secret_path)


def _single(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise FileNotFoundError(f"{folder}: expected exactly one {pattern} file, found {len(found)}")
    return found[0]


def load_keypair(path: Path) -> KeyPair:
    """Own keypair from a `.key_secret` file, or a folder holding exactly one."""
    import zmq.auth

    path = Path(path)
    secret_file = _single(path, "*.key_secret") if path.is_dir() else path
    public, secret = zmq.auth.load_certificate(str(secret_file))
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key")
    return KeyPair(public, secret)


def load_public_key(path: Path) -> bytes:
    """A peer's public key from a `.key` file, or a folder holding exactly one `.key` file."""
    import zmq.auth

    path = Path(path)
    public_file = _single(path, "*.key") if path.is_dir() else path
    public, _ = zmq.auth.load_certificate(str(public_file))
    return public


def read_allow_folder(folder: Path) -> set[bytes]:
    """Every public key in `folder/*.key`; unreadable files are logged and skipped, never fatal."""
    import zmq.auth

    keys = set()
    for file in sorted(Path(folder).glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(str(file))
        except (OSError, ValueError) as err:
            log.warning("allow-list: skipping unreadable key %s: %s", file, err)
            continue
        keys.add(public)
    return keys


def _folder_signature(folder: Path) -> tuple:
    try:
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.glob("*.key")))
    except OSError:
        return ()


class AllowListAuthenticator:
    """ZAP for CURVE on a context: only keys in `allow_dir` get in; the folder is re-read when it changes.

    Wraps pyzmq's ThreadAuthenticator (the ZAP handler runs in its own thread). `allowed()` gives the
    current key set, so a server can also drop peers whose key was revoked after they connected.
    """

    def __init__(self, context: Any, allow_dir: Path, poll_s: float = 0.5) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self.allow_dir = Path(allow_dir)
        self.poll_s = poll_s
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("m3dm.zap"))
        self._signature: tuple = ()
        self._keys: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="allow-list", daemon=True)

    def start(self) -> AllowListAuthenticator:
        self._auth.start()
        self.reload()
        self._thread.start()
        return self

    def reload(self) -> None:
        self._signature = _folder_signature(self.allow_dir)
        self._keys = read_allow_folder(self.allow_dir)
        # configure_curve with a folder re-reads every *.key in it; the ZAP thread uses the new set at once.
        self._auth.configure_curve(domain="*", location=str(self.allow_dir))
        log.info("allow-list %s: %d station key(s)", self.allow_dir, len(self._keys))

    def allowed(self) -> set[bytes]:
        return set(self._keys)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            if _folder_signature(self.allow_dir) != self._signature:
                self.reload()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self._auth.stop()
