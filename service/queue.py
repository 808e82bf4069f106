"""The job queue: jobs are rows of ``jobs``, claimed with leases and fenced.

Every function takes a Session and issues a few short statements; wrap each call in its own
``db.session()`` so it is one short transaction:

    with db.session() as s:
        lease = queue.claim(s, worker_id, settings.lease_seconds)
    with db.session() as s:
        ok = queue.begin_attempt(s, lease)
    ...
    with db.session() as s:
        if not queue.write_epoch(s, lease, record):   # False: the job is no longer ours
            stop()

Claim (one statement, the procrastinate/que pattern):

    UPDATE jobs SET status='running', worker_id=:w, attempt=attempt+1, lease_expires_at=:t, ...
    WHERE id = (SELECT id FROM jobs WHERE status='queued' AND source='spec'
                ORDER BY priority, created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
      AND status='queued'
    RETURNING id, attempt

``FOR UPDATE SKIP LOCKED`` is emitted on PostgreSQL only: concurrent claimers skip each other's
row instead of waiting, and a row another claimer already took fails the re-check of
``status='queued'``, so no job is claimed twice. On SQLite the single UPDATE is itself the write
transaction (one writer at a time; others wait on the busy timeout).

Fencing: every later write by a worker carries the ``Lease`` and is conditional on
``id=:job AND worker_id=:w AND attempt=:a AND status='running'``. Zero rows means the job is no
longer this worker's (its lease expired and the job was requeued or failed, it was cancelled
...): the function returns False having written nothing, and the worker must stop at once.
Because ``attempt`` is in the fence, a worker whose lease expired cannot write even if it later
re-claims the same job (the new claim has a new attempt).

Time: every timestamp is computed in Python (UTC) and passed in, never ``now()`` in SQL. One
clock per statement means lease arithmetic and comparisons agree with each other on SQLite and
PostgreSQL alike, and the times a job shows are the ones its code computed. Workers on several
machines compare their clocks through the leases they write: run NTP, and keep the lease
(GRADWATCH_LEASE_SECONDS, default 30 s) much longer than any clock skew.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, delete, func, insert, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service import epoch_store, webhooks
from service.tables import (
    FINAL_STATUSES,
    JOB_SOURCES,
    Epoch,
    Job,
    LayerStat,
    Worker,
    new_id,
    utcnow,
)

__all__ = [
    "HeartbeatResult",
    "Lease",
    "begin_attempt",
    "claim",
    "enqueue",
    "find_idempotent",
    "finish",
    "heartbeat",
    "reclaim_expired",
    "register_worker",
    "release",
    "request_cancel",
    "unregister_worker",
    "worker_heartbeat",
    "write_epoch",
]

# Updates here are bulk (SQL) updates; objects already in the caller's session are not touched.
_NO_SYNC = {"synchronize_session": False}


@dataclass(frozen=True)
class Lease:
    """Proof that a worker holds a job: the fence of all its later writes."""

    job_id: str
    worker_id: str
    attempt: int


@dataclass(frozen=True)
class HeartbeatResult:
    alive: bool
    """False: the lease is gone (expired and taken over, cancelled, finished): stop now."""
    cancel_requested: bool
    """True: a user asked to cancel; stop training and finish the job as cancelled."""


def _fence(lease: Lease) -> tuple[Any, ...]:
    return (
        Job.id == lease.job_id,
        Job.worker_id == lease.worker_id,
        Job.attempt == lease.attempt,
        Job.status == "running",
    )


def _dialect_insert(session: Session) -> Any:
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert
    if name == "sqlite":
        return sqlite.insert
    raise NotImplementedError(f"gradwatch supports SQLite and PostgreSQL, not {name}")


def enqueue(
    session: Session,
    *,
    tenant: str,
    name: str,
    spec: Mapping[str, Any] | None,
    epochs_total: int | None,
    parent_id: str | None = None,
    remedy_id: str | None = None,
    priority: int = 0,
    idempotency_key: str | None = None,
    callback_url: str | None = None,
    source: str = "spec",
    declared_layers: list[Mapping[str, Any]] | None = None,
    status: str = "queued",
) -> Job:
    """Add a job (``status`` "queued" for spec jobs; external jobs are created "running").

    With an ``idempotency_key`` that this tenant used before, nothing is added and the original
    job is returned (two concurrent submissions with one key also yield one job: the insert is
    ``ON CONFLICT DO NOTHING`` on UNIQUE(tenant, idempotency_key)). Compare the returned job's
    ``created_at`` with the call's time, or check beforehand, to tell a replay from a new job.
    Raises ValueError for an unknown source/status or a string longer than its column.
    """
    if source not in JOB_SOURCES:
        raise ValueError(f"source must be one of {JOB_SOURCES}, not {source!r}")
    if status not in ("queued", "running"):
        raise ValueError(f"a new job is 'queued' or 'running', not {status!r}")
    for field, value in (
        ("tenant", tenant),
        ("name", name),
        ("remedy_id", remedy_id),
        ("idempotency_key", idempotency_key),
    ):
        limit = Job.__table__.c[field].type.length
        if value is not None and len(value) > limit:
            # PostgreSQL would refuse it with a DataError, SQLite would store it: refuse on both
            raise ValueError(f"{field} is longer than {limit} characters")
    now = utcnow()
    values: dict[str, Any] = {
        "id": new_id(),
        "tenant": tenant,
        "name": name,
        "source": source,
        "status": status,
        "spec": dict(spec) if spec is not None else None,
        "declared_layers": [dict(layer) for layer in declared_layers]
        if declared_layers is not None
        else None,
        "epochs_total": epochs_total,
        "epochs_done": 0,
        "report_final": False,
        "parent_id": parent_id,
        "remedy_id": remedy_id,
        "priority": priority,
        "idempotency_key": idempotency_key,
        "callback_url": callback_url,
        "created_at": now,
        "updated_at": now,
        "started_at": now if status == "running" else None,
        "attempt": 0,
        "lost_leases": 0,
        "cancel_requested": False,
    }
    table = Job.__table__
    if idempotency_key is None:
        session.execute(insert(table).values(values))
        return _get(session, values["id"])
    statement = (
        _dialect_insert(session)(table)
        .values(values)
        .on_conflict_do_nothing(index_elements=["tenant", "idempotency_key"])
        .returning(table.c.id)
    )
    inserted = session.execute(statement).scalar()
    if inserted is not None:
        return _get(session, inserted)
    existing = find_idempotent(session, tenant, idempotency_key)
    if existing is None:  # the conflicting job vanished in between: jobs are never deleted
        raise RuntimeError(f"idempotency key {idempotency_key!r} conflicted with no visible job")
    return existing


def find_idempotent(session: Session, tenant: str, idempotency_key: str | None) -> Job | None:
    """The job ``tenant`` submitted with ``idempotency_key`` (None without a key or a match)."""
    if idempotency_key is None:
        return None
    return session.execute(
        select(Job).where(Job.tenant == tenant, Job.idempotency_key == idempotency_key)
    ).scalar_one_or_none()


def _get(session: Session, job_id: str) -> Job:
    return session.execute(
        select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    ).scalar_one()


def claim(session: Session, worker_id: str, lease_seconds: float) -> Lease | None:
    """Take the next queued spec job (lowest ``priority``, then oldest), or None if there is none."""
    now = utcnow()
    next_job = (
        select(Job.id)
        .where(Job.status == "queued", Job.source == "spec")
        .order_by(Job.priority, Job.created_at, Job.id)
        .limit(1)
    )
    if session.get_bind().dialect.name == "postgresql":
        next_job = next_job.with_for_update(skip_locked=True)
    row = session.execute(
        update(Job)
        # status re-checked outside too: belt and braces should the subquery ever run unlocked
        .where(Job.id == next_job.scalar_subquery(), Job.status == "queued")
        .values(
            status="running",
            worker_id=worker_id,
            attempt=Job.attempt + 1,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            heartbeat_at=now,
            started_at=_coalesce(Job.started_at, now),
            updated_at=now,
        )
        .returning(Job.id, Job.attempt)
        .execution_options(**_NO_SYNC)
    ).first()
    if row is None:
        return None
    return Lease(job_id=row.id, worker_id=worker_id, attempt=row.attempt)


def _typed_now(value: datetime) -> Any:
    return literal(value, type_=Job.__table__.c.started_at.type)


def _coalesce(column: Any, value: datetime) -> Any:
    return func.coalesce(column, _typed_now(value))


def heartbeat(session: Session, lease: Lease, lease_seconds: float) -> HeartbeatResult:
    """Renew the lease for ``lease_seconds`` from now; tells whether a cancel was requested.

    A lease that expired but was not reclaimed yet is renewed: nobody else has the job."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(*_fence(lease))
        .values(
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            heartbeat_at=now,
            updated_at=now,
        )
        .returning(Job.cancel_requested)
        .execution_options(**_NO_SYNC)
    ).first()
    if row is None:
        return HeartbeatResult(alive=False, cancel_requested=False)
    return HeartbeatResult(alive=True, cancel_requested=bool(row.cancel_requested))


