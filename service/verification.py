"""`analysis.verify_remedies`: the top-k patched specs run as child jobs; the parent's report
turns final, with each recommendation's measured `verification`, once every child is final."""

from __future__ import annotations

from typing import Any

import jsonpatch
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.tables import Epoch, Job
from service.views import FINAL_STATUSES


def child_specs(job: Job, report: dict[str, Any]) -> list[dict[str, Any]]:
    """enqueue() keyword sets for the children of `job` (none unless verify_remedies > 0)."""
    from models.validation import SpecError, check_spec

    k = int(((job.spec or {}).get("analysis") or {}).get("verify_remedies") or 0)
    children = []
    for rec in [r for r in report.get("recommendations", []) if r.get("patch")][:k]:
        patched = jsonpatch.apply_patch(job.spec, rec["patch"])
        patched.setdefault("analysis", {})["verify_remedies"] = 0
        patched["name"] = f"{job.name} / verify {rec['id']}"
        try:  # remedies only emit patches that validate; this also fills defaults (epochs)
            epochs = check_spec(patched).training.epochs
        except SpecError:
            continue
        children.append({"name": patched["name"], "spec": patched, "remedy_id": rec["id"], "epochs_total": epochs})
    return children


def final_loss(session: Session, job_id: str) -> float | None:
    return session.scalar(select(Epoch.loss).where(Epoch.job_id == job_id).order_by(Epoch.epoch.desc()).limit(1))


def finalize_parent(session: Session, child_id: str) -> bool:
    """Called whenever a child job ends. Idempotent: recomputed from the children each time,
    under the parent's row lock, so two children ending together cannot lose an update."""
    from models.remedies import compare_verification

    child = session.get(Job, child_id)
    if child is None or child.parent_id is None:
        return False
    parent = session.scalars(select(Job).where(Job.id == child.parent_id).with_for_update()).one()
    children = list(session.scalars(select(Job).where(Job.parent_id == parent.id)))
    if parent.report is None or any(c.status not in FINAL_STATUSES for c in children):
        return False
    by_remedy = {c.remedy_id: c for c in children}
    baseline = final_loss(session, parent.id)
    recommendations = []
    for rec in parent.report.get("recommendations", []):
        kid = by_remedy.get(rec.get("id"))
        if kid is not None:
            measured = compare_verification(kid.report, final_loss(session, kid.id), baseline)
            rec = {**rec, "verification": {"job_id": kid.id, **measured, "status": kid.status}}
        recommendations.append(rec)
    parent.report = {**parent.report, "recommendations": recommendations, "final": True}
    parent.report_final = True
    return True
