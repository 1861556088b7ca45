"""The registry's tables (SQLAlchemy Core), in the collector's database: every name starts with `deploy_`.

Schema changes go through Alembic (`deploy/migrations/versions/`); this module mirrors the head revision.
JSON-shaped columns are TEXT holding JSON, which SQLite and PostgreSQL both store without extensions.
Times are Unix seconds (float).
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

bundles = sa.Table(
    "deploy_bundles",
    metadata,
    sa.Column("bundle_id", sa.String(32), primary_key=True),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("class_name", sa.String(128), nullable=False),
    sa.Column("anti_rollback_counter", sa.Integer, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("chunk_bytes", sa.Integer, nullable=False),
    sa.Column("chunk_sha256", sa.Text, nullable=False),  # JSON list
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("published_ts", sa.Float, nullable=False),
    sa.Column("published_by", sa.String(128), nullable=False),
)

stations = sa.Table(
    "deploy_stations",
    metadata,
    sa.Column("station_id", sa.String(128), primary_key=True),
    sa.Column("key_fingerprint", sa.String(32), nullable=False, server_default=""),
    sa.Column("tags", sa.Text, nullable=False, server_default="[]"),  # JSON list of "key=value" / "name"
    sa.Column("epoch", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("active_bundle_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("active_version", sa.String(64), nullable=False, server_default=""),
    sa.Column("previous_bundle_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("previous_version", sa.String(64), nullable=False, server_default=""),
    sa.Column("policy_version", sa.Integer, nullable=False, server_default="0"),
    sa.Column("shadow_bundle_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("locked", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("health", sa.Text, nullable=False, server_default="{}"),  # JSON
    sa.Column("last_checkin_ts", sa.Float, nullable=False, server_default="0"),
    # desired state, set by rollouts and operators; a station converges on it at its next check-in
    sa.Column("desired_bundle_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("desired_rollout_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("desired_policy_version", sa.Integer, nullable=False, server_default="0"),
    sa.Column("desired_shadow_bundle_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("shadow_every_n", sa.Integer, nullable=False, server_default="1"),
    sa.Column("last_report", sa.Text, nullable=False, server_default="{}"),  # JSON of the last UpdateReport
)

policies = sa.Table(
    "deploy_policies",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("selector", sa.Text, nullable=False),
    sa.Column("variant", sa.String(64), nullable=True),
    sa.Column("threshold", sa.Float, nullable=True),
    sa.Column("map_every_n_ok", sa.Integer, nullable=True),
    sa.Column("created_ts", sa.Float, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
)

rollouts = sa.Table(
    "deploy_rollouts",
    metadata,
    sa.Column("rollout_id", sa.String(32), primary_key=True),
    sa.Column("bundle_id", sa.String(32), nullable=False),
    sa.Column("selector", sa.Text, nullable=False),
    sa.Column("canary", sa.Integer, nullable=False),
    sa.Column("wave_size", sa.Integer, nullable=False),
    sa.Column("soak_s", sa.Float, nullable=False),
    sa.Column("max_nok_rate_delta", sa.Float, nullable=False),
    sa.Column("max_score_shift", sa.Float, nullable=False),
    sa.Column("min_results", sa.Integer, nullable=False),
    sa.Column("install_timeout_s", sa.Float, nullable=False),
    sa.Column("require_shadow", sa.Boolean, nullable=False),
    sa.Column("shadow_s", sa.Float, nullable=False),
    sa.Column("shadow_every_n", sa.Integer, nullable=False),
    sa.Column("max_flip_rate", sa.Float, nullable=False),
    # state: shadow | wave | soak | done | rolling_back | aborted
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("wave", sa.Integer, nullable=False),
    sa.Column("phase_ts", sa.Float, nullable=False),  # when the current state began
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("created_ts", sa.Float, nullable=False),
    sa.Column("updated_ts", sa.Float, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
)

rollout_stations = sa.Table(
    "deploy_rollout_stations",
    metadata,
    sa.Column("rollout_id", sa.String(32), primary_key=True),
    sa.Column("station_id", sa.String(128), primary_key=True),
    sa.Column("wave", sa.Integer, nullable=False),
    # state: pending | assigned | installed | healthy | failed | rolling_back | rolled_back
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("previous_bundle_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("assigned_ts", sa.Float, nullable=False, server_default="0"),
    sa.Column("installed_ts", sa.Float, nullable=False, server_default="0"),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("timings", sa.Text, nullable=False, server_default="{}"),  # JSON: the station's timings_ms
)

audit = sa.Table(
    "deploy_audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("detail", sa.Text, nullable=False, server_default="{}"),  # JSON
)
