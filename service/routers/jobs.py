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
from service import external, queue, reports, webhooks
from service.deps import SessionDep, SettingsDep, TenantDep
from service.openapi import (
    DELIVERIES_EXAMPLE,
    EPOCH_RECORD_EXAMPLE,
    EXTERNAL_JOB_EXAMPLE,
    FINISHED,
    INVALID_EPOCH,
    INVALID_SPEC,
    JOB_EXAMPLE,
    NOT_EXTERNAL,
    NOT_FOUND,
    REPORT_EXAMPLE,
    json_response,
)
from service.epoch_store import load_records
from service.plots import job_plot_response
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
WEBHOOK_EXAMPLE = {**SPEC_EXAMPLE, "callback_url": "https://ci.example.com/hooks/gradwatch"}


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
        "`Idempotency-Key` header seen before, the original job is returned (header "
        "`Idempotent-Replayed: true`).\n\n"
        "Optional `callback_url` (http or https, on either kind of job): when the job ends "
        "(succeeded, failed, cancelled, or an external run abandoned) the service POSTs "
        "`{\"event\": \"job.finished\", \"job\": ..., \"report\": ...}` there, signed "
        "`Gradwatch-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, f\"{t}.{body}\")>` with "
        "the secret of `GET /v1/webhook-secret`, retried with exponential backoff until a 2xx; "
        "every attempt is listed by `GET /v1/jobs/{id}/deliveries`."
    ),
    responses={
        202: json_response("Spec job queued; `Location` names it.", {**JOB_EXAMPLE, "status": "queued",
                           "progress": {"epoch": 0, "epochs": 10}, "verdict": None, "finished_at": None,
                           "started_at": None, "report_final": False, "time_to_verdict_s": None,
                           "webhook": {**JOB_EXAMPLE["webhook"], "status": "waiting", "attempts": 0,
                                       "last_status_code": None, "last_attempt_at": None, "delivered_at": None}}),
        201: json_response("External job created (status `running`); stream its epochs next.", EXTERNAL_JOB_EXAMPLE),
        422: INVALID_SPEC,
    },
)
def submit_job(
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    payload: Annotated[dict[str, Any], Body(openapi_examples={
        "spec": {"summary": "a 20-layer sigmoid MLP", "value": SPEC_EXAMPLE},
        "external": {"summary": "an external run", "value": EXTERNAL_EXAMPLE},
        "webhook": {"summary": "a spec job with a webhook", "value": WEBHOOK_EXAMPLE},
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


@router.get("", summary="List jobs",
            description="Newest first; filter by `status` (and `parent_id`: the verification children of a job); "
                        "page with `limit` and the `next_cursor` of the previous page (null on the last page).",
            responses={200: json_response("A page of jobs.", {"items": [JOB_EXAMPLE], "next_cursor": None})})
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
    hooks = webhooks.summaries(session, rows[:limit])  # one query for the whole page
    return {"items": [job_json(j, webhook=hooks[j.id]) for j in rows[:limit]], "next_cursor": next_cursor}


@router.get("/{job_id}", summary="Get a job",
            description="Status, progress (`epoch` of `epochs`), the verdict so far, the error of a failed job "
                        "(`error.code` e.g. `training_error`, `max_attempts`, `abandoned`) and, with a "
                        "`callback_url`, the `webhook` delivery summary (`waiting`, `pending`, `sending`, "
                        "`retrying`, `delivered`, `failed`).",
            responses={200: json_response("The job.", JOB_EXAMPLE), 404: NOT_FOUND})
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    return job_json(_job(session, tenant, job_id))


@router.post("/{job_id}/cancel", status_code=202, summary="Cancel a job",
             description="A queued job is cancelled at once; a running spec job stops within about a second "
                         "(its worker sees the request at its next heartbeat); an external job is cancelled "
                         "at once with a final report on the epochs that arrived. 409 if it already ended.",
             responses={202: json_response("The job (`cancelled`, or `running` with `cancel_requested`).",
                                           {**JOB_EXAMPLE, "status": "cancelled", "verdict": None}),
                        404: NOT_FOUND, 409: FINISHED})
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
            description="Oldest first, one record per epoch (a rerun attempt replaces, never duplicates). "
                        "`Accept: text/csv` gives the long format, one row per (epoch, layer), metrics as "
                        "`metric_<name>` columns; non-finite numbers are null (JSON) or empty cells (CSV).",
            responses={200: {"description": "The records.", "content": {
                "application/json": {"example": {"items": [EPOCH_RECORD_EXAMPLE]}},
                "text/csv": {"example": "epoch,loss,nonfinite,layer,type,grad_norm_mean,...\n1,2.29,False,fc1,linear,3.1e-09,...\n"}}},
                404: NOT_FOUND})
def get_epochs(job_id: str, request: Request, session: SessionDep, tenant: TenantDep) -> Response:
    _job(session, tenant, job_id)
    records = load_records(session, job_id)
    if "text/csv" in request.headers.get("accept", ""):
        return Response(epochs_csv(records), media_type="text/csv; charset=utf-8")
    return JSONResponse({"items": records})


@router.post("/{job_id}/epochs", status_code=202, summary="Stream epoch records (external jobs)",
             description="One epoch record or a list (the SDK batches what piled up while the server was away). "
                         "Idempotent on (job, epoch): a retried POST replaces, never duplicates. A list is "
                         "validated whole before anything is stored. Each post also keeps the run from being "
                         "taken as abandoned.",
             responses={202: json_response("Stored.", {"accepted": 1, "job": {**EXTERNAL_JOB_EXAMPLE,
                                                        "progress": {"epoch": 1, "epochs": 10}}}),
                        404: NOT_FOUND, 409: FINISHED, 422: INVALID_EPOCH})
def post_epochs(
    job_id: str, session: SessionDep, tenant: TenantDep,
    payload: Annotated[dict[str, Any] | list[dict[str, Any]], Body(openapi_examples={
        "one": {"summary": "one epoch record", "value": EPOCH_RECORD_EXAMPLE},
        "list": {"summary": "a batch", "value": [EPOCH_RECORD_EXAMPLE, {**EPOCH_RECORD_EXAMPLE, "epoch": 2}]},
    })],
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
             description="No more epochs: compute the final report (and send the webhook, if any). "
                         "Completing a job that already ended returns it unchanged.",
             responses={200: json_response("The job, `succeeded`, with its verdict.",
                                           {**EXTERNAL_JOB_EXAMPLE, "status": "succeeded", "verdict": "vanishing",
                                            "report_final": True}),
                        404: NOT_FOUND, 409: NOT_EXTERNAL})
def complete_job(job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    job = _job(session, tenant, job_id)
    if job.source != "external":
        raise Problem(409, "not-external", "Not an external job", "Spec jobs complete when their worker finishes training.")
    if job.status not in FINAL_STATUSES:
        external.finish_external(session, job, status="succeeded")
        session.commit()
    return job_json(job)


@router.get("/{job_id}/report", summary="The diagnosis",
            description="Verdict (`vanishing`, `exploding` or `healthy`), findings with evidence, ranked "
                        "recommendations (for spec jobs each a JSON Patch against the submitted spec). Partial "
                        "(`final: false`) while the job runs, computed on the epochs stored so far.",
            responses={200: json_response("The report.", REPORT_EXAMPLE), 404: NOT_FOUND})
def get_report(job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    return reports.report_for(session, _job(session, tenant, job_id))


@router.get("/{job_id}/plots/gradient-flow.png", summary="Gradient-flow heatmap",
            description="Layers (input side at the bottom) x epochs; colour = log10 of the mean gradient norm "
                        "on a fixed scale (1e-10 black .. 1e4 pale yellow), NaN/Inf cells hatched red. "
                        "A vanishing network shows a dark band at the bottom, an exploding one a bright top. "
                        "Cached once the job is final (`ETag`).",
            responses={200: {"description": "A PNG image.", "content": {"image/png": {"example": "(binary PNG)"}}},
                       404: NOT_FOUND},
            response_class=Response)
def gradient_flow(job_id: str, request: Request, session: SessionDep, tenant: TenantDep) -> Response:
    return job_plot_response(request, session, _job(session, tenant, job_id), "gradient-flow")


@router.get("/{job_id}/plots/loss.png", summary="Loss curve",
            description="Mean training loss per epoch (band: the epoch's lowest to highest step loss), epochs "
                        "whose loss was NaN/Inf marked in red; accuracy against chance for classification. "
                        "Cached once the job is final (`ETag`).",
            responses={200: {"description": "A PNG image.", "content": {"image/png": {"example": "(binary PNG)"}}},
                       404: NOT_FOUND},
            response_class=Response)
def loss_plot(job_id: str, request: Request, session: SessionDep, tenant: TenantDep) -> Response:
    return job_plot_response(request, session, _job(session, tenant, job_id), "loss")


@router.get("/{job_id}/plots/temporal.png", summary="Gradient through time (recurrent layers)",
            description="For the first recurrent layer: the norm of the loss gradient at every time step, one "
                        "line per epoch, log scale; vanishing through time shows as a line falling towards t = 1. "
                        "404 for a job without a recurrent layer. Cached once the job is final (`ETag`).",
            responses={200: {"description": "A PNG image.", "content": {"image/png": {"example": "(binary PNG)"}}},
                       404: NOT_FOUND},
            response_class=Response)
def temporal_plot(job_id: str, request: Request, session: SessionDep, tenant: TenantDep) -> Response:
    return job_plot_response(request, session, _job(session, tenant, job_id), "temporal")


@router.post("/{job_id}/heartbeat", status_code=202, summary="Keep an external run alive",
             description="The run is alive though it sent no epoch lately (a long epoch): an external job that "
                         "sends nothing for `GRADWATCH_EXTERNAL_ABANDON_SECONDS` (default an hour) is taken as "
                         "crashed and ends `failed` with error code `abandoned` and a final report on what "
                         "arrived. The SDK heartbeats open runs by itself.",
             responses={202: json_response("The job.", EXTERNAL_JOB_EXAMPLE), 404: NOT_FOUND, 409: FINISHED})
def heartbeat(job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    job = _job(session, tenant, job_id)
    if job.source != "external":
        raise Problem(409, "not-external", "Not an external job", "Spec jobs are kept alive by their workers.")
    if not external.heartbeat(session, job):
        raise Problem(409, "job-finished", "Job already finished", f"The job is {job.status}; it takes no more epochs.")
    session.commit()
    return job_json(job)


@router.get("/{job_id}/deliveries", summary="Webhook delivery attempts",
            description="Every attempt to deliver the job's webhook, oldest first: when it was due and sent, "
                        "the receiver's status code or the error, how long it took, and whether it was "
                        "delivered. Attempt n+1 is due `GRADWATCH_WEBHOOK_BACKOFF_BASE_SECONDS * 2**(n-1)` "
                        "after attempt n failed (capped), up to `GRADWATCH_WEBHOOK_MAX_ATTEMPTS`. "
                        "`delivery_id` (header `Gradwatch-Delivery`) is the same for every attempt of one event.",
            responses={200: json_response("The attempts (empty while the job runs or without callback_url).",
                                          DELIVERIES_EXAMPLE), 404: NOT_FOUND})
def get_deliveries(job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    _job(session, tenant, job_id)
    return {"items": webhooks.deliveries(session, job_id)}
