"""Registry <-> station messages, on the same envelope as `protocol.messages` (frame 0 header, blobs after).

The registry holds the fleet's *desired* state; a station converges on it (reconciliation, not commands):
  station -> registry   CheckIn (what I run), ChunkRequest (give me part of a bundle), UpdateReport
  registry -> station   CheckInReply (what you should run: bundle offer, runtime policy, shadow candidate),
                        Chunk (one piece of a bundle tar, raw bytes in frame 1), DeployAck, ErrorReply
A missed reply costs nothing: the station asks again at its next check-in, so no message needs a resend queue.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from protocol.messages import Blob, ErrorReply, Message

__all__ = [
    "CHUNK_BYTES",
    "UPDATE_OUTCOMES",
    "BundleOffer",
    "CheckIn",
    "CheckInReply",
    "Chunk",
    "ChunkRequest",
    "DeployAck",
    "PolicySpec",
    "ShadowSpec",
    "UpdateReport",
    "registry_accepts",
    "station_accepts",
]

CHUNK_BYTES = 1024 * 1024  # one chunk per message, well under the envelope's 8 MiB blob limit

UpdateOutcome = Literal["installed", "failed", "deferred", "rolled_back", "shadow_loaded", "shadow_failed"]
UPDATE_OUTCOMES: tuple[str, ...] = (
    "installed",
    "failed",
    "deferred",
    "rolled_back",
    "shadow_loaded",
    "shadow_failed",
)


class BundleOffer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A bundle tar the station should hold: its size and sha256, and the sha256 of every chunk.

    Chunk i covers bytes [i * chunk_bytes, min((i + 1) * chunk_bytes, size_bytes)).
    `anti_rollback_counter` is informative only: the station reads the signed manifest, never this field.
    """

    bundle_id: str
    version: str
    size_bytes: int
    sha256: str
    chunk_bytes: int
    chunk_sha256: tuple[str, ...]
    anti_rollback_counter: int = 0


class PolicySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Runtime decision policy, versioned: a threshold per variant (None = the bundle's own) and map sampling.

    `version` is what every result scored under this policy carries as `threshold_version` (0 = bundle's own).
    `map_every_n_ok`: attach the anomaly map to 1 in n OK results (None = leave the station's setting).
    """

    version: int
    variant: str | None = None
    threshold: float | None = None
    map_every_n_ok: int | None = None


class ShadowSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A candidate bundle to score beside the active one, on every `sample_every_n`-th frame."""

    offer: BundleOffer
    sample_every_n: int = 1


class CheckIn(Message, frozen=True, tag="checkin"):
    """Periodic station status. `locked` = an operator deferred updates (production lot running)."""

    station_id: str
    epoch: int
    ts: float
    tags: tuple[str, ...] = ()
    active_bundle_id: str = ""
    active_version: str = ""
    previous_bundle_id: str = ""
    previous_version: str = ""
    policy_version: int = 0
    shadow_bundle_id: str = ""
    locked: bool = False
    health: dict[str, float] = {}


class CheckInReply(Message, frozen=True, tag="checkin_reply"):
    """What the station should converge on. None = keep what you have (no desired state recorded).

    `rollout_id` names the rollout that asked for `bundle` (echoed back in UpdateReport), "" for none.
    """

    bundle: BundleOffer | None = None
    policy: PolicySpec | None = None
    shadow: ShadowSpec | None = None
    clear_shadow: bool = False
    rollout_id: str = ""
    checkin_s: float = 0.0  # if > 0, the registry's wish for the station's next check-in interval


class ChunkRequest(Message, frozen=True, tag="chunk_request"):
    station_id: str
    bundle_id: str
    index: int


class Chunk(Message, frozen=True, tag="chunk"):
    """Bytes [offset, offset + data.size_bytes) of a bundle tar, in the blob frame `data`."""

    bundle_id: str
    index: int
    offset: int
    sha256: str
    data: Blob


class UpdateReport(Message, frozen=True, tag="update_report"):
    """What came of an offer: installed (swapped in), failed (`check` + `reason`), deferred (locked), ...

    `timings_ms`: download, verify, extract, load, golden, swap and total (offer seen -> active).
    """

    station_id: str
    epoch: int
    ts: float
    bundle_id: str
    outcome: UpdateOutcome
    version: str = ""
    check: str = ""
    reason: str = ""
    rollout_id: str = ""
    active_bundle_id: str = ""
    timings_ms: dict[str, float] = {}


class DeployAck(Message, frozen=True, tag="deploy_ack"):
    """The registry recorded an UpdateReport."""

    bundle_id: str
    outcome: str


# What each end decodes (`protocol.frames.decode(frames, accept=...)`).
registry_accepts = CheckIn | ChunkRequest | UpdateReport
station_accepts = CheckInReply | Chunk | DeployAck | ErrorReply
