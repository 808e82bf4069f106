"""HTTP client for a gradwatch server (httpx + the standard library only).

    from gradwatch import Client, Probe
    client = Client("http://127.0.0.1:8000", api_key=None)
    run = client.start_external("my-run", probe)
    ...
    run.log_epoch(probe.end_epoch(epoch))      # returns at once, never raises
    run.complete()                             # flushes, then the final report is computed
    print(run.report()["verdict"])

`ExternalRun.log_epoch` never slows or breaks training: records go to a background thread that
sends them in order (batched when several wait), retries with exponential backoff and keeps them
in memory while the server is away (a restart loses nothing: posts are idempotent on (job,
epoch)); it also heartbeats the run while an epoch is long, so the server does not take it as
abandoned. A record the server refuses for good (409 job ended, 422 malformed) is never retried
and never silently dropped: it lands in `run.rejected` and `run.last_error`, and `complete()`
raises `EpochsRejected` after completing the job.

Errors: every refusal by the server is a `GradwatchError` (status, RFC 9457 `problem`), of a
subclass by status: `InvalidRequest` (400/422), `Unauthorized` (401/403), `NotFound` (404),
`Conflict` (409), `ServerError` (5xx). Network failures are httpx's own (`httpx.HTTPError`,
e.g. `httpx.ConnectError`, `httpx.TimeoutException`).
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import hmac
import json
import logging
import math
import threading
import time
import weakref
from typing import Any, Callable, Literal, Mapping, TypedDict

import httpx

FINAL = frozenset({"succeeded", "failed", "cancelled"})
log = logging.getLogger("gradwatch.client")

# --- typed results (plain dicts at run time: JSON as the server sent it) ------------------------

Verdict = Literal["vanishing", "exploding", "healthy"]
Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Progress(TypedDict):
    epoch: int
    epochs: int | None


class JobError(TypedDict):
    code: str
    message: str


class WebhookSummary(TypedDict, total=False):
    url: str
    status: Literal["waiting", "pending", "sending", "retrying", "delivered", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    last_attempt_at: str | None
    next_attempt_at: str | None
    delivered_at: str | None


class Job(TypedDict, total=False):
    id: str
    name: str
    source: Literal["spec", "external"]
    status: Status
    progress: Progress
    verdict: Verdict | None
    parent_id: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: JobError | None
    spec: dict[str, Any] | None
    report_final: bool
    callback_url: str | None
    webhook: WebhookSummary | None


class Finding(TypedDict, total=False):
    kind: str
    severity: str
    layers: list[str]
    epochs: list[int]
    evidence: dict[str, Any]
    message: str


class Recommendation(TypedDict, total=False):
    id: str
    priority: int
    title: str
    rationale: str
    addresses: list[str]
    patch: list[dict[str, Any]] | None
    verification: dict[str, Any] | None


class Report(TypedDict, total=False):
    job_id: str
    final: bool
    verdict: Verdict
    confidence: float
    summary: str
    findings: list[Finding]
    layers: list[dict[str, Any]]
    recommendations: list[Recommendation]


class Delivery(TypedDict, total=False):
    id: int
    delivery_id: str
    event: str
    attempt: int
    url: str
    state: Literal["pending", "sending", "delivered", "failed"]
    delivered: bool
    status_code: int | None
    error: str | None
    duration_ms: float | None
    created_at: str
    next_attempt_at: str
    sent_at: str | None


# --- errors ------------------------------------------------------------------------------------


class GradwatchError(Exception):
    """The server refused a request. `problem` is its RFC 9457 body (status, detail, errors)."""

    def __init__(self, status: int, problem: Mapping[str, Any]):
        self.status = status
        self.problem = dict(problem)
        errors = problem.get("errors") or []
        where = "; ".join(f"{e.get('pointer')}: {e.get('detail')}" for e in errors[:5])
        super().__init__(f"{status} {problem.get('title', 'error')}: {problem.get('detail', '')}" + (f" [{where}]" if where and where not in str(problem.get("detail")) else ""))


class InvalidRequest(GradwatchError):
    """400/422: the request (a spec, an epoch record) is malformed; `problem["errors"]` names the fields."""


class Unauthorized(GradwatchError):
    """401/403: no valid API key (or, without keys configured, not a loopback client)."""


class NotFound(GradwatchError):
    """404: no such job (or a job of another tenant)."""


class Conflict(GradwatchError):
    """409: the job is in the wrong state (it ended already, or it is not an external job)."""


class ServerError(GradwatchError):
    """5xx: the server failed; retrying later may work."""


class JobFailed(GradwatchError):
    """`wait()` ended on a job that failed or was cancelled."""


class EpochsRejected(GradwatchError):
    """The server refused some epoch records for good (`rejected`: [(epochs, error)]).
    Raised by `ExternalRun.complete()` after the job was completed on what was accepted."""

    def __init__(self, job_id: str, rejected: list[tuple[list[int], GradwatchError]], job: Mapping[str, Any] | None = None):
        self.rejected = list(rejected)
        self.job = dict(job) if job is not None else None
        epochs = sorted({e for group, _ in self.rejected for e in group})
        first = self.rejected[0][1] if self.rejected else None
        super().__init__(first.status if first else 0, {
            "title": "epoch records rejected",
            "detail": f"job {job_id}: the server refused epoch(s) {epochs}; first reason: {first}",
        })


class WebhookVerificationError(ValueError):
    """A webhook's signature or timestamp does not verify: refuse the request."""


