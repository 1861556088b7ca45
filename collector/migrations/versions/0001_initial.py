"""Initial collector schema: stations, inspections, blobs, events, ack state, drift.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stations",
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
    op.create_table(
        "inspections",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
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
    )
    op.create_table(
        "blobs",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("media_type", sa.String(32), nullable=False),  # image/png | image/jpeg
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("created_ts", sa.Double, nullable=False),
    )
    op.create_table(
        "events",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
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
    )
    op.create_table(
        "station_epochs",
        sa.Column("station_id", sa.String(128), primary_key=True),
        sa.Column("epoch", sa.BigInteger, primary_key=True),
        sa.Column("upto_seq", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "drift_reference",
        sa.Column("bundle_id", sa.String(64), primary_key=True),
        sa.Column("variant", sa.String(64), primary_key=True),
        sa.Column("quantiles", sa.JSON, nullable=False),
        sa.Column("threshold", sa.Double, nullable=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("updated_ts", sa.Double, nullable=False),
    )
    op.create_table(
        "drift_state",
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
    op.create_index("ix_inspections_station_ts", "inspections", ["station_id", "decision_ts"])
    op.create_index("ix_inspections_decision_ts", "inspections", ["decision", "decision_ts"])
    op.create_index("ix_inspections_bundle_ts", "inspections", ["bundle_version", "decision_ts"])
    op.create_index("ix_inspections_ts", "inspections", ["decision_ts"])
    op.create_index("ix_events_station_ts", "events", ["station_id", "ts"])


def downgrade() -> None:
    op.drop_table("drift_state")
    op.drop_table("drift_reference")
    op.drop_table("station_epochs")
    op.drop_table("events")
    op.drop_table("blobs")
    op.drop_table("inspections")
    op.drop_table("stations")
