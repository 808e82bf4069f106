"""External jobs: statistics streamed from a user's own training loop."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from service import reports
from service.epoch_store import load_records, upsert_external
from service.problems import Problem
from service.tables import Job


def now() -> datetime:
    return datetime.now(timezone.utc)


def check_callback_url(url: Any) -> str:
    """Webhooks go to http(s) URLs only; anything else is refused at submission."""
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise Problem(422, "invalid-spec", "Invalid job spec", "/callback_url: must be an http(s) URL",
                      [{"pointer": "/callback_url", "detail": "must be an http(s) URL"}])
    return url


def accept_epochs(session: Session, job: Job, records: list[dict[str, Any]]) -> None:
    upsert_external(session, job.id, records)
    stamp = now()
    job.epochs_done = max([job.epochs_done or 0] + [int(r["epoch"]) for r in records])
    job.started_at = job.started_at or stamp
    job.heartbeat_at = stamp  # an external job's liveness: the last time it sent anything
    job.updated_at = stamp


def finish_external(session: Session, job: Job, *, status: str) -> None:
    report = reports.compute(job, load_records(session, job.id), final=True)
    stamp = now()
    job.status = status
    job.report = report
    job.report_final = True
    job.verdict = report["verdict"]
    job.finished_at = stamp
    job.updated_at = stamp
