"""The worker: claim a job, train it while heartbeating its lease, write every epoch fenced.

Every write goes through `service.queue`'s fenced statements (job id, worker id, attempt): once
a worker's lease was reclaimed, its writes match no row and it stops without touching the job.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import socket
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from service import queue, reports, verification, webhooks
from service.db import Database
from service.epoch_store import load_records
from service.settings import Settings
from service.tables import Job

log = logging.getLogger("gradwatch.worker")


def default_threads(workers_on_machine: int) -> int:
    """Torch threads per worker so that N workers share the cores instead of fighting."""
    return max(1, (os.cpu_count() or 1) // max(1, workers_on_machine))


@dataclass
class _Flags:
    done: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)


class Worker:
    def __init__(self, db: Database, settings: Settings, *, worker_id: str | None = None, threads: int | None = None) -> None:
        self.db = db
        self.settings = settings
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.threads = threads
        self.stop = threading.Event()

    # -- loop -------------------------------------------------------------------------
    def run_forever(self) -> None:
        import models.training  # noqa: F401  (torch and the ML stack load now, not on the first job)

        with self.db.session() as session:
            queue.register_worker(session, self.id, socket.gethostname(), os.getpid())
        log.info("worker %s started (torch threads: %s)", self.id, self.threads)
        try:
            while not self.stop.is_set():
                try:
                    ran = self.run_once()
                except Exception:  # a database blip must not kill the worker
                    log.exception("worker %s: error in the claim loop", self.id)
                    ran = False
                if not ran:
                    self.stop.wait(self.settings.poll_seconds)
        finally:
            with self.db.session() as session:
                queue.unregister_worker(session, self.id)
            log.info("worker %s stopped", self.id)

    def run_once(self) -> bool:
        """Reclaim expired leases, claim one job and run it. False when the queue is empty."""
        with self.db.session() as session:
            requeued, failed = queue.reclaim_expired(session, self.settings.max_attempts)
        for job_id in failed:
            self._after_child_final(job_id)
        if requeued or failed:
            log.warning("reclaimed expired leases: requeued %s, failed %s", requeued, failed)
        with self.db.session() as session:
            lease = queue.claim(session, self.id, self.settings.lease_seconds)
            queue.worker_heartbeat(session, self.id, lease.job_id if lease else None)
        if lease is None:
            return False
        self.run_job(lease)
        return True

    # -- one job ----------------------------------------------------------------------
    def run_job(self, lease: queue.Lease) -> None:
        from models.training import train
        from models.validation import Limits, check_spec

        # Heartbeat from the moment of the claim: a cancel or a lost lease is seen even while
        # the dataset is being made and the model built.
        flags = _Flags()
        beat = threading.Thread(target=self._heartbeat, args=(lease, flags), daemon=True, name="heartbeat")
        beat.start()
        with self.db.session() as session:
            if not queue.begin_attempt(session, lease):
                flags.done.set()
                return
            job = session.get(Job, lease.job_id)
            assert job is not None
            raw_spec = job.spec
        log.info("worker %s: job %s attempt %s", self.id, lease.job_id, lease.attempt)
        try:
            spec = check_spec(raw_spec, Limits(**self.settings.limit_kwargs()))
            result = train(
                spec,
                on_epoch=lambda record: self._write_epoch(lease, flags, record),
                should_stop=lambda: self.stop.is_set() or flags.lost.is_set() or flags.cancel.is_set(),
                threads=self.threads,
                early_stop=spec.analysis.early_stop,
            )
        except Exception as exc:  # the service could not run it: that is `failed`
            log.exception("job %s failed", lease.job_id)
            flags.done.set()
            self._finish(lease, flags, status="failed", error={"code": "training_error", "message": f"{type(exc).__name__}: {exc}"})
            return
        finally:
            flags.done.set()
            beat.join(timeout=5)
        if flags.lost.is_set():
            log.warning("job %s: lease lost; another worker owns it now", lease.job_id)
        elif flags.cancel.is_set():
            self._finish(lease, flags, status="cancelled", time_to_verdict_s=result.time_to_verdict_s)
        elif self.stop.is_set() and result.stopped == "cancelled":
            with self.db.session() as session:  # SIGTERM: hand the job back at once
                queue.release(session, lease)
            log.info("job %s released on shutdown", lease.job_id)
        else:
            self._finish(lease, flags, status="succeeded", time_to_verdict_s=result.time_to_verdict_s)

    def _heartbeat(self, lease: queue.Lease, flags: _Flags) -> None:
        interval = self.settings.heartbeat_interval
        while not flags.done.wait(interval):
            try:
                with self.db.session() as session:
                    beat = queue.heartbeat(session, lease, self.settings.lease_seconds)
                    queue.worker_heartbeat(session, self.id, lease.job_id)
            except Exception:  # keep trying: the lease only expires after lease_seconds
                log.exception("heartbeat for job %s failed", lease.job_id)
                continue
            if not beat.alive:
                flags.lost.set()
                return
            if beat.cancel_requested:
                flags.cancel.set()

    def _write_epoch(self, lease: queue.Lease, flags: _Flags, record: dict[str, Any]) -> None:
        if flags.lost.is_set():
            return
        with self.db.session() as session:
            if not queue.write_epoch(session, lease, record):
                flags.lost.set()

    def _finish(self, lease: queue.Lease, flags: _Flags, *, status: str, error: dict[str, str] | None = None,
                time_to_verdict_s: float | None = None) -> None:
        children: list[dict[str, Any]] = []
        with self.db.session() as session:
            job = session.get(Job, lease.job_id)
            assert job is not None
            records = load_records(session, job.id)
            report = reports.compute(job, records, final=True) if records or status != "failed" else None
            if status == "succeeded" and report is not None and job.parent_id is None:
                children = verification.child_specs(job, report)
            if report is not None and children:
                report["final"] = False  # final once the verification children are
            done = queue.finish(
                session, lease, status=status, verdict=report["verdict"] if report else None,
                report=report, report_final=not children, error=error, time_to_verdict_s=time_to_verdict_s,
            )
            if not done:
                flags.lost.set()
                return
            for child in children:
                queue.enqueue(session, tenant=job.tenant, parent_id=job.id, priority=-1, **child)
        if job.parent_id:
            self._after_child_final(job.id)

    def _after_child_final(self, job_id: str) -> None:
        with self.db.session() as session:
            if verification.finalize_parent(session, job_id):
                parent_id = session.get(Job, job_id).parent_id  # type: ignore[union-attr]
                session.flush()
                webhooks.job_ended(session, parent_id)  # the parent's report just turned final


def _die_with_parent(worker: Worker) -> None:
    """Workers started by `gradwatch serve` stop when it dies, however it dies (even SIGKILL):
    the kernel sends SIGTERM on Linux (PR_SET_PDEATHSIG), and a parent-pid watch covers the
    rest. An orphan would go on claiming jobs for an API nobody runs any more."""
    parent = os.environ.get("GRADWATCH_PARENT_PID")
    if not parent:
        return
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while not worker.stop.wait(1.0):
            if os.getppid() != int(parent):
                log.warning("worker %s: parent %s is gone; stopping", worker.id, parent)
                worker.stop.set()

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def run_worker(settings: Settings, *, threads: int | None = None, worker_id: str | None = None) -> None:
    """Process entry point: SIGTERM/SIGINT finish the current step and release the job."""
    import torch

    threads = threads or default_threads(int(os.environ.get("GRADWATCH_WORKERS_ON_MACHINE", "1")))
    torch.set_num_threads(threads)
    worker = Worker(Database(settings.database_url), settings, worker_id=worker_id, threads=threads)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop.set())
    _die_with_parent(worker)
    # Webhooks and abandoned external jobs are served by every worker too (and by `serve`).
    dispatcher = webhooks.start_dispatcher(settings, worker.db)
    try:
        worker.run_forever()
    finally:
        dispatcher.stop()
