"""Webhooks: when a job with a ``callback_url`` ends, POST its final report there, signed.

Outbox in the database (docs/webhooks.md):

- ``job_ended(session, job_id)`` is called in the very transaction that makes a job final
  (queue.finish/release/reclaim_expired/request_cancel, external complete/cancel/abandon,
  verification finalising a parent). It inserts attempt 1 of the job's ``job.finished`` event
  into ``webhook_deliveries`` with the payload frozen: the job becomes final and its webhook is
  owed atomically, so neither a crash nor a restart can lose it.
- A ``Dispatcher`` thread runs in ``gradwatch serve`` and in every ``gradwatch worker``. It claims
  a due attempt with one statement (``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED)
  RETURNING``, a lease in ``lease_expires_at``), sends it outside any transaction, then records
  the outcome fenced by (id, dispatcher, state='sending'); a failed attempt with attempts left
  inserts the next one, due after exponential backoff. Every attempt stays a row.
- Delivery is at least once: a dispatcher that dies mid-send leaves its lease to expire and
  another sends the same attempt again. Receivers dedupe on ``Gradwatch-Delivery``.

Signature (Stripe's scheme): ``Gradwatch-Signature: t=<unix>,v1=<hex>`` where
``hex = HMAC-SHA256(key=secret.encode(), msg=f"{t}.".encode() + body)``; after a rotation a
second ``v1=`` signed with the previous secret is added until it expires.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets as _secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import and_, event, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service import reports
from service.db import Database, json_dumps
from service.settings import Settings
from service.tables import FINAL_STATUSES, Job, WebhookDelivery, WebhookSecret, utcnow

log = logging.getLogger("gradwatch.webhooks")

EVENT_JOB_FINISHED = "job.finished"
SECRET_PREFIX = "whsec_"
USER_AGENT = "gradwatch-webhooks/1"
# Event ids are derived from (job, event): whoever enqueues the same event twice (two children of
# a verified job ending together) hits the UNIQUE(event_id, attempt) and adds nothing.
_EVENT_NAMESPACE = uuid.UUID("5b0c7a52-6a0e-4d8e-9a6c-6772616477a1")
_NO_SYNC = {"synchronize_session": False}
_D = WebhookDelivery

# Set after a transaction that enqueued a delivery commits: a dispatcher in this process sends it
# at once instead of at its next poll (dispatchers in other processes poll).
_WAKE = threading.Event()


def _dialect_insert(session: Session) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


# --- secrets ---------------------------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + _secrets.token_urlsafe(32)


def get_secret(session: Session, tenant: str) -> WebhookSecret:
    """The tenant's secret, created on first use (concurrent first uses agree on one)."""
    row = session.get(WebhookSecret, tenant, populate_existing=True)
    if row is not None:
        return row
    session.execute(
        _dialect_insert(session)(WebhookSecret.__table__)
        .values(tenant=tenant, secret=new_secret(), created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["tenant"])
    )
    row = session.get(WebhookSecret, tenant, populate_existing=True)
    assert row is not None
    return row


def rotate_secret(session: Session, tenant: str, grace_seconds: float) -> WebhookSecret:
    """A new secret; the previous one still signs (second ``v1=``) for ``grace_seconds``."""
    current = get_secret(session, tenant)
    now = utcnow()
    keep = grace_seconds > 0
    session.execute(
        update(WebhookSecret)
        .where(WebhookSecret.tenant == tenant)
        .values(
            secret=new_secret(),
            previous_secret=current.secret if keep else None,
            previous_expires_at=now + timedelta(seconds=grace_seconds) if keep else None,
            rotated_at=now,
        )
        .execution_options(**_NO_SYNC)
    )
    return get_secret(session, tenant)


def signing_secrets(row: WebhookSecret, now: datetime | None = None) -> list[str]:
    now = now or utcnow()
    keys = [row.secret]
    if row.previous_secret and row.previous_expires_at is not None and row.previous_expires_at > now:
        keys.append(row.previous_secret)
    return keys


def secret_json(row: WebhookSecret) -> dict[str, Any]:
    now = utcnow()
    previous = row.previous_expires_at if len(signing_secrets(row, now)) > 1 else None
    return {
        "secret": row.secret,
        "algorithm": "HMAC-SHA256",
        "signature_header": "Gradwatch-Signature",
        "signature_format": "t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f'{t}.{raw body}')>",
        "created_at": _iso(row.created_at),
        "rotated_at": _iso(row.rotated_at),
        "previous_secret_expires_at": _iso(previous),
    }


