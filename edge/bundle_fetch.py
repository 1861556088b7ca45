"""Chunked bundle download with resume; sha256 checked per chunk (against the offer) and per file.

The partial download is `DOWNLOADS/<bundle_id>.tar.part`. On (re)start its complete chunks are re-hashed
against the offer: the good prefix is kept, anything after the first bad or short chunk is cut off, and
the download resumes from there. The finished file must match the offer's size and sha256 before it is
renamed to `<bundle_id>.tar`; a chunk whose bytes do not match its hash is fetched again (a few tries).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from protocol.deploy_messages import BundleOffer

__all__ = ["DownloadError", "download_bundle", "resume_offset"]

log = logging.getLogger("m3dm.updater")

_TRIES_PER_CHUNK = 3


class DownloadError(RuntimeError):
    """A download that cannot complete (bad chunks from the registry, size or sha256 mismatch)."""


def _n_chunks(offer: BundleOffer) -> int:
    return len(offer.chunk_sha256)


def _check_offer(offer: BundleOffer) -> None:
    expected = -(-offer.size_bytes // offer.chunk_bytes) if offer.chunk_bytes > 0 else -1
    if offer.chunk_bytes <= 0 or expected != _n_chunks(offer):
        raise DownloadError(
            f"offer for {offer.bundle_id}: {_n_chunks(offer)} chunk hashes for {offer.size_bytes} bytes"
        )


def resume_offset(part: Path, offer: BundleOffer) -> int:
    """Number of leading chunks of `part` that match the offer; the file is truncated to them."""
    if not part.exists():
        return 0
    good = 0
    with part.open("rb") as handle:
        for index in range(_n_chunks(offer)):
            block = handle.read(offer.chunk_bytes)
            expected_len = min(offer.chunk_bytes, offer.size_bytes - index * offer.chunk_bytes)
            if len(block) != expected_len or hashlib.sha256(block).hexdigest() != offer.chunk_sha256[index]:
                break
            good += 1
    os.truncate(part, good * offer.chunk_bytes if good < _n_chunks(offer) else offer.size_bytes)
    return good


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def download_bundle(
    offer: BundleOffer,
    downloads: Path,
    fetch_chunk: Callable[[int], bytes],
    on_chunk: Callable[[int, int], None] | None = None,
) -> tuple[Path, int]:
    """Fetch every missing chunk via `fetch_chunk(index) -> bytes`; returns (tar path, chunks resumed)."""
    _check_offer(offer)
    downloads.mkdir(parents=True, exist_ok=True)
    final = downloads / f"{offer.bundle_id}.tar"
    if final.exists() and final.stat().st_size == offer.size_bytes and _file_sha256(final) == offer.sha256:
        return final, _n_chunks(offer)
    part = downloads / f"{offer.bundle_id}.tar.part"
    resumed = resume_offset(part, offer)
    if resumed:
        log.info(
            "bundle %s: resuming download at chunk %d of %d", offer.bundle_id[:8], resumed, _n_chunks(offer)
        )
    with part.open("ab") as sink:
        for index in range(resumed, _n_chunks(offer)):
            for attempt in range(_TRIES_PER_CHUNK):
                data = fetch_chunk(index)
                if hashlib.sha256(data).hexdigest() == offer.chunk_sha256[index]:
                    break
                log.warning(
                    "bundle %s chunk %d: sha256 mismatch (try %d)", offer.bundle_id[:8], index, attempt + 1
                )
            else:
                raise DownloadError(f"chunk {index} of {offer.bundle_id} does not match its sha256")
            sink.write(data)
            sink.flush()
            if on_chunk is not None:
                on_chunk(index, _n_chunks(offer))
        os.fsync(sink.fileno())
    if part.stat().st_size != offer.size_bytes:
        raise DownloadError(f"{part}: {part.stat().st_size} bytes, offer says {offer.size_bytes}")
    digest = _file_sha256(part)
    if digest != offer.sha256:
        part.unlink()
        raise DownloadError(
            f"{offer.bundle_id}: file sha256 {digest[:16]}... != offer {offer.sha256[:16]}..."
        )
    os.replace(part, final)
    return final, resumed
