"""External jobs: statistics streamed from a user's own training loop."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service import reports, webhooks
from service.epoch_store import load_records, upsert_external
from service.problems import Problem
from service.tables import Job, utcnow


def check_callback_url(url: Any) -> str:
    """Webhooks go to http(s) URLs only; anything else is refused at submission."""
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise Problem(422, "invalid-spec", "Invalid job spec", "/callback_url: must be an http(s) URL",
                      [{"pointer": "/callback_url", "detail": "must be an http(s) URL"}])
    return url


def _finished(job: Job) -> Problem:
    return Problem(409, "job-finished", "Job already finished", f"The job is {job.status}; it takes no more epochs.")


def accept_epochs(session: Session, job: Job, records: list[dict[str, Any]]) -> None:
    """Idempotent on (job, epoch); refused once the job is final (it may have ended meanwhile)."""
    try:
        written = upsert_external(session, job.id, records)
    except ValueError as exc:
        raise Problem(422, "invalid-epoch", "Invalid epoch record", str(exc)) from None
    if written is None:
        session.refresh(job)
        raise _finished(job)
    session.refresh(job)


def finish_external(session: Session, job: Job, *, status: str) -> bool:
    """Final report on what arrived, written only if the job is still running: a complete and
    a cancel racing each other cannot overwrite one another."""
    report = reports.compute(job, load_records(session, job.id), final=True)
    done = _end(session, job.id, (Job.status == "running",), status=status, report=report)
    session.refresh(job)
    return done


def _end(session: Session, job_id: str, still: tuple[Any, ...], *, status: str,
         report: dict[str, Any] | None, **error: str) -> bool:
    """One conditional UPDATE ends the job only if `still` holds (it is still running, and for
    the reaper still silent), so two enders racing each other cannot both win; the winner queues
    the webhook in the same transaction."""
    now = utcnow()
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, *still)
        .values(status=status, report=report, report_final=True,
                verdict=report["verdict"] if report else None, finished_at=now, updated_at=now, **error)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).first()
    if done is not None:
        webhooks.job_ended(session, job_id)
    return done is not None


def _last_sign_of_life() -> Any:
    return func.coalesce(Job.heartbeat_at, Job.started_at, Job.created_at)


def heartbeat(session: Session, job: Job) -> bool:
    """An external run is alive though it sent no epoch lately (a long epoch): postpones
    abandonment. False: the job is no longer running."""
    now = utcnow()
    done = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.source == "external", Job.status == "running")
        .values(heartbeat_at=now, updated_at=now)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).first()
    session.refresh(job)
    return done is not None


def reap_abandoned(session: Session, idle_seconds: float, *, limit: int = 50) -> list[str]:
    """End external jobs that sent nothing (no epoch, no heartbeat) for ``idle_seconds``.

    Such a run's own process died or lost the network for good (W&B calls it "crashed"): the job
    ends ``failed`` with error code ``abandoned``, and, like a completed one, gets a final report
    on the epochs that did arrive (verdict set; none if nothing arrived). Later posts get 409.
    Safe to run from every process at once: each job is ended by one conditional UPDATE that
    re-checks it is still running and still silent, so a post racing the reaper wins."""
    now = utcnow()
    cutoff = now - timedelta(seconds=idle_seconds)
    silent = (Job.source == "external", Job.status == "running", _last_sign_of_life() < cutoff)
    candidates = list(session.scalars(select(Job).where(*silent).order_by(Job.created_at).limit(limit)))
    reaped: list[str] = []
    for job in candidates:
        records = load_records(session, job.id)
        report = reports.compute(job, records, final=True) if records else None
        last = job.heartbeat_at or job.started_at or job.created_at
        message = (f"the run sent nothing for {idle_seconds:g} s (last at {last.isoformat()}), so it is "
                   f"taken as crashed; the report is final on the {len(records)} epoch(s) that arrived")
        if _end(session, job.id, silent, status="failed", report=report,
                error_code="abandoned", error_message=message):
            reaped.append(job.id)
    return reaped