def begin_attempt(session: Session, lease: Lease) -> bool:
    """Start (re)running the leased job from scratch: forget what earlier attempts wrote
    (their epoch records, layer statistics, progress and partial report)."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(*_fence(lease))
        .values(
            epochs_done=0,
            verdict=None,
            report=None,
            report_final=False,
            time_to_verdict_s=None,
            heartbeat_at=now,
            updated_at=now,
        )
        .returning(Job.id)
        .execution_options(**_NO_SYNC)
    ).first()
    if row is None:
        return False
    earlier = select(Epoch.epoch).where(Epoch.job_id == lease.job_id, Epoch.attempt != lease.attempt)
    session.execute(
        delete(LayerStat.__table__).where(
            LayerStat.job_id == lease.job_id, LayerStat.epoch.in_(earlier.scalar_subquery())
        )
    )
    session.execute(
        delete(Epoch.__table__).where(Epoch.job_id == lease.job_id, Epoch.attempt != lease.attempt)
    )
    return True


def write_epoch(session: Session, lease: Lease, record: Mapping[str, Any]) -> bool:
    """Store one epoch record of the leased job (replacing a stored record of that epoch).

    The fenced update of the job comes first (it locks the row on PostgreSQL and takes the write
    lock on SQLite); when it matches nothing, nothing is written and False is returned.
    Raises ValueError for a malformed record (nothing written).
    """
    epoch_row, layer_rows = epoch_store.record_to_rows(lease.job_id, lease.attempt, record)
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(*_fence(lease))
        .values(epochs_done=epoch_row["epoch"], heartbeat_at=now, updated_at=now)
        .returning(Job.id)
        .execution_options(**_NO_SYNC)
    ).first()
    if row is None:
        return False
    epoch_store.replace_rows(session, lease.job_id, [(epoch_row, layer_rows)])
    return True


def finish(
    session: Session,
    lease: Lease,
    *,
    status: str,
    verdict: str | None = None,
    report: Mapping[str, Any] | None = None,
    report_final: bool = True,
    error: Mapping[str, str] | None = None,
    time_to_verdict_s: float | None = None,
) -> bool:
    """End the leased job: ``status`` is "succeeded", "failed" or "cancelled"; ``error`` is
    ``{"code": ..., "message": ...}`` (for "failed"). Clears the lease. False: not ours any more."""
    if status not in FINAL_STATUSES:
        raise ValueError(f"finish status must be one of {FINAL_STATUSES}, not {status!r}")
    now = utcnow()
    values: dict[str, Any] = {
        "status": status,
        "finished_at": now,
        "updated_at": now,
        "lease_expires_at": None,
        "verdict": verdict,
        "report": dict(report) if report is not None else None,
        "report_final": report_final,
        "time_to_verdict_s": time_to_verdict_s,
    }
    if error is not None:
        values["error_code"] = error.get("code")
        values["error_message"] = error.get("message")
    row = session.execute(
        update(Job)
        .where(*_fence(lease))
        .values(**values)
        .returning(Job.id)
        .execution_options(**_NO_SYNC)
    ).first()
    if row is not None:
        webhooks.job_ended(session, lease.job_id)  # in this transaction: the webhook is owed atomically
    return row is not None


def release(session: Session, lease: Lease) -> bool:
    """Give the leased job back to the queue now (graceful shutdown), so another worker takes it
    at once instead of after the lease expires. Not counted as a lost lease. A job whose cancel
    was requested is cancelled instead of requeued."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(*_fence(lease))
        .values(
            status=case((Job.cancel_requested, "cancelled"), else_="queued"),
            finished_at=case((Job.cancel_requested, _typed_now(now)), else_=Job.finished_at),
            worker_id=None,
            lease_expires_at=None,
            updated_at=now,
        )
        .returning(Job.id, Job.status)
        .execution_options(**_NO_SYNC)
    ).first()
    if row is not None and row.status == "cancelled":
        webhooks.job_ended(session, lease.job_id)
    return row is not None


