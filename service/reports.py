"""Reports: stored once a job is final, computed from the stored epochs while it runs."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from models.diagnosis import diagnose
from service.epoch_store import load_records
from service.tables import Job


def thresholds_of(job: Job) -> dict[str, float] | None:
    return ((job.spec or {}).get("analysis") or {}).get("thresholds")


def compute(job: Job, records: list[dict[str, Any]], *, final: bool) -> dict[str, Any]:
    report = diagnose(records, spec=job.spec, final=final, thresholds=thresholds_of(job))
    return {"job_id": job.id, **report, "final": final}


def report_for(session: Session, job: Job) -> dict[str, Any]:
    if job.report is not None and (job.report_final or job.status in ("succeeded", "failed", "cancelled")):
        return {**job.report, "job_id": job.id, "final": bool(job.report_final)}
    return compute(job, load_records(session, job.id), final=False)
