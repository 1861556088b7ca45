"""The registry's bundle store: publish (verify, then keep) a bundle tar, and serve it in chunks.

`publish` extracts the tar into a scratch folder with `edge.bundle.safe_extract` and verifies it with
`edge.bundle.verify_bundle` against the trusted signing key BEFORE anything is recorded: the registry never
offers a bundle its own key did not sign (stations verify again; the registry is not their trust anchor).
The tar is stored as `STORE/<bundle_id>.tar` with its sha256 and the sha256 of every chunk, which the
offer carries so a station checks each chunk as it arrives.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from deploy.audit import record
from deploy.db import dumps, loads, writer
from deploy.tables import bundles
from edge.bundle import safe_extract, verify_bundle
from protocol.deploy_messages import CHUNK_BYTES, BundleOffer
from protocol.errors import BundleError

__all__ = ["PublishError", "chunk_digests", "offer_for", "publish", "read_chunk"]


class PublishError(ValueError):
    """A bundle the registry refuses to publish (unverifiable, duplicate with other bytes, unreadable)."""


def chunk_digests(path: Path, chunk_bytes: int) -> tuple[str, list[str]]:
    """(sha256 of the file, sha256 of each chunk) in one pass."""
    whole = hashlib.sha256()
    chunks = []
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(chunk_bytes), b""):
            whole.update(block)
            chunks.append(hashlib.sha256(block).hexdigest())
    return whole.hexdigest(), chunks


def _trusted_public(key: Path) -> Path:
    return key / "bundle_signing.pub" if key.is_dir() else key


def publish(
    engine: sa.Engine,
    tar_path: Path,
    store_dir: Path,
    key: Path,
    actor: str,
    reason: str = "",
    chunk_bytes: int = CHUNK_BYTES,
) -> dict[str, Any]:
    """Verify and store one bundle tar; returns its row. Publishing the same bytes twice is a no-op."""
    tar_path, store_dir = Path(tar_path), Path(store_dir)
    if not tar_path.is_file():
        raise PublishError(f"{tar_path}: no such bundle tar")
    scratch = Path(tempfile.mkdtemp(prefix="m3dm-publish-"))
    try:
        root = safe_extract(tar_path, scratch / "bundle")
        manifest = verify_bundle(root, _trusted_public(Path(key)))
    except BundleError as err:
        raise PublishError(f"{tar_path}: refused: {err}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    digest, chunks = chunk_digests(tar_path, chunk_bytes)
    with engine.connect() as conn:  # a re-publish is answered without copying the tar
        existing = _published(conn, manifest.bundle_id, digest)
    if existing is not None:
        return existing
    store_dir.mkdir(parents=True, exist_ok=True)
    target = store_dir / f"{manifest.bundle_id}.tar"
    # Copied before the write lock is taken, so the registry waits for a rename and two inserts, not for a
    # multi-MB copy; a unique name keeps two concurrent publishers of one bundle off each other's file.
    handle, partial_name = tempfile.mkstemp(dir=store_dir, prefix=f"{manifest.bundle_id}.", suffix=".partial")
    os.close(handle)
    partial = Path(partial_name)
    try:
        shutil.copyfile(tar_path, partial)
        # A write transaction from BEGIN: a read that later upgrades to a write gets SQLITE_BUSY at once
        # (no busy wait) when the registry committed in between, which is what broke the demo's publish.
        with writer(engine).begin() as conn:
            existing = _published(conn, manifest.bundle_id, digest)
            if existing is not None:
                return existing
            os.replace(partial, target)
            row = {
                "bundle_id": manifest.bundle_id,
                "version": manifest.version,
                "class_name": manifest.class_name,
                "anti_rollback_counter": manifest.anti_rollback_counter,
                "size_bytes": target.stat().st_size,
                "sha256": digest,
                "chunk_bytes": chunk_bytes,
                "chunk_sha256": dumps(chunks),
                "path": str(target.resolve()),
                "published_ts": time.time(),
                "published_by": actor,
            }
            conn.execute(bundles.insert().values(**row))
            record(
                conn,
                actor,
                "publish",
                f"bundle:{manifest.bundle_id}",
                reason,
                {"version": manifest.version, "class": manifest.class_name, "sha256": digest},
            )
    finally:
        partial.unlink(missing_ok=True)
    return row


def _published(conn: sa.Connection, bundle_id: str, digest: str) -> dict[str, Any] | None:
    """The stored row of `bundle_id` if it is published with these bytes; refuses other bytes."""
    existing = conn.execute(sa.select(bundles).where(bundles.c.bundle_id == bundle_id)).first()
    if existing is None:
        return None
    if existing.sha256 != digest:
        raise PublishError(f"bundle {bundle_id} is already published with different bytes")
    return dict(existing._mapping)


def offer_for(row: Any) -> BundleOffer:
    return BundleOffer(
        bundle_id=row.bundle_id,
        version=row.version,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        chunk_bytes=row.chunk_bytes,
        chunk_sha256=tuple(loads(row.chunk_sha256, [])),
        anti_rollback_counter=row.anti_rollback_counter,
    )


def read_chunk(row: Any, index: int) -> bytes:
    """Chunk `index` of a stored bundle; IndexError for an index past the end."""
    n_chunks = len(loads(row.chunk_sha256, []))
    if not 0 <= index < n_chunks:
        raise IndexError(f"bundle {row.bundle_id} has {n_chunks} chunks, not {index + 1}")
    with open(row.path, "rb") as handle:
        handle.seek(index * row.chunk_bytes)
        return handle.read(row.chunk_bytes)
