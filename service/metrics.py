"""Prometheus metrics. Queue figures are read from the database at scrape time (the queue is
the database, and workers run in other processes), HTTP latency is measured in-process.

Durations come from the rows' own timestamps, aggregated in SQL at scrape time:
- ``gradwatch_job_duration_seconds{source,status}``: finished_at - started_at of every finished
  job, a cumulative histogram (jobs are never deleted, so its counts only grow);
- ``gradwatch_job_queue_wait_seconds``: started_at - created_at of every spec job a worker took;
- ``gradwatch_epoch_duration_recent_seconds{quantile}`` (+ ``gradwatch_epochs_recent``): the gap
  between consecutive epoch records of spec jobs written in the last ``RECENT_SECONDS``; gauges,
  since a rerun attempt replaces its epochs (a histogram's counts must never fall);
- ``gradwatch_webhook_deliveries{state}``, ``gradwatch_webhook_oldest_pending_age_seconds`` (how
  late the dispatchers are) and ``gradwatch_webhook_delivery_duration_seconds``.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import case, func, or_, select
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request

from service.db import Database
from service.tables import WEBHOOK_STATES, Epoch, Job, WebhookDelivery, Worker

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
WAIT_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
WEBHOOK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RECENT_SECONDS = 3600.0
QUANTILES = (0.5, 0.9, 0.99, 1.0)


def _seconds(dialect: str, later: Any, earlier: Any) -> Any:
    """SQL for ``later - earlier`` in seconds (timestamptz on PostgreSQL, UTC text on SQLite)."""
    if dialect == "postgresql":
        return func.extract("epoch", later - earlier)
    return (func.julianday(later) - func.julianday(earlier)) * 86400.0


def _histogram_columns(value: Any, buckets: tuple[float, ...]) -> list[Any]:
    return [func.count(), func.coalesce(func.sum(value), 0.0)] + [
        func.coalesce(func.sum(case((value <= b, 1), else_=0)), 0) for b in buckets
    ]


def _add_histogram(family: HistogramMetricFamily, labels: list[str], row: Any, buckets: tuple[float, ...]) -> None:
    count, total, *cumulative = row
    points = [(repr(float(b)), int(c)) for b, c in zip(buckets, cumulative)] + [("+Inf", int(count))]
    family.add_metric(labels, points, float(total))


def _quantile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[index]


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
        yield from self._durations(now)
        yield from self._webhooks(now)

    def _durations(self, now: datetime) -> Iterator[Any]:
        dialect = self.db.dialect
        run = _seconds(dialect, Job.finished_at, Job.started_at)
        wait = _seconds(dialect, Job.started_at, Job.created_at)
        cutoff = now - timedelta(seconds=RECENT_SECONDS)
        with self.db.session() as session:
            finished = session.execute(
                select(Job.source, Job.status, *_histogram_columns(run, JOB_BUCKETS))
                .where(Job.status.in_(("succeeded", "failed", "cancelled")),
                       Job.started_at.is_not(None), Job.finished_at.is_not(None))
                .group_by(Job.source, Job.status)
            ).all()
            waited = session.execute(
                select(*_histogram_columns(wait, WAIT_BUCKETS))
                .where(Job.source == "spec", Job.started_at.is_not(None))
            ).one()
            recent_jobs = select(Job.id).where(
                Job.source == "spec", or_(Job.status == "running", Job.finished_at >= cutoff))
            epochs = session.execute(
                select(Epoch.job_id, Epoch.epoch, Epoch.created_at)
                .where(Epoch.job_id.in_(recent_jobs), Epoch.created_at >= cutoff - timedelta(hours=1))
                .order_by(Epoch.job_id, Epoch.epoch)
            ).all()
        durations = HistogramMetricFamily(
            "gradwatch_job_duration_seconds", "Finished jobs: finished_at - started_at", labels=["source", "status"])
        for source, status, *row in finished:
            _add_histogram(durations, [source, status], row, JOB_BUCKETS)
        yield durations
        queue_wait = HistogramMetricFamily(
            "gradwatch_job_queue_wait_seconds", "Spec jobs: started_at - created_at (time in the queue)")
        _add_histogram(queue_wait, [], waited, WAIT_BUCKETS)
        yield queue_wait
        gaps = sorted(
            (b.created_at - a.created_at).total_seconds()
            for a, b in zip(epochs, epochs[1:])
            if a.job_id == b.job_id and b.epoch == a.epoch + 1 and b.created_at >= cutoff
        )
        recent = GaugeMetricFamily(
            "gradwatch_epoch_duration_recent_seconds",
            f"Spec jobs: time between consecutive epoch records, over the last {RECENT_SECONDS:g} s",
            labels=["quantile"])
        for q in QUANTILES if gaps else ():
            recent.add_metric([repr(q)], _quantile(gaps, q))
        yield recent
        yield GaugeMetricFamily("gradwatch_epochs_recent",
                                f"Epoch durations measured over the last {RECENT_SECONDS:g} s", value=len(gaps))

    def _webhooks(self, now: datetime) -> Iterator[Any]:
        took = WebhookDelivery.duration_ms / 1000.0
        with self.db.session() as session:
            states = dict(session.execute(
                select(WebhookDelivery.state, func.count()).group_by(WebhookDelivery.state)).all())
            overdue = session.scalar(select(func.min(WebhookDelivery.next_attempt_at)).where(
                WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at <= now))
            sent = session.execute(select(*_histogram_columns(took, WEBHOOK_BUCKETS))
                                   .where(WebhookDelivery.duration_ms.is_not(None))).one()
        family = GaugeMetricFamily("gradwatch_webhook_deliveries", "Webhook delivery attempts by state",
                                   labels=["state"])
        for state in WEBHOOK_STATES:
            family.add_metric([state], states.get(state, 0))
        yield family
        yield GaugeMetricFamily(
            "gradwatch_webhook_oldest_pending_age_seconds",
            "How long the most overdue webhook attempt has been due (0: dispatchers keep up)",
            value=(now - overdue).total_seconds() if overdue is not None else 0.0)
        took_family = HistogramMetricFamily("gradwatch_webhook_delivery_duration_seconds",
                                            "Webhook attempts: time until the receiver answered (or failed)")
        _add_histogram(took_family, [], sent, WEBHOOK_BUCKETS)
        yield took_family


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
