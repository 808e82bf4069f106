"""Rows -> the contract's JSON shapes, and epoch records -> CSV."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any

from service.tables import FINAL_STATUSES, Job


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


_LOOKUP: Any = object()


def _webhook_summary(job: Job) -> dict[str, Any] | None:
    """The job's webhook delivery summary, read through the session the job belongs to."""
    if not job.callback_url:
        return None
    from sqlalchemy.orm import object_session

    from service import webhooks

    session = object_session(job)
    if session is None:
        return None
    return webhooks.summaries(session, [job])[job.id]


def job_json(job: Job, webhook: dict[str, Any] | None = _LOOKUP) -> dict[str, Any]:
    """``webhook``: the job's delivery summary (service.webhooks.summaries); looked up through
    the job's session when not given (lists pass it, fetched for every job in one query)."""
    return {
        "id": job.id,
        "name": job.name,
        "source": job.source,
        "status": job.status,
        "progress": {"epoch": job.epochs_done or 0, "epochs": job.epochs_total},
        "verdict": job.verdict,
        "parent_id": job.parent_id,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "spec": job.spec,
        # Extensions (optional fields the contract allows):
        "layers": job.declared_layers,
        "remedy_id": job.remedy_id,
        "attempts": job.attempt,
        "worker_id": job.worker_id,
        "cancel_requested": bool(job.cancel_requested),
        "report_final": bool(job.report_final),
        "time_to_verdict_s": job.time_to_verdict_s,
        "callback_url": job.callback_url,
        "webhook": _webhook_summary(job) if webhook is _LOOKUP else webhook,
    }


CSV_COLUMNS = [
    "epoch", "loss", "nonfinite", "layer", "type",
    "grad_norm_mean", "grad_norm_min", "grad_norm_max", "grad_norm_last", "grad_norm_first",
    "grad_max_abs", "weight_norm", "update_ratio", "nonfinite_grads",
    "act_mean", "act_std", "act_saturated_frac", "act_dead_frac",
]


def epochs_csv(records: list[dict[str, Any]]) -> str:
    """One row per (epoch, layer) — the long format pandas users pivot from. Metrics become
    `metric_<name>` columns; non-finite values are empty cells."""
    metric_names = sorted({m for r in records for m in (r.get("metrics") or {})})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS + [f"metric_{m}" for m in metric_names])
    for record in records:
        metrics = record.get("metrics") or {}
        for layer in record.get("layers") or [{}]:
            gn = layer.get("grad_norm") or {}
            act = layer.get("activation") or {}
            row = [
                record.get("epoch"), record.get("loss"), record.get("nonfinite"),
                layer.get("name"), layer.get("type"),
                gn.get("mean"), gn.get("min"), gn.get("max"), gn.get("last"), gn.get("first"),
                layer.get("grad_max_abs"), layer.get("weight_norm"), layer.get("update_ratio"),
                layer.get("nonfinite_grads"),
                act.get("mean"), act.get("std"), act.get("saturated_frac"), act.get("dead_frac"),
            ]
            writer.writerow(["" if v is None else v for v in row] + [metrics.get(m, "") for m in metric_names])
    return out.getvalue()
