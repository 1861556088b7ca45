"""The collector's tables (SQLAlchemy Core). Alembic migrations create them; a test checks both agree.

Times are Unix seconds (double precision): `decision_ts`/`capture_ts` from the station's clock,
`received_ts` from the collector's. JSON columns hold small dicts (bank scores, latencies, labels, health).
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = [
    "blobs",
    "drift_reference",
    "drift_state",
    "events",
    "inspections",
    "metadata",
    "station_epochs",
    "stations",
]

metadata = sa.MetaData()

stations = sa.Table(
    "stations",
    metadata,
    sa.Column("station_id", sa.String(128), primary_key=True),
    sa.Column("key_fingerprint", sa.String(64), nullable=False, server_default=""),
    sa.Column("first_seen", sa.Double, nullable=False),
    sa.Column("last_seen", sa.Double, nullable=False),
    sa.Column("epoch", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("bundle_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("bundle_version", sa.String(64), nullable=False, server_default=""),
    sa.Column("fps", sa.Double, nullable=False, server_default="0"),
    sa.Column("outbox_depth", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("dropped", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("health", sa.JSON, nullable=False),
)

inspections = sa.Table(
    "inspections",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("station_id", sa.String(128), nullable=False),
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("frame_id", sa.String(256), nullable=False),
    sa.Column("capture_ts", sa.Double, nullable=False),
    sa.Column("decision_ts", sa.Double, nullable=False),
    sa.Column("received_ts", sa.Double, nullable=False),
    sa.Column("bundle_id", sa.String(64), nullable=False),
    sa.Column("bundle_version", sa.String(64), nullable=False),
    sa.Column("variant", sa.String(64), nullable=False),
    sa.Column("decision", sa.String(8), nullable=False),
    sa.Column("image_score", sa.Double, nullable=True),
    sa.Column("bank_scores", sa.JSON, nullable=False),
    sa.Column("threshold", sa.Double, nullable=True),
    sa.Column("threshold_version", sa.Integer, nullable=False),
    sa.Column("latency_ms", sa.JSON, nullable=False),
    # latency_ms["total"] copied out so percentiles need no JSON parsing
    sa.Column("latency_total_ms", sa.Double, nullable=True),
    sa.Column("error_reason", sa.Text, nullable=True),
    sa.Column("error_file", sa.Text, nullable=True),
    sa.Column("shadow", sa.Boolean, nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    # anomaly map: PNG of the uint8-quantised map in `blobs`; value = map_offset + pixel * map_scale
    sa.Column("map_key", sa.String(200), nullable=True),
    sa.Column("map_height", sa.Integer, nullable=True),
    sa.Column("map_width", sa.Integer, nullable=True),
    sa.Column("map_offset", sa.Double, nullable=True),
    sa.Column("map_scale", sa.Double, nullable=True),
    sa.Column("thumb_key", sa.String(200), nullable=True),
    sa.UniqueConstraint("station_id", "epoch", "seq", name="uq_inspections_identity"),
    sa.Index("ix_inspections_station_ts", "station_id", "decision_ts"),
    sa.Index("ix_inspections_decision_ts", "decision", "decision_ts"),
    sa.Index("ix_inspections_bundle_ts", "bundle_version", "decision_ts"),
    sa.Index("ix_inspections_ts", "decision_ts"),
)

blobs = sa.Table(
    "blobs",
    metadata,
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("media_type", sa.String(32), nullable=False),  # image/png | image/jpeg
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("created_ts", sa.Double, nullable=False),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("station_id", sa.String(128), nullable=False),
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Column("ts", sa.Double, nullable=False),
    sa.Column("received_ts", sa.Double, nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("bundle_id", sa.String(64), nullable=False),
    sa.Column("bundle_version", sa.String(64), nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
    sa.UniqueConstraint("event_id", name="uq_events_event_id"),
    sa.Index("ix_events_station_ts", "station_id", "ts"),
)

# Highest contiguous stored seq per (station, epoch): what a cumulative Ack may promise. Kept in the
# database (only ever raised) so a restarted collector, or a second one on the same database, starts right.
station_epochs = sa.Table(
    "station_epochs",
    metadata,
    sa.Column("station_id", sa.String(128), primary_key=True),
    sa.Column("epoch", sa.BigInteger, primary_key=True),
    sa.Column("upto_seq", sa.BigInteger, nullable=False),
)

# Validation-normal image-score quantiles of a bundle's variant (from its manifest): the drift reference.
drift_reference = sa.Table(
    "drift_reference",
    metadata,
    sa.Column("bundle_id", sa.String(64), primary_key=True),
    sa.Column("variant", sa.String(64), primary_key=True),
    sa.Column("quantiles", sa.JSON, nullable=False),
    sa.Column("threshold", sa.Double, nullable=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("updated_ts", sa.Double, nullable=False),
)

drift_state = sa.Table(
    "drift_state",
    metadata,
    sa.Column("station_id", sa.String(128), primary_key=True),
    sa.Column("bundle_id", sa.String(64), primary_key=True),
    sa.Column("variant", sa.String(64), primary_key=True),
    sa.Column("bundle_version", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # ok | alarm | unknown
    sa.Column("psi", sa.Double, nullable=True),
    sa.Column("ks", sa.Double, nullable=True),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("since_ts", sa.Double, nullable=False),  # when `state` was entered
    sa.Column("updated_ts", sa.Double, nullable=False),
)