def signature(body: bytes, keys: Iterable[str], timestamp: int) -> str:
    """The ``Gradwatch-Signature`` header value: ``t=<timestamp>,v1=<hex>[,v1=<hex>]``."""
    signed = f"{timestamp}.".encode() + body
    parts = [f"t={timestamp}"]
    parts += [f"v1={hmac.new(key.encode(), signed, hashlib.sha256).hexdigest()}" for key in keys]
    return ",".join(parts)


def headers_for(delivery: "Claimed", keys: Iterable[str], timestamp: int) -> dict[str, str]:
    body = delivery.payload.encode()
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Gradwatch-Event": delivery.event,
        "Gradwatch-Delivery": delivery.event_id,
        "Gradwatch-Attempt": str(delivery.attempt),
        "Gradwatch-Timestamp": str(timestamp),
        "Gradwatch-Signature": signature(body, keys, timestamp),
    }


# --- enqueue (the outbox) --------------------------------------------------------------------


def event_id_for(job_id: str, event_name: str = EVENT_JOB_FINISHED) -> str:
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{job_id}/{event_name}"))


def payload_for(session: Session, job: Job) -> str:
    """``{"event", "job", "report"}`` as compact JSON: the job as GET /v1/jobs/{id} shows it and
    the report as GET /v1/jobs/{id}/report does (null when nothing was ever recorded)."""
    from service.views import job_json

    job_body = job_json(job, webhook=None)
    job_body.pop("webhook", None)
    report = reports.report_for(session, job) if job.report is not None or job.epochs_done else None
    return json_dumps({"event": EVENT_JOB_FINISHED, "job": job_body, "report": report})


def _wake_local(_session: Session) -> None:
    _WAKE.set()


