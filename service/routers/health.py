"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import DatabaseDep
from service.problems import Problem

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process answers",
            description="200 as long as the process serves HTTP; it does not touch the database "
                        "(a restart would not cure a database outage).",
            responses={200: {"description": "Alive.", "content": {"application/json": {"example": {"status": "ok"}}}}})
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the database answers",
            description="200 when the database answers a trivial query; 503 problem+json otherwise, so a load "
                        "balancer stops sending traffic until it is back.",
            responses={200: {"description": "Ready.", "content": {"application/json": {
                           "example": {"status": "ready", "database": "postgresql"}}}},
                       503: {"description": "The database is unreachable.", "content": {"application/problem+json": {
                           "example": {"type": "urn:gradwatch:problem:not-ready", "title": "Not ready", "status": 503,
                                       "detail": "The database is unreachable.", "instance": "/readyz"}}}}})
def readyz(db: DatabaseDep) -> dict[str, str]:
    if not db.ping():
        raise Problem(503, "not-ready", "Not ready", "The database is unreachable.")
    return {"status": "ready", "database": db.engine.dialect.name}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            description="Prometheus text format. Read from the database at scrape time (the queue is the "
                        "database and workers are other processes): `gradwatch_jobs{status}`, "
                        "`gradwatch_queue_depth`, `gradwatch_queue_oldest_age_seconds`, "
                        "`gradwatch_worker_heartbeat_age_seconds{worker}`, the histograms "
                        "`gradwatch_job_duration_seconds{source,status}` and "
                        "`gradwatch_job_queue_wait_seconds`, recent epoch durations "
                        "`gradwatch_epoch_duration_recent_seconds{quantile}`, webhook deliveries "
                        "`gradwatch_webhook_deliveries{state}` and "
                        "`gradwatch_webhook_oldest_pending_age_seconds`; measured in this process: "
                        "`gradwatch_http_request_duration_seconds{method,route,status}`.",
            responses={200: {"description": "The metrics.", "content": {"text/plain": {"example": (
                "# TYPE gradwatch_jobs gauge\ngradwatch_jobs{status=\"queued\"} 2.0\n"
                "# TYPE gradwatch_job_duration_seconds histogram\n"
                "gradwatch_job_duration_seconds_bucket{le=\"60.0\",source=\"spec\",status=\"succeeded\"} 14.0\n")}}}})
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
