"""`gradwatch submit/report/jobs` against an in-process server (TestClient transport) with a
real worker on a thread: output a person reads, and exit codes a script can use."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from gradwatch.client import Client
from service import cli
from service.app import create_app
from service.db import Database, upgrade
from service.settings import Settings
from service.worker import Worker
from tests.test_pages import HEALTHY, VANISHING

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('cli') / 'gradwatch.db'}"
    upgrade(url)
    db = Database(url)
    settings = Settings(database_url=url)
    stop = threading.Event()
    worker = Worker(db, settings, worker_id="w-cli", threads=1)

    def work() -> None:
        while not stop.is_set():
            if not worker.run_once():
                stop.wait(0.1)

    thread = threading.Thread(target=work, daemon=True)
    with TestClient(create_app(settings, db)) as http:
        thread.start()
        yield {"http": http, "db": db}
        stop.set()
        thread.join(30)
    db.dispose()


@pytest.fixture
def run(server: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    http: TestClient = server["http"]
    monkeypatch.setattr(cli, "_client", lambda url, key: Client("http://testserver", key, transport=http._transport))
    runner = CliRunner()

    def invoke(*args: str, spec: dict | None = None):  # type: ignore[no-untyped-def]
        argv = list(args)
        if spec is not None:
            path = tmp_path / f"{spec.get('name', 'spec')}.json"
            path.write_text(json.dumps(spec))
            argv.insert(1, str(path))
        return runner.invoke(cli.app, argv, catch_exceptions=False)

    return invoke


def test_submit_wait_vanishing_shows_progress_then_a_readable_report_and_exits_3(run) -> None:  # type: ignore[no-untyped-def]
    result = run("submit", "--wait", spec=VANISHING)
    assert result.exit_code == 3, result.output
    out, progress = result.stdout, result.stderr
    # Progress (not a terminal here: one line per epoch): epoch, loss, verdict so far.
    assert re.search(r"tiny-init-page: epoch [123]/3  loss \d", progress), progress
    assert re.search(r"verdict( so far)?: vanishing", progress), progress
    assert "VANISHING" in out and "Why (the findings that decided it)" in out and "vanishing gradients" in out
    assert "What to do (best first)" in out and "1. " in out
    assert "patch:" in out and "→" in out  # e.g. `/network/.../init: {"name": "normal", ...} → {...}`
    assert "/jobs/" in out  # the page with the pictures


def external_job(http: TestClient, name: str, records: list[dict[str, Any]]) -> str:
    job = http.post("/v1/jobs", json={"source": "external", "name": name,
                                      "layers": [{"name": "fc1", "type": "linear"}, {"name": "fc2", "type": "linear"}]}).json()
    assert http.post(f"/v1/jobs/{job['id']}/epochs", json=records).status_code == 202
    assert http.post(f"/v1/jobs/{job['id']}/complete").status_code == 200
    return job["id"]


def epoch(n: int, loss: float | None, grads: tuple[float | None, float | None]) -> dict[str, Any]:
    def layer(name: str, g: float | None) -> dict[str, Any]:
        return {"name": name, "type": "linear", "grad_norm": {"mean": g, "min": g, "max": g, "last": g},
                "grad_max_abs": g, "weight_norm": 1.0, "update_ratio": 0.01,
                "nonfinite_grads": 0 if g is not None else 5, "activation": None}
    return {"epoch": n, "loss": loss, "metrics": {}, "nonfinite": loss is None,
            "layers": [layer("fc1", grads[0]), layer("fc2", grads[1])]}


def test_exit_code_is_the_verdict_healthy_0_exploding_4(run, server: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    http: TestClient = server["http"]
    healthy = external_job(http, "fine", [epoch(n, 1.0 / n, (0.2, 0.3)) for n in range(1, 6)])
    result = run("report", healthy)
    assert result.exit_code == 0 and "HEALTHY" in result.stdout, result.output
    exploding = external_job(http, "diverged", [epoch(1, 2.3, (50.0, 80.0)), epoch(2, 1e6, (1e8, 1e9)), epoch(3, None, (None, None))])
    result = run("report", exploding)
    assert result.exit_code == 4 and "EXPLODING" in result.stdout, result.output


def test_refused_spec_and_bad_file_exit_2(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = {**HEALTHY, "network": {"layers": [{"type": "linear", "out_features": 0}]}}
    refused = run("submit", "--wait", spec=bad)
    assert refused.exit_code == 2 and "/network/layers/0/out_features" in refused.stderr
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert run("submit", str(broken)).exit_code == 2
    assert run("submit", str(tmp_path / "missing.json")).exit_code == 2  # typer: no such file


def test_report_json_and_jobs_table(run, server: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    http: TestClient = server["http"]
    submitted = run("submit", "--json", spec={**HEALTHY, "name": "listed"})
    assert submitted.exit_code == 0
    job_id = json.loads(submitted.stdout)["id"]
    Client("http://testserver", transport=http._transport).wait(job_id, poll=0.1, timeout=120)
    as_json = run("report", job_id, "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["verdict"] == "healthy"
    readable = run("report", job_id)
    assert readable.exit_code == 0 and "HEALTHY" in readable.stdout
    table = run("jobs", "--limit", "50")
    assert table.exit_code == 0 and job_id in table.stdout and "listed" in table.stdout
    assert run("report", "no-such-job").exit_code == 1


def test_cancelled_job_exits_5(run, server: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    http: TestClient = server["http"]
    ext = http.post("/v1/jobs", json={"source": "external", "name": "to-cancel",
                                      "layers": [{"name": "fc", "type": "linear"}]}).json()
    assert http.post(f"/v1/jobs/{ext['id']}/cancel").status_code == 202
    result = run("report", ext["id"])
    assert result.exit_code == 5 and "cancelled" in result.stderr


def test_report_of_a_running_job_exits_6_not_a_verdict(run, server: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    http: TestClient = server["http"]
    ext = http.post("/v1/jobs", json={"source": "external", "name": "still-running",
                                      "layers": [{"name": "fc", "type": "linear"}]}).json()
    result = run("report", ext["id"])
    assert result.exit_code == 6 and "partial" in result.stdout


class FakeClient:
    """Replays a running job: three polls while it trains, then the final state."""

    def __init__(self) -> None:
        self.states = [(1, "running", 2.3, "vanishing"), (2, "running", 2.31, "vanishing"),
                       (3, "succeeded", 2.32, "vanishing")]
        self.now = 0

    def epochs(self, job: Any) -> list[dict[str, Any]]:
        epoch, _, loss, _ = self.states[self.now]
        return [{"epoch": e, "loss": loss, "nonfinite": False} for e in range(1, epoch + 1)]

    def report(self, job: Any) -> dict[str, Any]:
        return {"verdict": self.states[self.now][3], "final": False}

    def wait(self, job: Any, *, on_progress: Any, poll: float) -> dict[str, Any]:
        for self.now, (epoch, status, _, _) in enumerate(self.states):
            current = {**job, "status": status, "progress": {"epoch": epoch, "epochs": 10}, "report_final": True}
            on_progress(current)
        return current


def test_progress_lines_show_epoch_loss_and_the_verdict_so_far(capsys: pytest.CaptureFixture[str]) -> None:
    done = cli._follow(FakeClient(), {"id": "j", "name": "net", "source": "spec", "status": "queued",
                                      "progress": {"epoch": 0, "epochs": 10}})
    assert done["status"] == "succeeded"
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "net: epoch 1/10  loss 2.3  verdict so far: vanishing  (running)",
        "net: epoch 2/10  loss 2.31  verdict so far: vanishing  (running)",
        "net: epoch 3/10  loss 2.32  verdict: vanishing  (succeeded, stopped early: the verdict was certain)",
    ]