def job_ended(session: Session, job_id: str) -> bool:
    """Owe the webhook of a job that just became final (no-op without a callback_url, or while a
    verified job's report still waits for its children). Call it in the transaction that ended
    the job. True when a delivery was enqueued by this call."""
    job = session.execute(
        select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if job is None or not job.callback_url or job.status not in FINAL_STATUSES:
        return False
    if job.status == "succeeded" and job.report is not None and not job.report_final:
        return False  # verification children still running: sent when the report turns final
    now = utcnow()
    row = session.execute(
        _dialect_insert(session)(WebhookDelivery.__table__)
        .values(
            event_id=event_id_for(job.id), job_id=job.id, tenant=job.tenant, event=EVENT_JOB_FINISHED,
            attempt=1, url=job.callback_url, payload=payload_for(session, job), state="pending",
            created_at=now, next_attempt_at=now, delivered=False,
        )
        .on_conflict_do_nothing(index_elements=["event_id", "attempt"])
        .returning(WebhookDelivery.__table__.c.id)
    ).first()
    if row is None:
        return False
    event.listen(session, "after_commit", _wake_local, once=True)
    return True


def jobs_ended(session: Session, job_ids: Iterable[str]) -> None:
    for job_id in job_ids:
        job_ended(session, job_id)


# --- reading ---------------------------------------------------------------------------------


def delivery_json(row: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": row.id,
        "delivery_id": row.event_id,
        "event": row.event,
        "attempt": row.attempt,
        "url": row.url,
        "state": row.state,
        "delivered": bool(row.delivered),
        "status_code": row.status_code,
        "error": row.error,
        "duration_ms": row.duration_ms,
        "created_at": _iso(row.created_at),
        "next_attempt_at": _iso(row.next_attempt_at),
        "sent_at": _iso(row.sent_at),
    }


def deliveries(session: Session, job_id: str) -> list[dict[str, Any]]:
    rows = session.scalars(select(_D).where(_D.job_id == job_id).order_by(_D.attempt, _D.id))
    return [delivery_json(r) for r in rows]


def summaries(session: Session, jobs: Iterable[Job]) -> dict[str, dict[str, Any] | None]:
    """The ``webhook`` field of each job's JSON (None for a job without a callback_url)."""
    jobs = list(jobs)
    wanted = [j.id for j in jobs if j.callback_url]
    rows: dict[str, list[Any]] = {}
    if wanted:
        for row in session.execute(
            select(_D.job_id, _D.attempt, _D.state, _D.status_code, _D.error, _D.sent_at, _D.next_attempt_at)
            .where(_D.job_id.in_(wanted))
            .order_by(_D.job_id, _D.attempt)
        ):
            rows.setdefault(row.job_id, []).append(row)
    return {j.id: (summary_of(j, rows.get(j.id, [])) if j.callback_url else None) for j in jobs}


def summary_of(job: Job, rows: list[Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "url": job.callback_url, "status": "waiting", "attempts": 0, "last_status_code": None,
        "last_error": None, "last_attempt_at": None, "next_attempt_at": None, "delivered_at": None,
    }
    if not rows:
        return summary  # the job has not ended yet (or its report waits for verification)
    sent = [r for r in rows if r.sent_at is not None]
    last = rows[-1]
    summary["attempts"] = len(sent)
    if sent:
        summary.update(last_status_code=sent[-1].status_code, last_error=sent[-1].error,
                       last_attempt_at=_iso(sent[-1].sent_at))
    if last.state == "delivered":
        summary.update(status="delivered", delivered_at=_iso(last.sent_at))
    elif last.state == "failed":
        summary["status"] = "failed"  # the last attempt failed and none is left
    else:
        summary.update(status="retrying" if sent else "pending", next_attempt_at=_iso(last.next_attempt_at))
        if last.state == "sending":
            summary["status"] = "sending"
    return summary


# --- dispatching -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    id: int
    event_id: str
    job_id: str
    tenant: str
    event: str
    attempt: int
    url: str
    payload: str
    dispatcher_id: str


def _due(now: datetime) -> Any:
    return or_(
        and_(_D.state == "pending", _D.next_attempt_at <= now),
        and_(_D.state == "sending", _D.lease_expires_at < now),  # its dispatcher died mid-send
    )


def claim(session: Session, dispatcher_id: str, lease_seconds: float, *, now: datetime | None = None) -> Claimed | None:
    """Take the next due attempt (oldest first) with a lease, in one statement; None if none is due."""
    now = now or utcnow()
    # A read first: on SQLite an UPDATE takes the write lock even when it matches nothing, and
    # idle dispatchers poll twice a second.
    if session.execute(select(_D.id).where(_due(now)).limit(1)).first() is None:
        return None
    next_one = select(_D.id).where(_due(now)).order_by(_D.next_attempt_at, _D.id).limit(1)
    if session.get_bind().dialect.name == "postgresql":
        next_one = next_one.with_for_update(skip_locked=True)
    row = session.execute(
        update(_D)
        .where(_D.id == next_one.scalar_subquery(), _due(now))
        .values(state="sending", claimed_by=dispatcher_id,
                lease_expires_at=now + timedelta(seconds=lease_seconds))
        .returning(_D.id, _D.event_id, _D.job_id, _D.tenant, _D.event, _D.attempt, _D.url, _D.payload)
        .execution_options(**_NO_SYNC)
    ).first()
    if row is None:
        return None
    return Claimed(row.id, row.event_id, row.job_id, row.tenant, row.event, row.attempt, row.url,
                   row.payload, dispatcher_id)


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Wait after failed attempt ``attempt`` (1-based): base, 2 base, 4 base, ... capped."""
    return min(cap, base * 2 ** (attempt - 1))


def record_result(
    session: Session, claimed: Claimed, *, status_code: int | None, error: str | None,
    duration_ms: float, sent_at: datetime, max_attempts: int, backoff_base: float, backoff_max: float,
) -> bool:
    """Store the outcome of a claimed attempt, and owe the next one if it failed and attempts
    remain. False: the attempt was not ours any more (lease expired, another sent it)."""
    ok = error is None and status_code is not None and 200 <= status_code < 300
    done = session.execute(
        update(_D)
        .where(_D.id == claimed.id, _D.claimed_by == claimed.dispatcher_id, _D.state == "sending")
        .values(state="delivered" if ok else "failed", delivered=ok, status_code=status_code, error=error,
                duration_ms=duration_ms, sent_at=sent_at, lease_expires_at=None)
        .returning(_D.id)
        .execution_options(**_NO_SYNC)
    ).first()
    if done is None:
        return False
    if not ok and claimed.attempt < max_attempts:
        due = sent_at + timedelta(seconds=backoff_seconds(claimed.attempt, backoff_base, backoff_max))
        session.execute(
            _dialect_insert(session)(WebhookDelivery.__table__)
            .values(event_id=claimed.event_id, job_id=claimed.job_id, tenant=claimed.tenant, event=claimed.event,
                    attempt=claimed.attempt + 1, url=claimed.url, payload=claimed.payload, state="pending",
                    created_at=sent_at, next_attempt_at=due, delivered=False)
            .on_conflict_do_nothing(index_elements=["event_id", "attempt"])
        )
    return True


class Dispatcher:
    """Sends due webhook attempts and reaps abandoned external jobs. One thread per process:
    ``Dispatcher(db, settings).start()``; ``stop()`` ends it after the current send."""

    def __init__(self, db: Database, settings: Settings, *, dispatcher_id: str | None = None,
                 transport: httpx.BaseTransport | None = None, reap: bool = True) -> None:
        self.db = db
        self.settings = settings
        self.id = dispatcher_id or f"dispatch-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.reap = reap
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_reap = 0.0
        self.http = httpx.Client(timeout=settings.webhook_timeout_seconds, transport=transport,
                                 follow_redirects=False, headers={"User-Agent": USER_AGENT})

    @property
    def reap_interval(self) -> float:
        return max(0.2, min(30.0, self.settings.external_abandon_seconds / 4))

    def start(self) -> "Dispatcher":
        self._thread = threading.Thread(target=self.run_forever, daemon=True, name="webhook-dispatcher")
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        _WAKE.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.http.close()

    def run_forever(self) -> None:
        log.info("webhook dispatcher %s started", self.id)
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # a database blip must not end the thread
                log.exception("webhook dispatcher %s: error", self.id)
                busy = False
            if not busy:
                _WAKE.wait(self.settings.webhook_poll_seconds)
                _WAKE.clear()

    def run_once(self) -> bool:
        """Reap abandoned external jobs (now and then), then send one due attempt. False: idle."""
        if self.reap and time.monotonic() >= self._next_reap:
            self._next_reap = time.monotonic() + self.reap_interval
            self.reap_abandoned()
        with self.db.session() as session:
            claimed = claim(session, self.id, self.settings.webhook_lease_seconds)
        if claimed is None:
            return False
        self.deliver(claimed)
        return True

    def reap_abandoned(self) -> list[str]:
        from service.external import reap_abandoned

        with self.db.session() as session:
            reaped = reap_abandoned(session, self.settings.external_abandon_seconds)
        if reaped:
            log.warning("external jobs abandoned (nothing sent for %s s): %s",
                        self.settings.external_abandon_seconds, reaped)
        return reaped

    def deliver(self, claimed: Claimed) -> bool:
        """Send one claimed attempt and store its outcome; True when the receiver took it (2xx)."""
        with self.db.session() as session:
            keys = signing_secrets(get_secret(session, claimed.tenant))
        timestamp = int(time.time())
        status_code: int | None = None
        error: str | None = None
        sent_at = utcnow()
        started = time.perf_counter()
        try:
            with self.http.stream("POST", claimed.url, content=claimed.payload.encode(),
                                  headers=headers_for(claimed, keys, timestamp)) as response:
                status_code = response.status_code
                if not 200 <= status_code < 300:
                    snippet = b""
                    for chunk in response.iter_bytes():
                        snippet += chunk
                        if len(snippet) >= 300:
                            break
                    text = snippet[:300].decode("utf-8", "replace").strip()
                    error = f"HTTP {status_code}" + (f": {text}" if text else "")
        except httpx.TimeoutException:
            error = f"timeout: no answer within {self.settings.webhook_timeout_seconds} s"
        except Exception as exc:  # refused, reset, bad URL...: a failed attempt, never a stuck row
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        duration_ms = (time.perf_counter() - started) * 1000.0
        s = self.settings
        with self.db.session() as session:
            record_result(session, claimed, status_code=status_code, error=error, duration_ms=duration_ms,
                          sent_at=sent_at, max_attempts=s.webhook_max_attempts,
                          backoff_base=s.webhook_backoff_base_seconds, backoff_max=s.webhook_backoff_max_seconds)
        if error is None:
            log.info("webhook %s attempt %s for job %s delivered to %s (%.0f ms)",
                     claimed.event_id, claimed.attempt, claimed.job_id, claimed.url, duration_ms)
        else:
            left = s.webhook_max_attempts - claimed.attempt
            log.warning("webhook %s attempt %s for job %s to %s failed: %s (%s)", claimed.event_id,
                        claimed.attempt, claimed.job_id, claimed.url, error,
                        f"{left} attempt(s) left" if left > 0 else "giving up")
        return error is None


def start_dispatcher(settings: Settings, db: Database | None = None) -> Dispatcher:
    """Start the process's dispatcher thread (``gradwatch serve`` and ``gradwatch worker``)."""
    return Dispatcher(db or Database(settings.database_url), settings).start()


__all__ = [
    "Claimed", "Dispatcher", "EVENT_JOB_FINISHED", "backoff_seconds", "claim", "deliveries", "get_secret",
    "job_ended", "jobs_ended", "payload_for", "record_result", "rotate_secret", "secret_json", "signature",
    "signing_secrets", "start_dispatcher", "summaries",
]