def reclaim_expired(
    session: Session, max_attempts: int, *, now: datetime | None = None
) -> tuple[list[str], list[str]]:
    """Take running jobs whose lease expired away from their silent workers.

    Each goes back to the queue with ``lost_leases + 1``, or, once ``lost_leases`` reaches
    ``max_attempts``, fails with error code ``max_attempts``. Returns (requeued ids, failed ids).
    A job whose cancel was requested is cancelled instead (and is in neither list).
    Safe to run from every worker at once: each change is conditional on the job still being
    in the state that was read, so exactly one reclaimer acts on a job.
    """
    now = now or utcnow()
    expired = session.execute(
        select(
            Job.id,
            Job.worker_id,
            Job.attempt,
            Job.lost_leases,
            Job.lease_expires_at,
            Job.cancel_requested,
        )
        .where(Job.status == "running", Job.lease_expires_at < now)
        .order_by(Job.lease_expires_at)
    ).all()
    requeued: list[str] = []
    failed: list[str] = []
    for job in expired:
        lost = job.lost_leases + 1
        conditions = (
            Job.id == job.id,
            Job.status == "running",
            Job.attempt == job.attempt,
            Job.lease_expires_at < now,
        )
        target: list[str] | None
        if job.cancel_requested:
            values: dict[str, Any] = {
                "status": "cancelled",
                "lost_leases": lost,
                "lease_expires_at": None,
                "finished_at": now,
                "updated_at": now,
            }
            target = None
        elif lost >= max_attempts:
            times = "once" if lost == 1 else f"{lost} times"
            expired_at = job.lease_expires_at.isoformat() if job.lease_expires_at else "?"
            values = {
                "status": "failed",
                "lost_leases": lost,
                "lease_expires_at": None,
                "finished_at": now,
                "updated_at": now,
                "error_code": "max_attempts",
                "error_message": (
                    f"the job's worker stopped responding {times} (each time its lease expired "
                    f"before it finished); last worker {job.worker_id!r}, whose lease expired "
                    f"at {expired_at}. The job may crash or exhaust the memory of the worker "
                    "that runs it."
                ),
            }
            target = failed
        else:
            values = {
                "status": "queued",
                "lost_leases": lost,
                "worker_id": None,
                "lease_expires_at": None,
                "updated_at": now,
            }
            target = requeued
        row = session.execute(
            update(Job)
            .where(*conditions)
            .values(**values)
            .returning(Job.id)
            .execution_options(**_NO_SYNC)
        ).first()
        if row is not None and target is not None:
            target.append(job.id)
        if row is not None and target is not requeued:
            webhooks.job_ended(session, job.id)  # failed (max_attempts) or cancelled
    return requeued, failed


