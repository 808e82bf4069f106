"""/v1/jobs: submit, list, read, cancel; epochs; external streaming; report; plots."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from models.validation import Limits, SpecError, check_spec
from service import external, queue, reports
from service.deps import SessionDep, SettingsDep, TenantDep
from service.epoch_store import load_records
from service.plots import gradient_flow_png
from service.problems import Problem, not_found, pointer_from_loc
from service.schemas import EpochRecordIn, ExternalJobIn
from service.tables import Job
from service.views import FINAL_STATUSES, epochs_csv, job_json

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]

SPEC_EXAMPLE = {
    "name": "deep-sigmoid",
    "network": {"layers": [
        {"type": "repeat", "times": 20, "layers": [
            {"type": "linear", "out_features": 128, "init": {"name": "normal", "std": 0.05}},
            {"type": "sigmoid"}]},
        {"type": "linear", "out_features": 10}]},
    "data": {"name": "digits"},
    "training": {"optimizer": "sgd", "lr": 0.1, "batch_size": 64, "epochs": 10, "seed": 0},
    "analysis": {"early_stop": True, "verify_remedies": 0},
}
EXTERNAL_EXAMPLE = {
    "source": "external", "name": "my-run",
    "layers": [{"name": "fc1", "type": "linear"}, {"name": "fc2", "type": "linear"}], "epochs": 10,
}


def _job(session: Session, tenant: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant != tenant:
        raise not_found()
    return job


def _created(job: Job, status_code: int, replayed: bool = False) -> JSONResponse:
    headers = {"Location": f"/v1/jobs/{job.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(job_json(job), status_code=status_code, headers=headers)


def _invalid_spec(problems: list[Any]) -> Problem:
    errors = [{"pointer": p.pointer, "detail": p.message} for p in problems]
    first = errors[0]
    return Problem(422, "invalid-spec", "Invalid job spec", f"{first['pointer'] or '/'}: {first['detail']}", errors)


@router.post(
    "",
    status_code=202,
    summary="Submit a job",
    description=(
        "Submit a network spec to be trained and diagnosed by a worker (`source: \"spec\"`, the "
        "default; 202), or open an external job whose epochs you stream from your own training "
        "loop (`source: \"external\"`; 201). A spec that cannot be built is refused with 422 "
        "problem+json naming the field by JSON Pointer, and is never queued. With an "
        "`Idempotency-Key` header seen before, the original job is returned."
    ),
    responses={201: {"description": "external job created"}, 422: {"description": "invalid spec"}},
)
def submit_job(
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    payload: Annotated[dict[str, Any], Body(openapi_examples={
        "spec": {"summary": "a 20-layer sigmoid MLP", "value": SPEC_EXAMPLE},
        "external": {"summary": "an external run", "value": EXTERNAL_EXAMPLE},
    })],
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    body = dict(payload)
    source = body.get("source", "spec")
    existing = queue.find_idempotent(session, tenant, idempotency_key)
    if existing is not None:
        return _created(existing, 201 if existing.source == "external" else 202, replayed=True)
    if source == "external":
        try:
            ext = ExternalJobIn.model_validate(body)
        except ValidationError as exc:
            raise _pydantic_problem(exc) from None
        job = queue.enqueue(
            session, tenant=tenant, name=ext.name, spec=None, epochs_total=ext.epochs,
            source="external", status="running",
            declared_layers=[layer.model_dump() for layer in ext.layers],
            idempotency_key=idempotency_key,
            callback_url=str(ext.callback_url) if ext.callback_url else None,
        )
        session.commit()
        return _created(job, 201)
    if source != "spec":
        raise Problem(422, "invalid-spec", "Invalid job spec", '/source: must be "spec" or "external"',
                      [{"pointer": "/source", "detail": 'must be "spec" or "external"'}])
    body.pop("source", None)
    callback_url = body.pop("callback_url", None)
    if callback_url is not None:
        callback_url = external.check_callback_url(callback_url)
    try:
        spec = check_spec(body, Limits(**settings.limit_kwargs()))
    except SpecError as exc:
        raise _invalid_spec(exc.problems) from None
    job = queue.enqueue(
        session, tenant=tenant, name=spec.name or "job", spec=body,
        epochs_total=spec.training.epochs, idempotency_key=idempotency_key, callback_url=callback_url,
    )
    session.commit()
    return _created(job, 202)


def _pydantic_problem(exc: ValidationError) -> Problem:
    errors = [{"pointer": pointer_from_loc(e["loc"]), "detail": e["msg"]} for e in exc.errors()]
    return Problem(422, "invalid-request", "Invalid request", f"{errors[0]['pointer']}: {errors[0]['detail']}", errors)


def _encode_cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(f"{job.created_at.isoformat()}|{job.id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, _, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(created), job_id
    except (ValueError, UnicodeDecodeError):
        raise Problem(422, "invalid-request", "Invalid request", "/cursor: not a cursor this API returned",
                      [{"pointer": "/cursor", "detail": "not a cursor this API returned", "in": "query"}]) from None


@router.get("", summary="List jobs", description="Newest first; filter by `status`; page with `limit` and the `next_cursor` of the previous page.")
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
    parent_id: str | None = None,
) -> dict[str, Any]:
    query = select(Job).where(Job.tenant == tenant)
    if status:
        query = query.where(Job.status == status)
    if parent_id:
        query = query.where(Job.parent_id == parent_id)
    if cursor:
        created, job_id = _decode_cursor(cursor)
        query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    next_cursor = _encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return {"items": [job_json(j) for j in rows[:limit]], "next_cursor": next_cursor}


@router.get("/{job_id}", summary="Get a job")
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    return job_json(_job(session, tenant, job_id))


@router.post("/{job_id}/cancel", status_code=202, summary="Cancel a job",
             description="A queued job is cancelled at once; a running one stops within a couple of seconds.")
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    job = _job(session, tenant, job_id)
    if job.status in FINAL_STATUSES:
        raise Problem(409, "job-finished", "Job already finished", f"The job is {job.status}; there is nothing to cancel.")
    if job.source == "external":
        external.finish_external(session, job, status="cancelled")
    else:
        queue.request_cancel(session, job_id, tenant)
    session.commit()
    session.refresh(job)
    return job_json(job)


@router.get("/{job_id}/epochs", summary="Epoch records",
            description="Oldest first. `Accept: text/csv` gives one row per (epoch, layer).",
            responses={200: {"content": {"text/csv": {}}}})
def get_epochs(job_id: str, request: Request, session: SessionDep, tenant: TenantDep) -> Response:
    _job(session, tenant, job_id)
    records = load_records(session, job_id)
    if "text/csv" in request.headers.get("accept", ""):
        return Response(epochs_csv(records), media_type="text/csv; charset=utf-8")
    return JSONResponse({"items": records})


@router.post("/{job_id}/epochs", status_code=202, summary="Stream epoch records (external jobs)",
             description="One epoch record or a list. Idempotent on (job, epoch): a retried POST replaces, never duplicates.")
def post_epochs(
    job_id: str, session: SessionDep, tenant: TenantDep,
    payload: Annotated[dict[str, Any] | list[dict[str, Any]], Body()],
) -> dict[str, Any]:
    job = _job(session, tenant, job_id)
    if job.source != "external":
        raise Problem(409, "not-external", "Not an external job", "Epochs of spec jobs are written by the workers.")
    if job.status in FINAL_STATUSES:
        raise Problem(409, "job-finished", "Job already finished", f"The job is {job.status}; it takes no more epochs.")
    items = payload if isinstance(payload, list) else [payload]
    if not items:
        raise Problem(422, "invalid-request", "Invalid request", "/: send one epoch record or a non-empty list")
    records = []
    for index, item in enumerate(items):
        try:
            EpochRecordIn.model_validate(item)
        except ValidationError as exc:
            prefix = f"/{index}" if isinstance(payload, list) else ""
            errors = [{"pointer": prefix + pointer_from_loc(e["loc"]), "detail": e["msg"]} for e in exc.errors()]
            raise Problem(422, "invalid-epoch", "Invalid epoch record",
                          f"{errors[0]['pointer']}: {errors[0]['detail']}", errors) from None
        records.append(item)
    external.accept_epochs(session, job, records)
    session.commit()
    return {"accepted": len(records), "job": job_json(job)}


@router.post("/{job_id}/complete", summary="Complete an external job",
             description="No more epochs: compute the final report.")
def complete_job(job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    job = _job(session, tenant, job_id)
    if job.source != "external":
        raise Problem(409, "not-external", "Not an external job", "Spec jobs complete when their worker finishes training.")
    if job.status not in FINAL_STATUSES:
        external.finish_external(session, job, status="succeeded")
        session.commit()
    return job_json(job)


@router.get("/{job_id}/report", summary="The diagnosis",
            description="Verdict, findings with evidence, ranked recommendations. Partial (`final: false`) while the job runs.")
def get_report(job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    return reports.report_for(session, _job(session, tenant, job_id))


@router.get("/{job_id}/plots/gradient-flow.png", summary="Gradient-flow heatmap",
            description="Layers (input side at the bottom) x epochs; colour = log10 of the mean gradient norm.",
            responses={200: {"content": {"image/png": {}}}}, response_class=Response)
def gradient_flow(job_id: str, session: SessionDep, tenant: TenantDep) -> Response:
    job = _job(session, tenant, job_id)
    png = gradient_flow_png(job.name, load_records(session, job_id))
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})
