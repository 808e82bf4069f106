"""HTTP client for a gradwatch server (httpx + the standard library only).

`ExternalRun.log_epoch` never slows or breaks training: records go to a background thread that
sends them in order, retries with exponential backoff and buffers while the server is away;
`complete()` flushes the buffer, then asks for the final report.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from typing import Any, Callable, Mapping

import httpx

FINAL = frozenset({"succeeded", "failed", "cancelled"})


class GradwatchError(Exception):
    """The server refused a request. `problem` is its RFC 9457 body (status, detail, errors)."""

    def __init__(self, status: int, problem: Mapping[str, Any]):
        self.status = status
        self.problem = dict(problem)
        errors = problem.get("errors") or []
        where = "; ".join(f"{e.get('pointer')}: {e.get('detail')}" for e in errors[:5])
        super().__init__(f"{status} {problem.get('title', 'error')}: {problem.get('detail', '')}" + (f" [{where}]" if where and where not in str(problem.get("detail")) else ""))


class JobFailed(GradwatchError):
    """`wait()` ended on a job that failed or was cancelled."""


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


class Client:
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
        if "json" in kwargs:
            kwargs["content"] = json.dumps(_json_safe(kwargs.pop("json")), allow_nan=False)
            kwargs.setdefault("headers", {})["Content-Type"] = "application/json"
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"title": response.reason_phrase, "detail": response.text[:500]}
            raise GradwatchError(response.status_code, problem)
        return response

    # -- jobs ----------------------------------------------------------------------------
    def submit(self, spec: Mapping[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/v1/jobs", json=dict(spec), headers=headers).json()

    def job(self, job: str | Mapping[str, Any]) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{_job_id(job)}").json()

    def jobs(self, *, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        params = {"limit": limit, **({"status": status} if status else {})}
        return self.request("GET", "/v1/jobs", params=params).json()["items"]

    def cancel(self, job: str | Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{_job_id(job)}/cancel").json()

    def epochs(self, job: str | Mapping[str, Any]) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/jobs/{_job_id(job)}/epochs").json()["items"]

    def report(self, job: str | Mapping[str, Any]) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{_job_id(job)}/report").json()

    def wait(self, job: str | Mapping[str, Any], *, on_progress: Callable[[dict[str, Any]], None] | None = None,
             poll: float = 0.5, timeout: float | None = None, final_report: bool = True) -> dict[str, Any]:
        """Poll until the job is final (and, with verify_remedies, its report too); returns the job.
        Raises JobFailed for a failed or cancelled job, TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            current = self.job(job)
            if on_progress is not None:
                on_progress(current)
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
                       epochs: int | None = None, idempotency_key: str | None = None) -> "ExternalRun":
        """Open an external job for a run trained elsewhere; `probe` gives the layer list."""
        layers = layers if layers is not None else list(probe.layers)
        body: dict[str, Any] = {"source": "external", "name": name, "layers": layers}
        if epochs is not None:
            body["epochs"] = epochs
        job = self.submit(body, idempotency_key=idempotency_key)
        return ExternalRun(self, job)


class ExternalRun:
    """Handle of an external job. log_epoch() enqueues and returns at once."""

    def __init__(self, client: Client, job: dict[str, Any], *, max_backoff: float = 30.0) -> None:
        self.client = client
        self.job = job
        self.id = job["id"]
        self.max_backoff = max_backoff
        self.last_error: Exception | None = None
        self._pending: "queue.Queue[dict[str, Any] | None]" = queue.Queue()
        self._sender = threading.Thread(target=self._send_loop, daemon=True, name=f"gradwatch-{self.id[:8]}")
        self._sender.start()

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        self._pending.put(_json_safe(dict(record)))

    def _send_loop(self) -> None:
        while True:
            record = self._pending.get()
            if record is None:
                self._pending.task_done()
                return
            delay = 0.25
            while True:
                try:
                    self.client.request("POST", f"/v1/jobs/{self.id}/epochs", json=record)
                    self.last_error = None
                    break
                except GradwatchError as exc:
                    if exc.status < 500 and exc.status not in (408, 429):
                        self.last_error = exc  # the server refused this record for good
                        break
                    self.last_error = exc
                except httpx.HTTPError as exc:  # server away: keep the record and retry
                    self.last_error = exc
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
            self._pending.task_done()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every logged epoch was delivered (True) or `timeout` passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pending.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def complete(self, timeout: float | None = None) -> dict[str, Any]:
        if not self.flush(timeout):
            raise TimeoutError(f"epochs of job {self.id} not delivered within {timeout} s: {self.last_error}")
        self._pending.put(None)
        self.job = self.client.request("POST", f"/v1/jobs/{self.id}/complete").json()
        return self.job

    def report(self) -> dict[str, Any]:
        return self.client.report(self.id)
