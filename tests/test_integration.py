"""Issue 5, done when: the SDK example loop against a real `gradwatch serve` on loopback gets the
right verdicts while the server is stopped and restarted mid-run (no epoch lost or duplicated),
and webhook receivers on loopback get a correctly signed report, the one failing twice on the
third try. Real subprocesses (tests/procs.py), loopback only, every wait bounded."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from gradwatch.client import verify_webhook
from tests.procs import ROOT, free_port, start_server, wait_for

pytestmark = pytest.mark.e2e


class Receiver:
    """A webhook receiver on 127.0.0.1 answering from a script of status codes (then 200)."""

    def __init__(self, script: list[int] | None = None) -> None:
        self.script = list(script or [])
        self.hits: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status = outer.script.pop(0) if outer.script else 200
                outer.hits.append({"at": time.monotonic(), "headers": dict(self.headers), "body": body, "answered": status})
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/gradwatch"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Example:
    """examples/sdk_training_loop.py as a subprocess, its output followed line by line."""

    def __init__(self, url: str, kind: str, epochs: int, log: Path) -> None:
        self.log = log
        self._out = open(log, "wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.popen = subprocess.Popen(
            [sys.executable, str(ROOT / "examples/sdk_training_loop.py"), "--url", url, "--kind", kind,
             "--epochs", str(epochs)], cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def logged(self) -> int:
        return max([int(m) for m in re.findall(r"^epoch (\d+) logged", self.text(), re.M)] or [0])

    def finish(self, timeout: float) -> str:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise AssertionError(f"the example did not finish:\n{self.text()}") from None
        finally:
            self._out.close()
        assert self.popen.returncode == 0, self.text()
        return self.text()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


def epochs_of(url: str, job_id: str) -> list[int]:
    return [r["epoch"] for r in httpx.get(f"{url}/v1/jobs/{job_id}/epochs", timeout=10).json()["items"]]


class Served:
    """One `gradwatch serve --no-worker` on a fixed loopback port for the module (a server start
    costs seconds); a test may stop and restart it (`restart`)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {"GRADWATCH_DATABASE_URL": f"sqlite:///{tmp}/gradwatch.db",
                    "GRADWATCH_WEBHOOK_BACKOFF_BASE_SECONDS": "0.5", "GRADWATCH_WEBHOOK_POLL_SECONDS": "0.2"}
        self.port = free_port()
        self.proc, self.url = start_server(self.env, tmp, "--no-worker", port=self.port)

    def restart(self) -> None:
        self.proc, url = start_server(self.env, self.tmp, "--no-worker", port=self.port)
        assert url == self.url


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    s = Served(tmp_path_factory.mktemp("served"))
    yield s
    s.proc.stop()


def test_sdk_example_gets_the_right_verdicts_through_a_server_restart(served: Served, tmp_path: Path) -> None:
    url = served.url
    runs: dict[str, Example] = {}
    epochs = {"vanishing": 20, "exploding": 10}  # the vanishing run trains on through the outage
    t0 = time.monotonic()
    try:
        for kind, n in epochs.items():
            runs[kind] = Example(url, kind, n, tmp_path / f"{kind}.log")
        wait_for(lambda: runs["vanishing"].logged() >= 2, timeout=120, what="two epochs of the vanishing run")
        t_stop = time.monotonic()
        served.proc.stop()  # SIGTERM; training goes on, records pile up in the SDK
        stopped_at = {kind: run.logged() for kind, run in runs.items()}
        served.restart()  # same port, same database; ready after a few seconds
        t_up = time.monotonic()
        logged_while_down = runs["vanishing"].logged() - stopped_at["vanishing"]
        outputs = {kind: run.finish(timeout=180) for kind, run in runs.items()}
        print(f"\nepochs logged when the server stopped: {stopped_at}, {logged_while_down} more by the vanishing "
              f"run while it was down; first two epochs after {t_stop - t0:.1f} s, server down {t_up - t_stop:.1f} s, "
              f"runs done {time.monotonic() - t_up:.1f} s after the restart")
        jobs = {j["name"]: j for j in httpx.get(f"{url}/v1/jobs", timeout=10).json()["items"] if j["name"].startswith("sdk-")}
        for kind, n in epochs.items():
            job = jobs[f"sdk-{kind}"]
            assert f"job {job['id']}: {kind}" in outputs[kind], outputs[kind]
            assert job["status"] == "succeeded" and job["verdict"] == kind, job
            assert job["progress"] == {"epoch": n, "epochs": n}
            assert epochs_of(url, job["id"]) == list(range(1, n + 1)), f"{kind}: an epoch was lost or duplicated"
            report = httpx.get(f"{url}/v1/jobs/{job['id']}/report", timeout=10).json()
            assert report["final"] is True and report["verdict"] == kind
        retried = int(re.search(r"(\d+) failed send\(s\) retried", outputs["vanishing"]).group(1))
        assert retried >= 1, "the vanishing run never met the server down: the restart proved nothing"
        assert logged_while_down >= 1 or "completing" in outputs["vanishing"]
    finally:
        for run in runs.values():
            run.kill()
        if served.proc.popen.poll() is not None:  # stopped and not restarted: leave one for the others
            served.restart()


