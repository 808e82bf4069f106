"""Webhooks, abandoned external jobs, the SDK's background sender, /metrics durations and the
OpenAPI manual: unit and in-process API tests (SQLite and PostgreSQL via the `database` fixture)."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from gradwatch.client import (
    Client,
    Conflict,
    EpochsRejected,
    InvalidRequest,
    NotFound,
    ServerError,
    WebhookVerificationError,
    verify_webhook,
)
from service import external, queue, webhooks
from service.app import create_app
from service.db import Database
from service.settings import Settings
from service.tables import Job, WebhookDelivery
from service.worker import Worker
from tests.test_api import TINY, record, settings_for

HOOK = "http://127.0.0.1:9/hook"
LAYERS = [{"name": "fc1", "type": "linear"}, {"name": "fc2", "type": "linear"}]


@pytest.fixture
def client(database: Database) -> TestClient:
    with TestClient(create_app(settings_for(database), database)) as c:
        yield c


def external_job(client: TestClient, callback_url: str | None = HOOK, epochs: int = 2, **headers: str) -> str:
    body: dict[str, Any] = {"source": "external", "name": "ext", "layers": LAYERS}
    if callback_url:
        body["callback_url"] = callback_url
    job_id = client.post("/v1/jobs", json=body, headers=headers).json()["id"]
    for epoch in range(1, epochs + 1):
        assert client.post(f"/v1/jobs/{job_id}/epochs", json=record(epoch), headers=headers).status_code == 202
    return job_id


def rows(db: Database, job_id: str) -> list[WebhookDelivery]:
    with db.session() as s:
        return list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                              .order_by(WebhookDelivery.attempt)))


def fast(database: Database, **extra: Any) -> Settings:
    values: dict[str, Any] = {"webhook_backoff_base_seconds": 0.05, "webhook_poll_seconds": 0.02, **extra}
    return settings_for(database, **values)


def run_until(dispatcher: webhooks.Dispatcher, done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the dispatcher did not get there in time"
        if not dispatcher.run_once():
            time.sleep(0.01)


# --- signature --------------------------------------------------------------------------------


def test_signature_verifies_and_refuses_tampering_other_secrets_and_replays() -> None:
    body = json.dumps({"event": "job.finished", "job": {"id": "j"}, "report": None}).encode()
    now = int(time.time())
    header = webhooks.signature(body, ["whsec_a"], now)
    assert header.startswith(f"t={now},v1=") and len(header.split("v1=")[1]) == 64
    assert verify_webhook(body, header, "whsec_a")["job"]["id"] == "j"
    with pytest.raises(WebhookVerificationError, match="no v1"):
        verify_webhook(body + b" ", header, "whsec_a")
    with pytest.raises(WebhookVerificationError, match="no v1"):
        verify_webhook(body, header, "whsec_b")
    with pytest.raises(WebhookVerificationError, match="replay"):
        verify_webhook(body, webhooks.signature(body, ["whsec_a"], now - 301), "whsec_a")
    with pytest.raises(WebhookVerificationError, match="malformed"):
        verify_webhook(body, "sha256=abc", "whsec_a")
    rotated = webhooks.signature(body, ["whsec_new", "whsec_a"], now)  # during the grace period
    assert rotated.count("v1=") == 2
    verify_webhook(body, rotated, "whsec_a")
    verify_webhook(body, rotated, "whsec_new")
    # the recipe, spelled out as a receiver in another language would
    import hashlib
    import hmac

    expected = hmac.new(b"whsec_a", f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    assert header == f"t={now},v1={expected}"


def test_secret_is_per_tenant_stable_and_rotates_with_a_grace_period(database: Database) -> None:
    settings = settings_for(database, api_keys="acme:key-a,globex:key-b")
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    with TestClient(create_app(settings, database)) as c:
        assert c.get("/v1/webhook-secret").status_code == 401
        first = c.get("/v1/webhook-secret", headers=a).json()
        assert first["secret"].startswith("whsec_") and first["algorithm"] == "HMAC-SHA256"
        assert c.get("/v1/webhook-secret", headers=a).json()["secret"] == first["secret"]
        assert c.get("/v1/webhook-secret", headers=b).json()["secret"] != first["secret"]
        rotated = c.post("/v1/webhook-secret/rotate", headers=a).json()
        assert rotated["secret"] != first["secret"] and rotated["previous_secret_expires_at"]
        with database.session() as s:
            keys = webhooks.signing_secrets(webhooks.get_secret(s, "acme"))
        assert keys == [rotated["secret"], first["secret"]]  # deliveries carry both v1 for a day
        at_once = c.post("/v1/webhook-secret/rotate", params={"grace_seconds": 0}, headers=a).json()
        assert at_once["previous_secret_expires_at"] is None
        with database.session() as s:
            assert webhooks.signing_secrets(webhooks.get_secret(s, "acme")) == [at_once["secret"]]


# --- every way a job ends owes exactly one webhook ------------------------------------------------


def test_every_way_a_job_ends_owes_exactly_one_webhook(database: Database, client: TestClient) -> None:
    ended: dict[str, str] = {}
    # external: complete, cancel
    ended["complete"] = external_job(client)
    client.post(f"/v1/jobs/{ended['complete']}/complete")
    ended["external-cancel"] = external_job(client)
    client.post(f"/v1/jobs/{ended['external-cancel']}/cancel")
    # spec job cancelled while queued (queue.request_cancel)
    ended["queued-cancel"] = client.post("/v1/jobs", json={**TINY, "callback_url": HOOK}).json()["id"]
    client.post(f"/v1/jobs/{ended['queued-cancel']}/cancel")
    # reclaim_expired: a job whose worker died too often fails; one whose cancel was asked is cancelled
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    with database.session() as s:
        dead = queue.enqueue(s, tenant="default", name="dead", spec=TINY, epochs_total=2, callback_url=HOOK)
        asked = queue.enqueue(s, tenant="default", name="asked", spec=TINY, epochs_total=2, callback_url=HOOK,
                              priority=1)
        requeued = queue.enqueue(s, tenant="default", name="requeued", spec=TINY, epochs_total=2,
                                 callback_url=HOOK, priority=2)
    for _ in range(3):
        with database.session() as s:
            assert queue.claim(s, "w", 1.0) is not None
    with database.session() as s:
        queue.request_cancel(s, asked.id, "default")
        s.execute(update(Job).where(Job.id == dead.id).values(lost_leases=1))
    with database.session() as s:
        queue.reclaim_expired(s, 2, now=later)  # dead: second lost lease of 2 -> failed
    ended["max_attempts"], ended["reclaim-cancel"] = dead.id, asked.id
    assert client.get(f"/v1/jobs/{requeued.id}").json()["status"] == "queued"  # back in the queue: owes nothing
    assert rows(database, requeued.id) == []
    # release of a job whose cancel was asked (SIGTERM while cancelling)
    with database.session() as s:
        released = queue.enqueue(s, tenant="default", name="released", spec=TINY, epochs_total=2, callback_url=HOOK)
    with database.session() as s:
        lease = queue.claim(s, "w", 30.0)
        assert lease is not None and lease.job_id == released.id
        queue.request_cancel(s, released.id, "default")
    with database.session() as s:
        assert queue.release(s, lease)
    ended["release-cancel"] = released.id
    # abandoned external job
    ended["abandoned"] = external_job(client)
    with database.session() as s:
        assert external.reap_abandoned(s, 3600.0) == []
        s.execute(update(Job).where(Job.id == ended["abandoned"]).values(
            heartbeat_at=datetime.now(timezone.utc) - timedelta(hours=2)))
    with database.session() as s:
        assert external.reap_abandoned(s, 3600.0) == [ended["abandoned"]]
    # a worker finishing a spec job (queue.finish)
    ended["worker"] = client.post("/v1/jobs", json={**TINY, "callback_url": HOOK}).json()["id"]
    assert Worker(database, settings_for(database), worker_id="w-hook", threads=1).run_once()
    # no callback_url: nothing owed
    silent = external_job(client, callback_url=None)
    client.post(f"/v1/jobs/{silent}/complete")

    for how, job_id in ended.items():
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] in {"succeeded", "failed", "cancelled"}, how
        deliveries = rows(database, job_id)
        assert [(d.attempt, d.state, d.url) for d in deliveries] == [(1, "pending", HOOK)], how
        payload = json.loads(deliveries[0].payload)
        assert payload["event"] == "job.finished" and payload["job"]["id"] == job_id, how
        assert payload["job"]["status"] == job["status"] and "webhook" not in payload["job"], how
        assert job["webhook"]["status"] == "pending" and job["webhook"]["attempts"] == 0, how
        with database.session() as s:  # owing it twice adds nothing (event id is per job)
            assert webhooks.job_ended(s, job_id) is False
        assert len(rows(database, job_id)) == 1, how
    assert json.loads(rows(database, ended["worker"])[0].payload)["report"]["final"] is True
    assert json.loads(rows(database, ended["queued-cancel"])[0].payload)["report"] is None
    assert rows(database, silent) == [] and client.get(f"/v1/jobs/{silent}").json()["webhook"] is None
    assert client.get(f"/v1/jobs/{requeued.id}").json()["webhook"]["status"] == "waiting"
    assert client.get(f"/v1/jobs/{dead.id}").json()["error"]["code"] == "max_attempts"


def test_a_verified_job_sends_its_webhook_once_the_report_is_final(database: Database, client: TestClient) -> None:
    with database.session() as s:
        parent = queue.enqueue(s, tenant="default", name="p", spec=TINY, epochs_total=2, callback_url=HOOK)
    with database.session() as s:
        lease = queue.claim(s, "w", 30.0)
        queue.finish(s, lease, status="succeeded", verdict="healthy",
                     report={"verdict": "healthy", "recommendations": []}, report_final=False)
        child = queue.enqueue(s, tenant="default", name="c", spec=TINY, epochs_total=2, parent_id=parent.id)
    assert rows(database, parent.id) == []
    assert client.get(f"/v1/jobs/{parent.id}").json()["webhook"]["status"] == "waiting"
    with database.session() as s:
        s.execute(update(Job).where(Job.id == child.id).values(status="succeeded"))
    Worker(database, settings_for(database), worker_id="w")._after_child_final(child.id)
    Worker(database, settings_for(database), worker_id="w")._after_child_final(child.id)  # twice: still one
    [delivery] = rows(database, parent.id)
    assert json.loads(delivery.payload)["report"]["final"] is True


# --- the dispatcher ---------------------------------------------------------------------------------


class Receiver:
    """An httpx MockTransport receiver answering from a script (then 200)."""

    def __init__(self, script: list[int | type[Exception]] | None = None) -> None:
        self.script = list(script or [])
        self.requests: list[tuple[float, httpx.Request]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((time.monotonic(), request))
        step = self.script.pop(0) if self.script else 200
        if isinstance(step, type):
            raise step("receiver unreachable", request=request)
        return httpx.Response(step, text="" if step < 300 else "busy")


def test_dispatcher_retries_with_exponential_backoff_and_stores_every_attempt(database: Database, client: TestClient) -> None:
    job_id = external_job(client)
    client.post(f"/v1/jobs/{job_id}/complete")
    receiver = Receiver([503, httpx.ConnectError, 200])
    dispatcher = webhooks.Dispatcher(database, fast(database), transport=httpx.MockTransport(receiver))
    run_until(dispatcher, lambda: len(receiver.requests) == 3 and rows(database, job_id)[-1].state == "delivered")
    attempts = rows(database, job_id)
    assert [(a.attempt, a.state, a.status_code, a.delivered) for a in attempts] == [
        (1, "failed", 503, False), (2, "failed", None, False), (3, "delivered", 200, True)]
    assert attempts[0].error == "HTTP 503: busy" and "ConnectError" in attempts[1].error
    assert all(a.duration_ms is not None and a.sent_at is not None for a in attempts)
    for n in (1, 2):  # attempt n+1 was due base * 2**(n-1) after attempt n was sent, and not sent before
        gap = (attempts[n].next_attempt_at - attempts[n - 1].sent_at).total_seconds()
        assert gap == pytest.approx(0.05 * 2 ** (n - 1), abs=1e-3)
        assert attempts[n].sent_at >= attempts[n].next_attempt_at
    secret = client.get("/v1/webhook-secret").json()["secret"]
    ids = set()
    for n, (_, request) in enumerate(receiver.requests, start=1):
        assert request.headers["gradwatch-attempt"] == str(n)
        assert request.headers["gradwatch-event"] == "job.finished"
        assert request.headers["gradwatch-signature"].startswith(f"t={request.headers['gradwatch-timestamp']},v1=")
        payload = verify_webhook(request.content, request.headers["gradwatch-signature"], secret)
        assert payload["job"]["id"] == job_id and payload["report"]["final"] is True
        ids.add(request.headers["gradwatch-delivery"])
    assert len(ids) == 1  # one event id across retries: receivers dedupe on it
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["webhook"]["status"] == "delivered" and job["webhook"]["attempts"] == 3
    assert job["webhook"]["last_status_code"] == 200
    listed = client.get(f"/v1/jobs/{job_id}/deliveries").json()["items"]
    assert [(d["attempt"], d["status_code"], d["delivered"]) for d in listed] == [(1, 503, False), (2, None, False), (3, 200, True)]
    assert client.get("/v1/jobs").json()["items"][0]["webhook"] == job["webhook"]
    assert not dispatcher.run_once()  # nothing left to do


def test_dispatcher_gives_up_after_max_attempts(database: Database, client: TestClient) -> None:
    job_id = external_job(client)
    client.post(f"/v1/jobs/{job_id}/complete")
    receiver = Receiver([500] * 10)
    dispatcher = webhooks.Dispatcher(database, fast(database, webhook_max_attempts=3),
                                     transport=httpx.MockTransport(receiver))
    run_until(dispatcher, lambda: len(rows(database, job_id)) == 3 and rows(database, job_id)[-1].state == "failed")
    time.sleep(0.3)
    assert not dispatcher.run_once() and len(receiver.requests) == 3
    summary = client.get(f"/v1/jobs/{job_id}").json()["webhook"]
    assert summary["status"] == "failed" and summary["attempts"] == 3 and summary["last_status_code"] == 500


def test_a_retry_owed_before_a_restart_is_sent_after_it(database: Database, client: TestClient) -> None:
    job_id = external_job(client)
    client.post(f"/v1/jobs/{job_id}/complete")
    before = webhooks.Dispatcher(database, fast(database), transport=httpx.MockTransport(Receiver([502])))
    assert before.run_once()
    before.stop()  # the process goes away with attempt 2 owed
    restarted_db = Database(database.url)
    try:
        after = webhooks.Dispatcher(restarted_db, fast(database), transport=httpx.MockTransport(Receiver()))
        run_until(after, lambda: rows(database, job_id)[-1].state == "delivered")
        after.stop()
    finally:
        restarted_db.dispose()
    assert [(d.attempt, d.status_code) for d in rows(database, job_id)] == [(1, 502), (2, 200)]


def test_a_url_httpx_cannot_even_parse_is_a_failed_attempt_not_a_stuck_one(database: Database) -> None:
    with database.session() as s:
        job = queue.enqueue(s, tenant="default", name="odd", spec=TINY, epochs_total=2, callback_url="http://[::1/x")
        queue.request_cancel(s, job.id, "default")
    dispatcher = webhooks.Dispatcher(database, fast(database, webhook_max_attempts=2),
                                     transport=httpx.MockTransport(Receiver()))
    run_until(dispatcher, lambda: [d.state for d in rows(database, job.id)] == ["failed", "failed"])
    assert "InvalidURL" in rows(database, job.id)[0].error


def test_a_claimed_delivery_is_exclusive_until_its_lease_expires(database: Database, client: TestClient) -> None:
    job_id = external_job(client)
    client.post(f"/v1/jobs/{job_id}/complete")
    with database.session() as s:
        first = webhooks.claim(s, "a", 60.0)
    with database.session() as s:
        assert first is not None and webhooks.claim(s, "b", 60.0) is None
    later = datetime.now(timezone.utc) + timedelta(seconds=61)
    with database.session() as s:  # "a" died mid-send: after its lease "b" sends the same attempt
        second = webhooks.claim(s, "b", 60.0, now=later)
    assert second is not None and (second.id, second.attempt) == (first.id, 1)
    with database.session() as s:  # "a" comes back: fenced out, and it owes no retry
        assert not webhooks.record_result(s, first, status_code=500, error="HTTP 500", duration_ms=1.0,
                                          sent_at=datetime.now(timezone.utc), max_attempts=5,
                                          backoff_base=1.0, backoff_max=10.0)
    with database.session() as s:
        assert webhooks.record_result(s, second, status_code=204, error=None, duration_ms=1.0,
                                      sent_at=datetime.now(timezone.utc), max_attempts=5,
                                      backoff_base=1.0, backoff_max=10.0)
    assert [(d.attempt, d.state) for d in rows(database, job_id)] == [(1, "delivered")]


def test_dispatcher_threads_in_two_processes_worth_deliver_each_webhook_once(database: Database, client: TestClient) -> None:
    ids = []
    for _ in range(6):
        ids.append(external_job(client, epochs=1))
        client.post(f"/v1/jobs/{ids[-1]}/complete")
    receiver = Receiver()
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        with lock:
            return receiver(request)

    dispatchers = [webhooks.Dispatcher(Database(database.url), fast(database), transport=httpx.MockTransport(handler))
                   for _ in range(2)]
    for d in dispatchers:
        d.start()
    try:
        deadline = time.monotonic() + 15
        while len(receiver.requests) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        for d in dispatchers:
            d.stop()
            d.db.dispose()
    delivered = sorted(json.loads(r.content)["job"]["id"] for _, r in receiver.requests)
    assert delivered == sorted(ids)


def test_backoff_is_capped() -> None:
    assert [webhooks.backoff_seconds(n, 2.0, 600.0) for n in (1, 2, 3, 10, 20)] == [2.0, 4.0, 8.0, 600.0, 600.0]


# --- abandoned external jobs ------------------------------------------------------------------------


def test_a_silent_external_job_is_abandoned_with_a_final_report(database: Database, client: TestClient) -> None:
    job_id = external_job(client, epochs=3)
    quiet = external_job(client, epochs=1)
    two_hours_ago = datetime.now(timezone.utc) - timedelta(hours=2)
    with database.session() as s:
        s.execute(update(Job).where(Job.id.in_([job_id, quiet])).values(heartbeat_at=two_hours_ago))
    assert client.post(f"/v1/jobs/{quiet}/heartbeat").status_code == 202  # "still training a long epoch"
    dispatcher = webhooks.Dispatcher(database, settings_for(database, external_abandon_seconds=3600))
    assert dispatcher.reap_abandoned() == [job_id]
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "abandoned"
    assert "3 epoch(s)" in job["error"]["message"] and job["verdict"] in {"healthy", "vanishing", "exploding"}
    report = client.get(f"/v1/jobs/{job_id}/report").json()
    assert report["final"] is True and report["verdict"] == job["verdict"]
    late = client.post(f"/v1/jobs/{job_id}/epochs", json=record(4))
    assert late.status_code == 409
    assert client.post(f"/v1/jobs/{job_id}/heartbeat").status_code == 409
    assert client.get(f"/v1/jobs/{quiet}").json()["status"] == "running"
    assert client.post("/v1/jobs", json=TINY).status_code == 202
    spec_job = client.get("/v1/jobs", params={"status": "queued"}).json()["items"][0]["id"]
    assert client.post(f"/v1/jobs/{spec_job}/heartbeat").status_code == 409


def test_deliveries_of_another_tenants_job_are_404(database: Database) -> None:
    settings = settings_for(database, api_keys="acme:key-a,globex:key-b")
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    with TestClient(create_app(settings, database)) as c:
        job_id = external_job(c, **a)
        assert c.get(f"/v1/jobs/{job_id}/deliveries", headers=a).json() == {"items": []}
        assert c.get(f"/v1/jobs/{job_id}/deliveries", headers=b).status_code == 404
        assert c.post(f"/v1/jobs/{job_id}/heartbeat", headers=b).status_code == 404


def test_external_callback_url_must_be_http(client: TestClient) -> None:
    bad = client.post("/v1/jobs", json={"source": "external", "name": "e", "layers": LAYERS,
                                        "callback_url": "ftp://example.com/x"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["pointer"] == "/callback_url"


# --- /metrics and /docs --------------------------------------------------------------------------------


def test_metrics_show_job_epoch_and_webhook_durations(database: Database, client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json={**TINY, "callback_url": HOOK}).json()["id"]
    assert Worker(database, settings_for(database), worker_id="w-metrics", threads=1).run_once()
    ext = external_job(client)
    client.post(f"/v1/jobs/{ext}/complete")
    webhooks.Dispatcher(database, fast(database), transport=httpx.MockTransport(Receiver([500]))).run_once()
    text = client.get("/metrics").text
    assert 'gradwatch_job_duration_seconds_count{source="spec",status="succeeded"} 1.0' in text
    assert 'gradwatch_job_duration_seconds_count{source="external",status="succeeded"} 1.0' in text
    assert 'gradwatch_job_duration_seconds_bucket{le="+Inf",source="spec",status="succeeded"} 1.0' in text
    assert "gradwatch_job_queue_wait_seconds_count 1.0" in text
    assert 'gradwatch_epoch_duration_recent_seconds{quantile="0.5"}' in text  # TINY has 2 epochs: one gap
    assert "gradwatch_epochs_recent 1.0" in text
    assert 'gradwatch_webhook_deliveries{state="failed"} 1.0' in text
    assert 'gradwatch_webhook_deliveries{state="pending"} 2.0' in text  # the retry and the external job's
    assert "gradwatch_webhook_delivery_duration_seconds_count 1.0" in text
    assert "gradwatch_webhook_oldest_pending_age_seconds" in text
    assert 'gradwatch_jobs{status="succeeded"} 2.0' in text and "gradwatch_queue_depth 0.0" in text
    assert job_id


def test_openapi_is_a_manual_every_operation_has_summary_description_and_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operations = [(path, method, op) for path, ops in spec["paths"].items() for method, op in ops.items()]
    assert len(operations) >= 16
    for path, method, op in operations:
        where = f"{method.upper()} {path}"
        assert op.get("summary"), where
        assert len(op.get("description") or "") >= 40, where
        if not (path.startswith("/v1/") or path in ("/healthz", "/readyz", "/metrics")):
            continue  # HTML pages and the like: a summary and a description are enough
        ok = [c for code, r in op["responses"].items() if code.startswith("2") for c in (r.get("content") or {}).values()]
        assert any("example" in c or "examples" in c for c in ok), f"{where}: no success example"
        body = (op.get("requestBody") or {}).get("content", {}).get("application/json")
        if body is not None:
            assert body.get("examples") or body.get("example"), f"{where}: no request example"
    for path in ("/v1/jobs/{job_id}/deliveries", "/v1/webhook-secret", "/v1/webhook-secret/rotate",
                 "/v1/jobs/{job_id}/heartbeat"):
        assert path in spec["paths"], path
    assert "Gradwatch-Signature" in spec["paths"]["/v1/jobs"]["post"]["description"]
    assert client.get("/docs").status_code == 200


# --- the SDK's background sender -------------------------------------------------------------------------


class FakeServer:
    """Enough of the API for ExternalRun, as an httpx MockTransport: epochs stored by number."""

    def __init__(self) -> None:
        self.down = False
        self.status = "running"
        self.epochs: dict[int, dict[str, Any]] = {}
        self.posts: list[Any] = []
        self.heartbeats = 0
        self.refuse_epoch: int | None = None
        self.lock = threading.Lock()

    def problem(self, status: int, detail: str, **extra: Any) -> httpx.Response:
        return httpx.Response(status, json={"title": "refused", "status": status, "detail": detail, **extra},
                              headers={"content-type": "application/problem+json"})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            if self.down:
                raise httpx.ConnectError("connection refused", request=request)
            path = request.url.path
            job = {"id": "job-1", "name": "r", "source": "external", "status": self.status,
                   "progress": {"epoch": max(self.epochs, default=0), "epochs": None}}
            if request.method == "POST" and path == "/v1/jobs":
                return httpx.Response(201, json=job)
            if path.endswith("/epochs"):
                if self.status != "running":
                    return self.problem(409, f"The job is {self.status}; it takes no more epochs.")
                body = json.loads(request.content)
                items = body if isinstance(body, list) else [body]
                self.posts.append(body)
                for i, item in enumerate(items):
                    if item["epoch"] == self.refuse_epoch:
                        return self.problem(422, f"/{i}/loss: bad", errors=[{"pointer": f"/{i}/loss", "detail": "bad"}])
                for item in items:
                    self.epochs[item["epoch"]] = item
                return httpx.Response(202, json={"accepted": len(items), "job": job})
            if path.endswith("/heartbeat"):
                self.heartbeats += 1
                return httpx.Response(202, json=job)
            if path.endswith("/complete"):
                if self.status == "running":
                    self.status = "succeeded"
                return httpx.Response(200, json={**job, "status": self.status})
            if path.endswith("/missing"):
                return self.problem(404, "No such job.")
            return self.problem(500, "unexpected")


def sdk(server: FakeServer, **options: Any):  # type: ignore[no-untyped-def]
    client = Client("http://gradwatch.test", transport=httpx.MockTransport(server))
    return client.start_external("r", layers=LAYERS, max_backoff=0.05, **options)


def test_sdk_buffers_while_the_server_is_away_and_delivers_every_epoch_once() -> None:
    server = FakeServer()
    run = sdk(server)
    server.down = True
    started = time.perf_counter()
    for epoch in range(1, 21):
        run.log_epoch(record(epoch))
    assert time.perf_counter() - started < 0.5  # training never waits for the network
    time.sleep(0.3)
    assert run.pending == 20 and run.retries >= 2 and isinstance(run.last_error, httpx.ConnectError)
    assert run.flush(timeout=0.2) is False
    server.down = False
    job = run.complete(timeout=10)
    assert job["status"] == "succeeded" and sorted(server.epochs) == list(range(1, 21))
    assert any(isinstance(p, list) and len(p) > 1 for p in server.posts)  # the backlog went in batches
    assert run.delivered == 20 and run.pending == 0 and not run.rejected


def test_sdk_surfaces_a_refused_record_and_keeps_the_good_ones() -> None:
    server = FakeServer()
    server.refuse_epoch = 3
    run = sdk(server)
    server.down = True
    for epoch in range(1, 6):
        run.log_epoch(record(epoch))
    server.down = False  # the five go as one batch: 422, then one by one
    with pytest.raises(EpochsRejected) as caught:
        run.complete(timeout=10)
    assert sorted(server.epochs) == [1, 2, 4, 5]
    assert [epochs for epochs, _ in caught.value.rejected] == [[3]]
    assert isinstance(caught.value.rejected[0][1], InvalidRequest) and "epoch(s) [3]" in str(caught.value)
    assert caught.value.job is not None and caught.value.job["status"] == "succeeded"
    assert isinstance(run.last_error, InvalidRequest)


def test_sdk_surfaces_a_job_that_ended_on_the_server() -> None:
    server = FakeServer()
    run = sdk(server)
    run.log_epoch(record(1))
    assert run.flush(timeout=5)
    server.status = "failed"  # e.g. abandoned, or cancelled from the UI
    run.log_epoch(record(2))
    run.log_epoch(record(3))
    assert run.flush(timeout=5)
    assert isinstance(run.last_error, Conflict)
    with pytest.raises(EpochsRejected, match=r"\[2, 3\]"):
        run.complete(timeout=5)
    assert run.complete(timeout=5, strict=False)["status"] == "failed"


def test_sdk_heartbeats_an_idle_run_and_never_raises_from_log_epoch() -> None:
    server = FakeServer()
    run = sdk(server, heartbeat_seconds=0.05)
    time.sleep(0.4)
    assert server.heartbeats >= 2
    run.log_epoch(None)  # type: ignore[arg-type]  # not even this breaks training
    assert run.last_error is not None and run.pending == 0
    run.complete(timeout=5)


def test_sdk_errors_are_typed_by_status() -> None:
    server = FakeServer()
    client = Client("http://gradwatch.test", transport=httpx.MockTransport(server))
    with pytest.raises(NotFound):
        client.request("GET", "/v1/jobs/x/missing")
    with pytest.raises(ServerError):
        client.request("GET", "/v1/elsewhere")
    server.down = True
    with pytest.raises(httpx.ConnectError):
        client.job("job-1")