def request_cancel(session: Session, job_id: str, tenant: str) -> Job | None:
    """Cancel a job of ``tenant`` (None: no such job for this tenant).

    queued -> cancelled at once; running spec job -> ``cancel_requested`` (its worker sees it at
    its next heartbeat, stops and finishes the job as cancelled); running external job ->
    cancelled at once (no worker holds it); a finished job is returned unchanged.
    """
    now = utcnow()
    mine = (Job.id == job_id, Job.tenant == tenant)
    ended = session.execute(
        update(Job)
        .where(
            *mine,
            (Job.status == "queued")
            | ((Job.status == "running") & (Job.source == "external")),
        )
        .values(
            status="cancelled",
            cancel_requested=True,
            finished_at=now,
            updated_at=now,
            worker_id=None,
            lease_expires_at=None,
        )
        .returning(Job.id)
        .execution_options(**_NO_SYNC)
    ).first()
    if ended is not None:
        webhooks.job_ended(session, job_id)
    session.execute(
        update(Job)
        .where(*mine, Job.status == "running", Job.source == "spec")
        .values(cancel_requested=True, updated_at=now)
        .execution_options(**_NO_SYNC)
    )
    return session.execute(
        select(Job).where(*mine).execution_options(populate_existing=True)
    ).scalar_one_or_none()


# --- worker registry (for /metrics and operators; the queue itself never needs it) ------------


def register_worker(session: Session, worker_id: str, hostname: str, pid: int) -> None:
    """Record a starting worker (a worker id seen before is restarted in place)."""
    now = utcnow()
    values = {
        "id": worker_id,
        "hostname": hostname,
        "pid": pid,
        "started_at": now,
        "heartbeat_at": now,
        "current_job_id": None,
    }
    statement = _dialect_insert(session)(Worker.__table__).values(values)
    statement = statement.on_conflict_do_update(
        index_elements=["id"],
        set_={k: statement.excluded[k] for k in ("hostname", "pid", "started_at", "heartbeat_at", "current_job_id")},
    )
    session.execute(statement)


def worker_heartbeat(session: Session, worker_id: str, current_job_id: str | None = None) -> bool:
    """The worker is alive (and busy with ``current_job_id``). False: it is not registered."""
    row = session.execute(
        update(Worker)
        .where(Worker.id == worker_id)
        .values(heartbeat_at=utcnow(), current_job_id=current_job_id)
        .returning(Worker.id)
        .execution_options(**_NO_SYNC)
    ).first()
    return row is not None


def unregister_worker(session: Session, worker_id: str) -> None:
    """Forget a worker that is stopping."""
    session.execute(delete(Worker.__table__).where(Worker.id == worker_id))