def test_webhooks_are_signed_and_a_receiver_failing_twice_gets_the_third_try(served: Served) -> None:
    good, flaky = Receiver(), Receiver([500, 503])
    http = httpx.Client(base_url=served.url, timeout=10)  # --no-worker: webhooks go out from `serve` itself
    try:
        secret = http.get("/v1/webhook-secret").json()["secret"]
        record = {"epoch": 1, "loss": 0.7, "metrics": {"accuracy": 0.5}, "layers": [
            {"name": "fc1", "type": "linear", "grad_norm": {"mean": 1e-9, "min": 1e-9, "max": 1e-9, "last": 1e-9},
             "weight_norm": 1.0}, {"name": "fc2", "type": "linear",
                                   "grad_norm": {"mean": 0.1, "min": 0.1, "max": 0.1, "last": 0.1}, "weight_norm": 1.0}]}
        jobs = {}
        for name, receiver in (("good", good), ("flaky", flaky)):
            job = http.post("/v1/jobs", json={"source": "external", "name": name, "callback_url": receiver.url,
                                              "layers": [{"name": "fc1", "type": "linear"}, {"name": "fc2", "type": "linear"}]}).json()
            assert http.post(f"/v1/jobs/{job['id']}/epochs", json=[record, {**record, "epoch": 2}]).status_code == 202
            jobs[name] = job["id"]
        ended = {}
        for name, job_id in jobs.items():
            ended[name] = time.monotonic()
            done = http.post(f"/v1/jobs/{job_id}/complete").json()
            assert done["status"] == "succeeded" and done["webhook"]["status"] in {"pending", "sending", "delivered"}

        wait_for(lambda: len(good.hits) >= 1, timeout=15, interval=0.05, what="the webhook")
        hit = good.hits[0]
        payload = verify_webhook(hit["body"], hit["headers"]["Gradwatch-Signature"], secret)
        assert hit["headers"]["Gradwatch-Timestamp"] == hit["headers"]["Gradwatch-Signature"].split(",")[0][2:]
        assert payload["event"] == "job.finished" and payload["job"]["id"] == jobs["good"]
        assert payload["job"]["status"] == "succeeded" and payload["report"]["final"] is True
        assert payload["report"] == http.get(f"/v1/jobs/{jobs['good']}/report").json()
        latency = hit["at"] - ended["good"]

        wait_for(lambda: len(flaky.hits) >= 3, timeout=30, interval=0.05, what="the third try")
        assert [h["answered"] for h in flaky.hits] == [500, 503, 200]
        assert [h["headers"]["Gradwatch-Attempt"] for h in flaky.hits] == ["1", "2", "3"]
        assert len({h["headers"]["Gradwatch-Delivery"] for h in flaky.hits}) == 1
        for h in flaky.hits:  # each attempt is signed afresh (its own timestamp)
            assert verify_webhook(h["body"], h["headers"]["Gradwatch-Signature"], secret)["job"]["id"] == jobs["flaky"]
        gaps = [b["at"] - a["at"] for a, b in zip(flaky.hits, flaky.hits[1:])]
        assert gaps[0] >= 0.5 - 0.05 and gaps[1] >= 1.0 - 0.05, gaps  # backoff 0.5 s, then 1 s
        assert gaps[1] < 6, gaps
        deliveries = wait_for(lambda: (d := http.get(f"/v1/jobs/{jobs['flaky']}/deliveries").json()["items"])
                              and d[-1]["delivered"] and d, timeout=10, what="the stored attempts")
        assert [(d["attempt"], d["status_code"], d["delivered"]) for d in deliveries] == [
            (1, 500, False), (2, 503, False), (3, 200, True)]
        summary = http.get(f"/v1/jobs/{jobs['flaky']}").json()["webhook"]
        assert summary["status"] == "delivered" and summary["attempts"] == 3
        metrics = http.get("/metrics").text
        assert re.search(r'gradwatch_webhook_deliveries\{state="delivered"\} [1-9]', metrics)
        assert re.search(r'gradwatch_webhook_deliveries\{state="failed"\} [1-9]', metrics)
        print(f"webhook latency after complete: {latency * 1000:.0f} ms; retry gaps: "
              + ", ".join(f"{g:.2f} s" for g in gaps))
    finally:
        http.close()
        good.close()
        flaky.close()
