"""Typed bundle errors: each names the check that failed (and the file, where there is one).

Raised by the trainer when building a bundle and by a station when it extracts or verifies one. `protocol`
imports nothing of ours, so `BundleError` derives from `Exception`, not from `core.errors.M3DMError`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "ArchiveError",
    "BundleError",
    "ExpiredError",
    "HashMismatchError",
    "RollbackError",
    "SchemaError",
    "SignatureError",
]


class BundleError(Exception):
    """A bundle that must not be installed. `check` names the failed check; `path` the file, if any."""

    check = "bundle"

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        self.message = message
        where = f" {self.path}:" if self.path else ""
        super().__init__(f"[{self.check}]{where} {message}")


class SchemaError(BundleError):
    """The manifest is missing, not JSON, or does not match the schema (unknown version, bad field)."""

    check = "schema"


class SignatureError(BundleError):
    """The Ed25519 signature over manifest.json is missing, malformed, or from another key."""

    check = "signature"


class HashMismatchError(BundleError):
    """A file's sha256 differs from the manifest, a listed file is missing, or an unlisted one is present."""

    check = "hashes"


class ExpiredError(BundleError):
    """The manifest's `expires_utc` lies before the station's clock."""

    check = "expiry"


class RollbackError(BundleError):
    """The anti-rollback counter is lower than the station's minimum (an older bundle replayed)."""

    check = "rollback"


class ArchiveError(BundleError):
    """A transport tar that is truncated or holds unsafe members (traversal, links, devices, oversize)."""

    check = "archive"
