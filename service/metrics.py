"""Prometheus metrics. Queue figures are read from the database at scrape time (the queue is
the database, and workers run in other processes), HTTP latency is measured in-process."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request

from service.db import Database
from service.tables import Job, Worker

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


class QueueCollector(Collector):
    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = datetime.now(timezone.utc)
        with self.db.session() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            oldest = session.scalar(select(func.min(Job.created_at)).where(Job.status == "queued", Job.source == "spec"))
            workers = list(session.execute(select(Worker.id, Worker.heartbeat_at)).all())
        jobs = GaugeMetricFamily("gradwatch_jobs", "Jobs by status", labels=["status"])
        for status in STATUSES:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        yield GaugeMetricFamily("gradwatch_queue_depth", "Spec jobs waiting for a worker", value=counts.get("queued", 0))
        age = (now - oldest).total_seconds() if oldest is not None else 0.0
        yield GaugeMetricFamily("gradwatch_queue_oldest_age_seconds", "Age of the oldest queued job", value=age)
        beats = GaugeMetricFamily("gradwatch_worker_heartbeat_age_seconds", "Seconds since each worker's last heartbeat", labels=["worker"])
        for worker_id, beat in workers:
            if beat is not None:
                beats.add_metric([worker_id], (now - beat).total_seconds())
        yield beats


def make_registry(db: Database) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    registry.register(QueueCollector(db))
    latency = Histogram(
        "gradwatch_http_request_duration_seconds", "HTTP request latency by route",
        ["method", "route", "status"], registry=registry,
    )
    return registry, latency


class LatencyMiddleware(BaseHTTPMiddleware):
    def __init__(self, app, histogram: Histogram) -> None:  # type: ignore[no-untyped-def]
        super().__init__(app)
        self.histogram = histogram

    async def dispatch(self, request: Request, call_next):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        # The route template, not the raw path: one series per endpoint, not per job id.
        path = getattr(route, "path", "unmatched")
        self.histogram.labels(request.method, path, str(response.status_code)).observe(time.perf_counter() - started)
        return response
