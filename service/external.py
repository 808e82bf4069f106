"""External jobs: statistics streamed from a user's own training loop."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import update
from sqlalchemy.orm import Session

from service import reports
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
    now = utcnow()
    done = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == "running")
        .values(status=status, report=report, report_final=True, verdict=report["verdict"],
                finished_at=now, updated_at=now)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).first()
    session.refresh(job)
    return done is not None
