"""initial schema: jobs, epochs, layer_stats, api_keys, workers

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00

Tables are spelled out here (never imported from service.tables).
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Aware UTC timestamps (timestamptz on PostgreSQL; naive UTC text on SQLite, made aware in Python).
Timestamp = sa.DateTime(timezone=True)
# Autoincrementing 64-bit ids (SQLite's rowid alias must be spelled INTEGER).
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=True),
        sa.Column("declared_layers", sa.JSON(), nullable=True),
        sa.Column("epochs_total", sa.Integer(), nullable=True),
        sa.Column("epochs_done", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=True),
        sa.Column("report", sa.JSON(), nullable=True),
        sa.Column("report_final", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("parent_id", sa.String(36), nullable=True),
        sa.Column("remedy_id", sa.String(128), nullable=True),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("callback_url", sa.Text(), nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("started_at", Timestamp, nullable=True),
        sa.Column("finished_at", Timestamp, nullable=True),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("lost_leases", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("worker_id", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", Timestamp, nullable=True),
        sa.Column("heartbeat_at", Timestamp, nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("time_to_verdict_s", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["jobs.id"], name="fk_jobs_parent_id_jobs", ondelete="SET NULL"
        ),
        sa.UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        sa.CheckConstraint("source IN ('spec', 'external')", name="ck_jobs_source"),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
            name="ck_jobs_status",
        ),
    )
    op.create_index("ix_jobs_claim", "jobs", ["status", "priority", "created_at", "id"])
    op.create_index("ix_jobs_tenant_created", "jobs", ["tenant", "created_at", "id"])
    op.create_index("ix_jobs_lease", "jobs", ["status", "lease_expires_at"])
    op.create_index("ix_jobs_parent_id", "jobs", ["parent_id"])

    op.create_table(
        "epochs",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("loss", sa.Double(), nullable=True),
        sa.Column("nonfinite", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("temporal", sa.JSON(), nullable=True),
        sa.Column("extra", sa.JSON(), nullable=True),
        sa.Column("nonfinite_mask", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_epochs"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_epochs_job_id_jobs", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("job_id", "epoch", name="uq_epochs_job_id_epoch"),
    )

    op.create_table(
        "layer_stats",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(512), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("grad_norm_mean", sa.Double(), nullable=True),
        sa.Column("grad_norm_min", sa.Double(), nullable=True),
        sa.Column("grad_norm_max", sa.Double(), nullable=True),
        sa.Column("grad_norm_last", sa.Double(), nullable=True),
        sa.Column("grad_norm_first", sa.Double(), nullable=True),
        sa.Column("grad_norm_median", sa.Double(), nullable=True),
        sa.Column("grad_max_abs", sa.Double(), nullable=True),
        sa.Column("weight_norm", sa.Double(), nullable=True),
        sa.Column("update_ratio", sa.Double(), nullable=True),
        sa.Column("nonfinite_grads", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("has_activation", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("act_mean", sa.Double(), nullable=True),
        sa.Column("act_std", sa.Double(), nullable=True),
        sa.Column("act_saturated_frac", sa.Double(), nullable=True),
        sa.Column("act_dead_frac", sa.Double(), nullable=True),
        sa.Column("act_module", sa.String(512), nullable=True),
        sa.Column("nonfinite_mask", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_layer_stats"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_layer_stats_job_id_jobs", ondelete="CASCADE"
        ),
        sa.UniqueConstraint(
            "job_id", "epoch", "position", name="uq_layer_stats_job_id_epoch_position"
        ),
    )
    op.create_index("ix_layer_stats_job_name_epoch", "layer_stats", ["job_id", "name", "epoch"])

    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"])

    op.create_table(
        "workers",
        sa.Column("id", sa.String(255), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", Timestamp, nullable=False),
        sa.Column("heartbeat_at", Timestamp, nullable=False),
        sa.Column("current_job_id", sa.String(36), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_workers"),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_index("ix_api_keys_tenant", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_index("ix_layer_stats_job_name_epoch", table_name="layer_stats")
    op.drop_table("layer_stats")
    op.drop_table("epochs")
    op.drop_index("ix_jobs_parent_id", table_name="jobs")
    op.drop_index("ix_jobs_lease", table_name="jobs")
    op.drop_index("ix_jobs_tenant_created", table_name="jobs")
    op.drop_index("ix_jobs_claim", table_name="jobs")
    op.drop_table("jobs")
