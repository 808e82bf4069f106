"""The database tables (SQLAlchemy 2.0 typed declarative).

The schema itself is created by alembic (alembic/versions/); the migrations spell these tables
out and never import this module. tests/test_migrations.py checks the two agree on SQLite and
PostgreSQL (an autogenerate comparison must find no difference).

Conventions:
- Every timestamp is a timezone-aware UTC ``datetime`` in Python, on both backends
  (``UTCDateTime``); all of them are computed in Python (see service/queue.py).
- JSON columns are plain JSON (not JSONB) so a spec or report comes back with the key order
  it was stored with. NaN/Inf inside them are stored as null (service.db.json_dumps).
- Float statistics that were NaN/Inf are stored as NULL with their bit set in ``nonfinite_mask``
  (service/epoch_store.py), so "missing" and "non-finite" stay distinguishable.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

JOB_SOURCES = ("spec", "external")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATUSES = ("succeeded", "failed", "cancelled")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python on every backend.

    PostgreSQL stores ``timestamp with time zone``; SQLite has no time zones, so the value is
    stored as naive UTC text and made aware again when read. Naive datetimes are refused (they
    are nearly always a ``datetime.utcnow()``/local-time bug).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: gradwatch stores timezone-aware UTC times")
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


# Python 'float' statistics are stored as double precision on both backends.
Float64 = Double


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(256))
    source: Mapped[str] = mapped_column(String(16), default="spec")
    status: Mapped[str] = mapped_column(String(16), default="queued")
    spec: Mapped[Any | None] = mapped_column(JSON, nullable=True)
    declared_layers: Mapped[Any | None] = mapped_column(JSON, nullable=True)
    epochs_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    epochs_done: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    verdict: Mapped[str | None] = mapped_column(String(16), nullable=True)
    report: Mapped[Any | None] = mapped_column(JSON, nullable=True)
    report_final: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    parent_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True
    )
    remedy_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    callback_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    lost_leases: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    worker_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    time_to_verdict_s: Mapped[float | None] = mapped_column(Float64, nullable=True)

    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key"),
        CheckConstraint("source IN ('spec', 'external')", name="source"),
        CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name="status"
        ),
        # claim: WHERE status='queued' ORDER BY priority, created_at, id
        Index("ix_jobs_claim", "status", "priority", "created_at", "id"),
        # GET /v1/jobs: WHERE tenant=? ORDER BY created_at DESC, id DESC (keyset cursor)
        Index("ix_jobs_tenant_created", "tenant", "created_at", "id"),
        # reclaim_expired: WHERE status='running' AND lease_expires_at < now
        Index("ix_jobs_lease", "status", "lease_expires_at"),
        Index("ix_jobs_parent_id", "parent_id"),
    )

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.source} {self.status} tenant={self.tenant!r}>"


class Epoch(Base):
    """One epoch record of a job (its per-layer part is in ``layer_stats``)."""

    __tablename__ = "epochs"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    loss: Mapped[float | None] = mapped_column(Float64, nullable=True)
    nonfinite: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    metrics: Mapped[Any | None] = mapped_column(JSON, nullable=True)
    temporal: Mapped[Any | None] = mapped_column(JSON, nullable=True)
    extra: Mapped[Any | None] = mapped_column(JSON, nullable=True)
    nonfinite_mask: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "epoch"),)


class LayerStat(Base):
    """One layer's statistics in one epoch record."""

    __tablename__ = "layer_stats"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(512))
    type: Mapped[str] = mapped_column(String(64))
    grad_norm_mean: Mapped[float | None] = mapped_column(Float64, nullable=True)
    grad_norm_min: Mapped[float | None] = mapped_column(Float64, nullable=True)
    grad_norm_max: Mapped[float | None] = mapped_column(Float64, nullable=True)
    grad_norm_last: Mapped[float | None] = mapped_column(Float64, nullable=True)
    grad_norm_first: Mapped[float | None] = mapped_column(Float64, nullable=True)
    grad_norm_median: Mapped[float | None] = mapped_column(Float64, nullable=True)
    grad_max_abs: Mapped[float | None] = mapped_column(Float64, nullable=True)
    weight_norm: Mapped[float | None] = mapped_column(Float64, nullable=True)
    update_ratio: Mapped[float | None] = mapped_column(Float64, nullable=True)
    nonfinite_grads: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    has_activation: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    act_mean: Mapped[float | None] = mapped_column(Float64, nullable=True)
    act_std: Mapped[float | None] = mapped_column(Float64, nullable=True)
    act_saturated_frac: Mapped[float | None] = mapped_column(Float64, nullable=True)
    act_dead_frac: Mapped[float | None] = mapped_column(Float64, nullable=True)
    act_module: Mapped[str | None] = mapped_column(String(512), nullable=True)
    nonfinite_mask: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))

    __table_args__ = (
        UniqueConstraint("job_id", "epoch", "position"),
        # one layer across epochs (gradient-flow plots, per-layer findings)
        Index("ix_layer_stats_job_name_epoch", "job_id", "name", "epoch"),
    )


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the key
    prefix: Mapped[str] = mapped_column(String(16))  # first 8 characters, for display
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Worker(Base):
    """A live (or recently live) worker process, for /metrics and operators."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    current_job_id: Mapped[str | None] = mapped_column(String(36), nullable=True)


WEBHOOK_STATES = ("pending", "sending", "delivered", "failed")


class WebhookSecret(Base):
    """A tenant's webhook signing secret (kept in clear: it must sign; show it only to its tenant).
    After a rotation the previous secret keeps signing until ``previous_expires_at``."""

    __tablename__ = "webhook_secrets"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    secret: Mapped[str] = mapped_column(String(128))
    previous_secret: Mapped[str | None] = mapped_column(String(128), nullable=True)
    previous_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class WebhookDelivery(Base):
    """One delivery attempt of a job's webhook (service/webhooks.py).

    A row is an attempt: ``pending`` until due (``next_attempt_at``), ``sending`` while a
    dispatcher holds it (claimed like a job, with a lease), then ``delivered`` or ``failed``; a
    failed attempt with attempts left inserts the next one. ``event_id`` is the same for every
    attempt of one event (receivers dedupe on it)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    event_id: Mapped[str] = mapped_column(String(36))
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant: Mapped[str] = mapped_column(String(128))
    event: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    duration_ms: Mapped[float | None] = mapped_column(Float64, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    delivered: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    claimed_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        UniqueConstraint("event_id", "attempt"),
        CheckConstraint("state IN ('pending', 'sending', 'delivered', 'failed')", name="state"),
        # claim: WHERE state='pending' AND next_attempt_at <= now (or 'sending' with an expired lease)
        Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
        # GET /v1/jobs/{id}/deliveries and the job's webhook summary
        Index("ix_webhook_deliveries_job", "job_id", "attempt"),
    )