_BY_STATUS: dict[int, type[GradwatchError]] = {400: InvalidRequest, 422: InvalidRequest, 401: Unauthorized,
                                               403: Unauthorized, 404: NotFound, 409: Conflict}


def _error_for(status: int, problem: Mapping[str, Any]) -> GradwatchError:
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else GradwatchError)
    return cls(status, problem)


def _json_safe(value: Any) -> Any:
    """NaN/Inf -> None: JSON has no NaN, and the contract sends non-finite numbers as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _job_id(job: str | Mapping[str, Any]) -> str:
    return job if isinstance(job, str) else str(job["id"])


# --- webhooks ----------------------------------------------------------------------------------


def verify_webhook(body: bytes | str, signature_header: str, secret: str | list[str], *,
                   tolerance: float = 300.0, now: float | None = None) -> dict[str, Any]:
    """Check a gradwatch webhook and return its parsed JSON payload.

    `body`: the raw request body, exactly as received; `signature_header`: the value of
    `Gradwatch-Signature` (`t=<unix>,v1=<hex>[,v1=<hex>]`); `secret`: from `GET
    /v1/webhook-secret` (or a list, while you switch after a rotation). Raises
    WebhookVerificationError when no `v1` matches HMAC-SHA256(secret, f"{t}.{body}") or when `t`
    is more than `tolerance` seconds away from now (a replay)."""
    raw = body.encode() if isinstance(body, str) else bytes(body)
    timestamp: int | None = None
    candidates: list[str] = []
    for part in (signature_header or "").split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise WebhookVerificationError("the signature's timestamp is not an integer") from None
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise WebhookVerificationError("malformed Gradwatch-Signature: expected t=<unix>,v1=<hex>")
    age = (time.time() if now is None else now) - timestamp
    if abs(age) > tolerance:
        raise WebhookVerificationError(f"the signature is {age:.0f} s old (tolerance {tolerance:g} s): a replay?")
    signed = f"{timestamp}.".encode() + raw
    for key in [secret] if isinstance(secret, str) else list(secret):
        expected = hmac.new(key.encode(), signed, hashlib.sha256).hexdigest()
        if any(hmac.compare_digest(expected, c) for c in candidates):
            return json.loads(raw)
    raise WebhookVerificationError("no v1 signature matches this secret")


# --- the client --------------------------------------------------------------------------------


class Client:
    """A gradwatch server. `timeout`: seconds for any one request (httpx.TimeoutException)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: float = 30.0, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; a 4xx/5xx answer raises the GradwatchError subclass for its status."""
        if "json" in kwargs:
            kwargs["content"] = json.dumps(_json_safe(kwargs.pop("json")), allow_nan=False)
            kwargs.setdefault("headers", {})["Content-Type"] = "application/json"
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"title": response.reason_phrase, "detail": response.text[:500]}
            if not isinstance(problem, dict):
                problem = {"title": response.reason_phrase, "detail": str(problem)[:500]}
            raise _error_for(response.status_code, problem)
        return response

    # -- jobs ----------------------------------------------------------------------------
    def submit(self, spec: Mapping[str, Any], *, idempotency_key: str | None = None,
               callback_url: str | None = None) -> Job:
        """Submit a spec job (or an external one); `callback_url` gets the report when it ends."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = dict(spec)
        if callback_url is not None:
            body["callback_url"] = callback_url
        return self.request("POST", "/v1/jobs", json=body, headers=headers).json()

    def job(self, job: str | Mapping[str, Any]) -> Job:
        return self.request("GET", f"/v1/jobs/{_job_id(job)}").json()

    def jobs(self, *, status: str | None = None, limit: int = 50) -> list[Job]:
        params = {"limit": limit, **({"status": status} if status else {})}
        return self.request("GET", "/v1/jobs", params=params).json()["items"]

    def cancel(self, job: str | Mapping[str, Any]) -> Job:
        return self.request("POST", f"/v1/jobs/{_job_id(job)}/cancel").json()

    def epochs(self, job: str | Mapping[str, Any]) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/jobs/{_job_id(job)}/epochs").json()["items"]

    def report(self, job: str | Mapping[str, Any]) -> Report:
        return self.request("GET", f"/v1/jobs/{_job_id(job)}/report").json()

    def deliveries(self, job: str | Mapping[str, Any]) -> list[Delivery]:
        """Every webhook delivery attempt of the job, oldest first."""
        return self.request("GET", f"/v1/jobs/{_job_id(job)}/deliveries").json()["items"]

    def webhook_secret(self) -> str:
        """This tenant's webhook signing secret (for `verify_webhook`)."""
        return self.request("GET", "/v1/webhook-secret").json()["secret"]

    def rotate_webhook_secret(self, grace_seconds: float | None = None) -> str:
        params = {} if grace_seconds is None else {"grace_seconds": grace_seconds}
        return self.request("POST", "/v1/webhook-secret/rotate", params=params).json()["secret"]

    def wait(self, job: str | Mapping[str, Any], *, on_progress: Callable[[dict[str, Any]], None] | None = None,
             poll: float = 0.5, timeout: float | None = None, final_report: bool = True) -> Job:
        """Poll until the job is final (and, with verify_remedies, its report too); returns the job.
        Raises JobFailed for a failed or cancelled job, TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            current = self.job(job)
            if on_progress is not None:
                on_progress(current)  # type: ignore[arg-type]
            if current["status"] in FINAL and (not final_report or current.get("report_final", True)
                                               or current["status"] != "succeeded"):
                if current["status"] != "succeeded":
                    raise JobFailed(409, {"title": f"job {current['status']}",
                                          "detail": (current.get("error") or {}).get("message", current["status"])})
                return current
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {current['id']} still {current['status']} after {timeout} s")
            time.sleep(poll)

    # -- external runs ------------------------------------------------------------------
    def start_external(self, name: str, probe: Any = None, *, layers: list[dict[str, str]] | None = None,
                       epochs: int | None = None, idempotency_key: str | None = None,
                       callback_url: str | None = None, **run_options: Any) -> "ExternalRun":
        """Open an external job for a run trained elsewhere; `probe` gives the layer list.
        `run_options` go to ExternalRun (max_buffer, batch_size, max_backoff, send_timeout, ...)."""
        layers = layers if layers is not None else list(probe.layers)
        body: dict[str, Any] = {"source": "external", "name": name, "layers": layers}
        if epochs is not None:
            body["epochs"] = epochs
        job = self.submit(body, idempotency_key=idempotency_key, callback_url=callback_url)
        return ExternalRun(self, job, **run_options)


_RETRYABLE = frozenset({408, 425, 429})
_OPEN_RUNS: "weakref.WeakSet[ExternalRun]" = weakref.WeakSet()


class ExternalRun:
    """Handle of an external job. `log_epoch()` enqueues and returns at once; a background
    thread delivers.

    - `max_buffer`: records kept while the server is away; beyond it new records are dropped
      (counted in `dropped`, logged once) rather than growing memory without bound.
    - `batch_size`: records sent in one POST when several wait (after an outage).
    - `max_backoff`: longest wait between two retries (they start at 0.25 s and double): a
      restarted server gets the backlog at most this long after it is back.
    - `send_timeout`: seconds for one POST.
    - `heartbeat_seconds`: while nothing is sent for this long, tell the server the run is alive.
    Counters: `delivered`, `retries`, `dropped`, `pending`; `rejected`: [(epochs, GradwatchError)];
    `last_error`: the latest failure, transient (httpx error, 5xx) or final (4xx).
    """

    def __init__(self, client: Client, job: Mapping[str, Any], *, max_backoff: float = 5.0, max_buffer: int = 10_000,
                 batch_size: int = 50, send_timeout: float = 10.0, heartbeat_seconds: float = 60.0) -> None:
        self.client = client
        self.job: Job = dict(job)  # type: ignore[assignment]
        self.id: str = job["id"]
        self.max_backoff = max_backoff
        self.max_buffer = max_buffer
        self.batch_size = max(1, batch_size)
        self.send_timeout = send_timeout
        self.heartbeat_seconds = heartbeat_seconds
        self.last_error: Exception | None = None
        self.rejected: list[tuple[list[int], GradwatchError]] = []
        self.delivered = 0
        self.retries = 0
        self.dropped = 0
        self._buffer: collections.deque[dict[str, Any]] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._ended_remotely: GradwatchError | None = None  # 409/404/401: nothing more will be accepted
        self._last_contact = time.monotonic()
        self._sender = threading.Thread(target=self._send_loop, daemon=True, name=f"gradwatch-{self.id[:8]}")
        self._sender.start()
        _OPEN_RUNS.add(self)

    # -- the training side: never blocks, never raises -------------------------------------
    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """Queue one epoch record (from `Probe.end_epoch`) for delivery; returns at once."""
        try:
            # A shallow copy (the records Probe returns are fresh each epoch); NaN/Inf become null
            # on the sender thread, so the training thread pays next to nothing.
            item = dict(record)
            with self._cond:
                if self._closing:
                    log.warning("gradwatch run %s: log_epoch after complete()/close(); record dropped", self.id)
                    self.dropped += 1
                    return
                if len(self._buffer) >= self.max_buffer:
                    if not self.dropped:
                        log.warning("gradwatch run %s: %d records wait for the server; dropping new ones",
                                    self.id, self.max_buffer)
                    self.dropped += 1
                    return
                self._buffer.append(item)
                self._cond.notify_all()
        except Exception as exc:  # a record that cannot even be copied must not stop training
            self.last_error = exc
            log.warning("gradwatch run %s: could not queue a record: %r", self.id, exc)

    @property
    def pending(self) -> int:
        """Records logged but not delivered (nor refused) yet."""
        with self._cond:
            return len(self._buffer)

    # -- the sender thread -----------------------------------------------------------------
    def _send_loop(self) -> None:
        first_delay = min(0.25, self.max_backoff)
        delay = first_delay
        while True:
            with self._cond:
                while not self._buffer and not self._closing:
                    if self._ended_remotely is not None:
                        self._cond.wait()  # nothing to heartbeat any more: wake on a record or close
                        continue
                    idle = time.monotonic() - self._last_contact
                    if idle >= self.heartbeat_seconds:
                        break
                    self._cond.wait(timeout=self.heartbeat_seconds - idle)
                if self._closing and not self._buffer:
                    return
                # Peek: records leave the buffer only once settled, so flush() waits for them.
                batch = [self._buffer[i] for i in range(min(self.batch_size, len(self._buffer)))]
            if not batch:
                self._heartbeat()
                continue
            settled = self._deliver(batch)
            with self._cond:
                for _ in range(settled):
                    self._buffer.popleft()
                self._cond.notify_all()
            if settled:
                delay = first_delay
                continue
            self.retries += 1
            with self._cond:  # back off, but wake at once on close so complete() is prompt to retry
                self._cond.wait(timeout=delay)
            delay = min(delay * 2, self.max_backoff)

    def _deliver(self, batch: list[dict[str, Any]]) -> int:
        """POST `batch`; returns how many leading records are settled (delivered or refused for
        good); 0 means a transient failure: retry the same batch later."""
        if self._ended_remotely is not None:
            self._refuse(batch, self._ended_remotely)
            return len(batch)
        body: Any = batch[0] if len(batch) == 1 else batch
        try:
            self.client.request("POST", f"/v1/jobs/{self.id}/epochs", json=body, timeout=self.send_timeout)
        except GradwatchError as exc:
            self.last_error = exc
            if exc.status >= 500 or exc.status in _RETRYABLE:
                return 0
            if exc.status == 422 and len(batch) > 1:
                # Which record is bad? Send them one by one so the good ones are kept.
                settled = 0
                for record in batch:
                    if not self._deliver([record]):
                        break  # a transient failure: the rest waits for the retry
                    settled += 1
                return settled
            if exc.status in (401, 403, 404, 409):
                self._ended_remotely = exc  # job ended (or gone, or our key is): nothing will be accepted
            self._refuse(batch, exc)
            return len(batch)
        except httpx.HTTPError as exc:  # server away, timeout: keep the records, retry
            self.last_error = exc
            return 0
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the thread silently
            self.last_error = exc
            log.exception("gradwatch run %s: unexpected error while sending", self.id)
            return 0
        self._last_contact = time.monotonic()
        self.delivered += len(batch)
        return len(batch)

    def _refuse(self, batch: list[dict[str, Any]], exc: GradwatchError) -> None:
        epochs = [int(r["epoch"]) for r in batch if isinstance(r.get("epoch"), (int, float))]
        self.rejected.append((epochs, exc))
        log.warning("gradwatch run %s: the server refused epoch(s) %s: %s", self.id, epochs, exc)

    def _heartbeat(self) -> None:
        self._last_contact = time.monotonic()  # also when it fails: try again a period later
        try:
            self.client.request("POST", f"/v1/jobs/{self.id}/heartbeat", timeout=self.send_timeout)
        except GradwatchError as exc:
            if exc.status in (404, 409):
                self._ended_remotely = exc
            self.last_error = exc
        except httpx.HTTPError as exc:
            self.last_error = exc

    # -- ending ----------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every logged record is delivered or refused (True), or `timeout` passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()
            while self._buffer:
                if not self._sender.is_alive():
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(timeout=0.1 if left is None else min(0.1, left))
            return True

    def complete(self, timeout: float | None = None, *, strict: bool = True) -> Job:
        """Deliver what is buffered (waiting for the server to come back if it is away), then
        complete the job: the server computes the final report. Raises TimeoutError if the
        records could not all be delivered within `timeout` (they stay buffered: call again),
        and, with `strict`, EpochsRejected after completing if the server refused any record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.flush(timeout):
            raise TimeoutError(f"{self.pending} epoch record(s) of job {self.id} not delivered within "
                               f"{timeout} s; last error: {self.last_error}")
        delay = 0.25
        while True:
            try:
                self.job = self.client.request("POST", f"/v1/jobs/{self.id}/complete", timeout=self.send_timeout).json()
                break
            except GradwatchError as exc:
                if exc.status < 500 and exc.status not in _RETRYABLE:
                    raise
                self.last_error = exc
            except httpx.HTTPError as exc:
                self.last_error = exc
            if deadline is not None and time.monotonic() + delay > deadline:
                raise TimeoutError(f"job {self.id} could not be completed within {timeout} s: {self.last_error}")
            time.sleep(delay)
            delay = min(delay * 2, self.max_backoff)
        self._close_sender()
        if strict and self.rejected:
            raise EpochsRejected(self.id, self.rejected, self.job)
        return self.job

    def close(self, timeout: float | None = 10.0) -> bool:
        """Stop the sender after trying to deliver what is buffered (without completing the job).
        True when nothing was left undelivered."""
        flushed = self.flush(timeout)
        self._close_sender()
        return flushed

    def _close_sender(self) -> None:
        with self._cond:
            self._closing = True
            if self._buffer and not self._sender.is_alive():
                self._buffer.clear()
            self._cond.notify_all()
        _OPEN_RUNS.discard(self)

    def report(self) -> Report:
        return self.client.report(self.id)

    def __enter__(self) -> "ExternalRun":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Completes the job; if training raised, delivers what arrived and cancels it instead
        (its report is final on those epochs)."""
        if exc_type is None:
            self.complete()
            return
        self.close(timeout=10.0)
        try:
            self.job = self.client.cancel(self.id)
        except (GradwatchError, httpx.HTTPError) as error:
            log.warning("gradwatch run %s: could not cancel after %s: %s", self.id, exc_type.__name__, error)


def _flush_open_runs() -> None:
    """At interpreter exit, give open runs a few seconds to deliver what they buffered."""
    for run in list(_OPEN_RUNS):
        if run.pending:
            run.flush(timeout=5.0)


atexit.register(_flush_open_runs)
