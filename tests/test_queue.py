"""service.queue on SQLite and PostgreSQL (the ``database`` fixture runs each test on both)."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from service import epoch_store, queue
from service.db import Database
from service.tables import Epoch, Job, LayerStat, Worker

SPEC = {"name": "t", "network": {"layers": [{"type": "linear", "out_features": 2}]}}
LATER = timedelta(hours=1)


def add(db: Database, name: str = "job", tenant: str = "acme", **kwargs) -> Job:
    kwargs.setdefault("spec", SPEC)
    kwargs.setdefault("epochs_total", 3)
    with db.session() as s:
        return queue.enqueue(s, tenant=tenant, name=name, **kwargs)


def claim(db: Database, worker: str = "w1", lease_seconds: float = 30.0) -> queue.Lease | None:
    with db.session() as s:
        return queue.claim(s, worker, lease_seconds)


def job(db: Database, job_id: str) -> Job:
    with db.session() as s:
        return s.get(Job, job_id)


def reclaim(db: Database, max_attempts: int = 3, later: timedelta = LATER):
    with db.session() as s:
        return queue.reclaim_expired(
            s, max_attempts, now=datetime.now(timezone.utc) + later
        )


def record(epoch: int, n_layers: int = 2, loss: float = 1.0) -> dict:
    return {
        "epoch": epoch,
        "loss": loss,
        "metrics": {"accuracy": 0.5},
        "nonfinite": False,
        "layers": [
            {
                "name": f"layers.{i}.linear",
                "type": "linear",
                "grad_norm": {"mean": 1.0, "min": 0.5, "max": 2.0, "last": 1.0},
                "grad_max_abs": 0.1,
                "weight_norm": 3.0,
                "update_ratio": 0.01,
                "nonfinite_grads": 0,
                "activation": None,
            }
            for i in range(n_layers)
        ],
        "temporal": None,
    }


def counts(db: Database, job_id: str) -> tuple[int, int]:
    with db.session() as s:
        epochs = s.scalar(select(func.count()).select_from(Epoch).where(Epoch.job_id == job_id))
        layers = s.scalar(
            select(func.count()).select_from(LayerStat).where(LayerStat.job_id == job_id)
        )
    return epochs, layers


def snapshot(db: Database, job_id: str) -> dict:
    row = job(db, job_id)
    return {c.key: getattr(row, c.key) for c in Job.__table__.columns}


# --- enqueue / claim -------------------------------------------------------------------------


def test_enqueue_defaults(database):
    before = datetime.now(timezone.utc)
    j = add(database, callback_url="https://example.com/hook")
    assert len(j.id) == 36
    assert (j.status, j.source, j.priority, j.attempt, j.epochs_done) == ("queued", "spec", 0, 0, 0)
    assert j.spec == SPEC and j.callback_url == "https://example.com/hook"
    assert j.created_at.tzinfo is not None and j.created_at.utcoffset() == timedelta(0)
    assert before <= j.created_at <= datetime.now(timezone.utc)
    assert j.started_at is None and j.cancel_requested is False and j.report_final is False
    stored = job(database, j.id)
    assert stored.created_at == j.created_at and stored.created_at.tzinfo is not None


def test_enqueue_refuses_bad_values(database):
    with database.session() as s:
        with pytest.raises(ValueError):
            queue.enqueue(s, tenant="a", name="n", spec=SPEC, epochs_total=1, source="other")
        with pytest.raises(ValueError):
            queue.enqueue(s, tenant="a", name="n", spec=SPEC, epochs_total=1, status="succeeded")
        with pytest.raises(ValueError, match="name is longer than 256"):
            queue.enqueue(s, tenant="a", name="n" * 257, spec=SPEC, epochs_total=1)


def test_claim_order_priority_then_age(database):
    a = add(database, "a")
    b = add(database, "b")
    urgent = add(database, "urgent", priority=-5)
    add(database, "external", source="external", spec=None, status="running",
        declared_layers=[{"name": "fc", "type": "linear"}])
    low = add(database, "low", priority=10)
    order = [claim(database).job_id for _ in range(4)]
    assert order == [urgent.id, a.id, b.id, low.id]
    assert claim(database) is None  # the external job is never claimed


def test_claim_sets_the_lease(database):
    j = add(database)
    before = datetime.now(timezone.utc)
    lease = claim(database, "host:1", lease_seconds=30)
    assert lease == queue.Lease(job_id=j.id, worker_id="host:1", attempt=1)
    row = job(database, j.id)
    assert row.status == "running" and row.worker_id == "host:1" and row.attempt == 1
    assert before <= row.started_at <= datetime.now(timezone.utc)
    assert row.heartbeat_at == row.started_at
    assert timedelta(seconds=29) < row.lease_expires_at - before < timedelta(seconds=31)
    assert row.started_at.tzinfo is not None


def test_claim_on_empty_queue(database):
    assert claim(database) is None


def test_heartbeat_extends_the_lease(database):
    j = add(database)
    lease = claim(database, lease_seconds=1)
    first = job(database, j.id).lease_expires_at
    with database.session() as s:
        result = queue.heartbeat(s, lease, 60)
    assert result == queue.HeartbeatResult(alive=True, cancel_requested=False)
    assert job(database, j.id).lease_expires_at - first > timedelta(seconds=50)


# --- fencing -------------------------------------------------------------------------------


def test_stale_lease_is_fenced_out_after_reclaim(database):
    j = add(database)
    stale = claim(database, "w1", lease_seconds=30)
    assert reclaim(database) == ([j.id], [])
    row = job(database, j.id)
    assert (row.status, row.worker_id, row.lost_leases, row.lease_expires_at) == ("queued", None, 1, None)

    def stale_writes_fail():
        before = snapshot(database, j.id), counts(database, j.id)
        with database.session() as s:
            assert queue.heartbeat(s, stale, 30) == queue.HeartbeatResult(False, False)
        with database.session() as s:
            assert queue.begin_attempt(s, stale) is False
        with database.session() as s:
            assert queue.write_epoch(s, stale, record(1)) is False
        with database.session() as s:
            assert queue.finish(s, stale, status="succeeded", verdict="healthy", report={"x": 1}) is False
        with database.session() as s:
            assert queue.release(s, stale) is False
        assert (snapshot(database, j.id), counts(database, j.id)) == before

    stale_writes_fail()  # while queued
    fresh = claim(database, "w2")
    assert fresh == queue.Lease(j.id, "w2", 2)
    stale_writes_fail()  # while another worker holds it
    with database.session() as s:
        assert queue.begin_attempt(s, fresh)
    with database.session() as s:
        assert queue.write_epoch(s, fresh, record(1))
    with database.session() as s:
        assert queue.finish(s, fresh, status="succeeded", verdict="healthy")
    stale_writes_fail()  # after it finished
    assert job(database, j.id).status == "succeeded"


def test_same_worker_reclaiming_its_job_gets_a_new_fence(database):
    j = add(database)
    old = claim(database, "w1")
    reclaim(database)
    new = claim(database, "w1")
    assert new == queue.Lease(j.id, "w1", 2)
    with database.session() as s:
        assert queue.write_epoch(s, old, record(1)) is False
    with database.session() as s:
        assert queue.write_epoch(s, new, record(1)) is True


def test_reclaim_leaves_live_leases_alone(database):
    j = add(database)
    claim(database, lease_seconds=30)
    assert reclaim(database, later=timedelta(0)) == ([], [])
    assert job(database, j.id).status == "running"


def test_reclaim_fails_the_job_after_max_attempts(database):
    j = add(database)
    for attempt in (1, 2):
        assert claim(database, f"w{attempt}") == queue.Lease(j.id, f"w{attempt}", attempt)
        assert reclaim(database, max_attempts=3) == ([j.id], [])
    claim(database, "host-9:123")
    assert reclaim(database, max_attempts=3) == ([], [j.id])
    row = job(database, j.id)
    assert row.status == "failed" and row.lost_leases == 3 and row.finished_at is not None
    assert row.error_code == "max_attempts"
    assert "stopped responding 3 times" in row.error_message
    assert "last worker 'host-9:123'" in row.error_message
    assert row.lease_expires_at is None
    assert claim(database) is None
    assert reclaim(database) == ([], [])


def test_release_requeues_without_counting_a_lost_lease(database):
    j = add(database)
    lease = claim(database, "w1")
    with database.session() as s:
        assert queue.release(s, lease)
    row = job(database, j.id)
    assert (row.status, row.worker_id, row.lost_leases, row.lease_expires_at) == ("queued", None, 0, None)
    started = row.started_at
    again = claim(database, "w2")
    assert again == queue.Lease(j.id, "w2", 2)
    assert job(database, j.id).started_at == started  # the job started with its first claim
    with database.session() as s:
        assert queue.heartbeat(s, lease, 30).alive is False


# --- epochs and finishing ------------------------------------------------------------------


def test_write_epoch_records_progress_and_replaces_an_epoch(database):
    j = add(database)
    lease = claim(database)
    with database.session() as s:
        assert queue.begin_attempt(s, lease)
    for e in (1, 2):
        with database.session() as s:
            assert queue.write_epoch(s, lease, record(e, n_layers=3))
    assert job(database, j.id).epochs_done == 2
    with database.session() as s:
        assert queue.write_epoch(s, lease, record(2, n_layers=1, loss=0.25))
    assert counts(database, j.id) == (2, 4)
    with database.session() as s:
        records = epoch_store.load_records(s, j.id)
    assert [r["loss"] for r in records] == [1.0, 0.25]
    assert [len(r["layers"]) for r in records] == [3, 1]


def test_write_epoch_refuses_a_malformed_record_without_writing(database):
    j = add(database)
    lease = claim(database)
    with pytest.raises(ValueError):
        with database.session() as s:
            queue.write_epoch(s, lease, {"loss": 1.0})
    assert job(database, j.id).epochs_done == 0 and counts(database, j.id) == (0, 0)


def test_begin_attempt_forgets_earlier_attempts(database):
    j = add(database)
    first = claim(database, "w1")
    with database.session() as s:
        queue.begin_attempt(s, first)
        queue.write_epoch(s, first, record(1))
        queue.write_epoch(s, first, record(2))
    reclaim(database)
    second = claim(database, "w2")
    with database.session() as s:
        assert queue.begin_attempt(s, second)
    assert counts(database, j.id) == (0, 0)
    assert job(database, j.id).epochs_done == 0
    with database.session() as s:
        queue.write_epoch(s, second, record(1, loss=0.5))
    with database.session() as s:
        assert [(r["epoch"], r["loss"]) for r in epoch_store.load_records(s, j.id)] == [(1, 0.5)]
        assert s.scalars(select(Epoch.attempt).where(Epoch.job_id == j.id)).all() == [2]


def test_finish_stores_the_outcome_and_clears_the_lease(database):
    j = add(database)
    lease = claim(database)
    report = {"job_id": j.id, "final": True, "verdict": "exploding",
              "evidence": {"ratio": float("inf")}, "summary": "z"}
    with database.session() as s:
        assert queue.finish(s, lease, status="succeeded", verdict="exploding", report=report,
                            time_to_verdict_s=1.5)
    row = job(database, j.id)
    assert (row.status, row.verdict, row.report_final, row.time_to_verdict_s) == ("succeeded", "exploding", True, 1.5)
    assert row.report["evidence"] == {"ratio": None}  # JSON has no Inf
    assert list(row.report) == list(report)  # key order kept (plain JSON, not JSONB)
    assert row.lease_expires_at is None and row.finished_at >= row.started_at
    with database.session() as s:
        assert queue.finish(s, lease, status="failed") is False


def test_finish_with_an_error(database):
    j = add(database)
    lease = claim(database)
    with database.session() as s:
        with pytest.raises(ValueError):
            queue.finish(s, lease, status="running")
        assert queue.finish(s, lease, status="failed",
                            error={"code": "training_error", "message": "boom"})
    row = job(database, j.id)
    assert (row.status, row.error_code, row.error_message) == ("failed", "training_error", "boom")


# --- cancel ----------------------------------------------------------------------------------


def test_cancel_a_queued_job_at_once(database):
    j = add(database)
    with database.session() as s:
        cancelled = queue.request_cancel(s, j.id, "acme")
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert claim(database) is None


def test_cancel_a_running_job_through_its_heartbeat(database):
    j = add(database)
    lease = claim(database)
    with database.session() as s:
        requested = queue.request_cancel(s, j.id, "acme")
    assert requested.status == "running" and requested.cancel_requested is True
    with database.session() as s:
        assert queue.heartbeat(s, lease, 30) == queue.HeartbeatResult(alive=True, cancel_requested=True)
    with database.session() as s:
        assert queue.finish(s, lease, status="cancelled", report_final=False)
    assert job(database, j.id).status == "cancelled"


def test_cancel_leaves_final_jobs_and_other_tenants_alone(database):
    j = add(database)
    lease = claim(database)
    with database.session() as s:
        queue.finish(s, lease, status="succeeded", verdict="healthy")
    with database.session() as s:
        assert queue.request_cancel(s, j.id, "other-tenant") is None
        assert queue.request_cancel(s, "no-such-job", "acme") is None
        unchanged = queue.request_cancel(s, j.id, "acme")
    assert unchanged.status == "succeeded" and unchanged.cancel_requested is False


def test_cancel_an_external_job_at_once(database):
    j = add(database, source="external", spec=None, status="running", epochs_total=None,
            declared_layers=[{"name": "fc", "type": "linear"}])
    assert j.started_at is not None
    with database.session() as s:
        assert queue.request_cancel(s, j.id, "acme").status == "cancelled"


def test_a_cancel_requested_job_is_not_run_again(database):
    released = add(database, "released")
    lost = add(database, "lost")
    lease_released = claim(database, "w1")
    claim(database, "w2")
    with database.session() as s:
        queue.request_cancel(s, released.id, "acme")
        queue.request_cancel(s, lost.id, "acme")
    with database.session() as s:
        assert queue.release(s, lease_released)
    assert reclaim(database) == ([], [])
    assert job(database, released.id).status == "cancelled"
    assert job(database, lost.id).status == "cancelled"
    assert claim(database) is None


# --- idempotency -----------------------------------------------------------------------------


def test_idempotency_key_returns_the_original_job(database):
    first = add(database, "first", idempotency_key="k1")
    again = add(database, "again", idempotency_key="k1")
    assert again.id == first.id and again.name == "first"
    assert add(database, "other tenant", tenant="globex", idempotency_key="k1").id != first.id
    assert add(database, "other key", idempotency_key="k2").id != first.id
    assert add(database, "no key").id != add(database, "no key").id
    with database.session() as s:
        assert queue.find_idempotent(s, "acme", "k1").id == first.id
        assert queue.find_idempotent(s, "acme", "nope") is None
        assert queue.find_idempotent(s, "acme", None) is None
    with database.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 5


def test_idempotency_key_under_concurrent_submissions(database):
    ids: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def submit():
        try:
            barrier.wait()
            ids.append(add(database, idempotency_key="same").id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(ids) == 6 and len(set(ids)) == 1


# --- many workers ------------------------------------------------------------------------


def test_concurrent_claims_take_every_job_exactly_once(database):
    jobs = 50
    with database.session() as s:
        for i in range(jobs):
            queue.enqueue(s, tenant="acme", name=f"j{i}", spec=SPEC, epochs_total=1)
    claimed: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(name: str):
        try:
            barrier.wait()
            while True:
                with database.session() as s:  # each thread: its own pooled connection
                    lease = queue.claim(s, name, 30)
                if lease is None:
                    return
                claimed.append((lease.job_id, name))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    per_job = Counter(job_id for job_id, _ in claimed)
    assert len(per_job) == jobs and set(per_job.values()) == {1}
    with database.session() as s:
        rows = s.execute(select(Job.id, Job.worker_id, Job.attempt, Job.status)).all()
    owner = dict(claimed)
    assert all(r.status == "running" and r.attempt == 1 and owner[r.id] == r.worker_id for r in rows)


# --- worker registry ---------------------------------------------------------------------


def test_worker_registry(database):
    with database.session() as s:
        queue.register_worker(s, "host:1", hostname="host", pid=1)
    with database.session() as s:
        assert queue.worker_heartbeat(s, "host:1", "j")
        assert queue.worker_heartbeat(s, "ghost") is False
    with database.session() as s:
        queue.register_worker(s, "host:1", "host", 2)  # restarted: same id
    with database.session() as s:
        w = s.get(Worker, "host:1")
        assert (w.pid, w.current_job_id) == (2, None) and w.heartbeat_at.tzinfo is not None
    with database.session() as s:
        queue.unregister_worker(s, "host:1")
    with database.session() as s:
        assert s.get(Worker, "host:1") is None
