"""Tier 3: real `gradwatch serve` and `gradwatch worker` processes on loopback, killed for real."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import ROOT, start_server, start_worker, wait_for

pytestmark = pytest.mark.e2e

FINAL = {"succeeded", "failed", "cancelled"}


def slow_spec(name: str, epochs: int = 10, n_samples: int = 12000) -> dict:
    """A healthy regression run that takes a few seconds: long enough to kill a worker mid-job."""
    return {
        "name": name,
        "network": {"layers": [
            {"type": "repeat", "times": 4, "layers": [
                {"type": "linear", "out_features": 128, "init": "kaiming_normal"}, {"type": "relu"}]},
            {"type": "linear", "out_features": 1}]},
        "data": {"name": "teacher", "features": 16, "outputs": 1, "n_samples": n_samples, "seed": 1},
        "training": {"optimizer": "adam", "lr": 0.001, "batch_size": 32, "epochs": epochs, "seed": 0},
        "analysis": {"early_stop": False, "verify_remedies": 0},
    }


def quick_spec(name: str) -> dict:
    spec = slow_spec(name, epochs=3, n_samples=1500)
    return spec


def job(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()


def submit(url: str, spec: dict) -> dict:
    response = httpx.post(f"{url}/v1/jobs", json=spec, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()


def epochs_of(url: str, job_id: str) -> list[int]:
    return [r["epoch"] for r in httpx.get(f"{url}/v1/jobs/{job_id}/epochs", timeout=10).json()["items"]]


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return tmp_path


def test_readme_flow_on_sqlite_with_embedded_worker(tmp_path: Path, logs: Path) -> None:
    """The README's first command and walk-through: serve on SQLite, submit --wait, get a report."""
    env = {"GRADWATCH_DATABASE_URL": f"sqlite:///{tmp_path}/gradwatch.db"}
    server, url = start_server(env, logs, "--workers", "1")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", "submit", str(ROOT / "examples/deep-sigmoid.json"), "--wait", "--url", url],
            capture_output=True, text=True, timeout=240, cwd=ROOT,
        )
        assert "VANISHING" in done.stdout, done.stdout + done.stderr
        assert done.returncode == 3, done.stdout + done.stderr  # exit code = verdict
        items = httpx.get(f"{url}/v1/jobs", timeout=10).json()["items"]
        assert items[0]["status"] == "succeeded" and items[0]["verdict"] == "vanishing"
        report = httpx.get(f"{url}/v1/jobs/{items[0]['id']}/report", timeout=10).json()
        assert report["final"] is True and report["findings"] and report["recommendations"]
        png = httpx.get(f"{url}/v1/jobs/{items[0]['id']}/plots/gradient-flow.png", timeout=30)
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        assert server.stop() is not None


def test_serve_refuses_public_host_without_keys(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**__import__("os").environ, "GRADWATCH_DATABASE_URL": f"sqlite:///{tmp_path}/x.db", "GRADWATCH_API_KEYS": ""},
    )
    assert done.returncode == 2
    assert "no API keys" in done.stderr


@pytest.mark.postgres
def test_sigkilled_worker_job_finished_by_another_with_every_epoch_once(pg_url: str, logs: Path) -> None:
    env = {"GRADWATCH_DATABASE_URL": pg_url, "GRADWATCH_LEASE_SECONDS": "3"}
    server, url = start_server(env, logs, "--no-worker")
    first = start_worker(env, logs, "doomed")
    second = None
    try:
        job_id = submit(url, slow_spec("kill-9"))["id"]
        wait_for(lambda: job(url, job_id)["progress"]["epoch"] >= 2, timeout=120, what="two epochs on the first worker")
        first.kill_group()  # SIGKILL: no cleanup, no release; only the lease can tell
        first.popen.wait(10)
        dead_at = job(url, job_id)["progress"]["epoch"]
        second = start_worker(env, logs, "rescuer")
        final = wait_for(lambda: (j := job(url, job_id))["status"] in FINAL and j, timeout=180, what="the job to finish")
        assert final["status"] == "succeeded", final
        assert final["attempts"] == 2
        assert final["worker_id"] is None or final["worker_id"] == "rescuer"
        assert epochs_of(url, job_id) == list(range(1, 11)), f"died at epoch {dead_at}"
    finally:
        for proc in (first, second, server):
            if proc is not None:
                proc.stop()


@pytest.mark.postgres
def test_three_workers_share_twelve_jobs_no_job_run_twice(pg_url: str, logs: Path) -> None:
    env = {"GRADWATCH_DATABASE_URL": pg_url}
    server, url = start_server(env, logs, "--no-worker")
    workers = []
    try:
        ids = [submit(url, quick_spec(f"shared-{i}"))["id"] for i in range(12)]
        workers = [start_worker(env, logs, f"w{i}") for i in range(3)]
        wait_for(lambda: all(job(url, i)["status"] in FINAL for i in ids), timeout=300, what="twelve jobs")
        jobs = [job(url, i) for i in ids]
        assert all(j["status"] == "succeeded" for j in jobs), [j["status"] for j in jobs]
        assert all(j["attempts"] == 1 for j in jobs)  # claimed exactly once each: never run twice
        assert all(epochs_of(url, i) == [1, 2, 3] for i in ids)
        claims = {}
        for w in workers:
            for line in w.output().splitlines():
                if " attempt " in line and ": job " in line:
                    job_id = line.split(": job ")[1].split()[0]
                    claims.setdefault(job_id, []).append(w.log_path.name)
        assert sorted(claims) == sorted(ids) and all(len(v) == 1 for v in claims.values()), claims
        assert len({name for v in claims.values() for name in v}) >= 2, "the queue was not shared"
    finally:
        for proc in workers + [server]:
            proc.stop()


@pytest.mark.postgres
def test_sigterm_releases_the_job_to_another_worker(pg_url: str, logs: Path) -> None:
    env = {"GRADWATCH_DATABASE_URL": pg_url, "GRADWATCH_LEASE_SECONDS": "60"}
    server, url = start_server(env, logs, "--no-worker")
    first = start_worker(env, logs, "leaving")
    second = None
    try:
        job_id = submit(url, slow_spec("sigterm", epochs=6))["id"]
        wait_for(lambda: job(url, job_id)["progress"]["epoch"] >= 1, timeout=120, what="first epoch")
        first.signal(signal.SIGTERM)
        assert first.popen.wait(30) == 0
        # Released at once, not after the 60 s lease: the next worker takes it promptly.
        assert job(url, job_id)["status"] == "queued"
        second = start_worker(env, logs, "staying")
        final = wait_for(lambda: (j := job(url, job_id))["status"] in FINAL and j, timeout=120, what="the job to finish")
        assert final["status"] == "succeeded" and final["attempts"] == 2
        assert epochs_of(url, job_id) == list(range(1, 7))
    finally:
        for proc in (first, second, server):
            if proc is not None:
                proc.stop()


def test_cancel_stops_a_running_job_within_seconds(tmp_path: Path, logs: Path) -> None:
    env = {"GRADWATCH_DATABASE_URL": f"sqlite:///{tmp_path}/gradwatch.db"}
    server, url = start_server(env, logs, "--workers", "1")
    try:
        job_id = submit(url, slow_spec("to-cancel", epochs=50))["id"]
        wait_for(lambda: job(url, job_id)["status"] == "running", timeout=60, what="running")
        asked = time.monotonic()
        response = httpx.post(f"{url}/v1/jobs/{job_id}/cancel", timeout=10)
        assert response.status_code == 202
        wait_for(lambda: job(url, job_id)["status"] == "cancelled", timeout=10, interval=0.1, what="cancelled")
        # ~1 s heartbeat + one step + writing the report; slack for a loaded 2-core CI machine.
        assert time.monotonic() - asked < 6
        queued = submit(url, slow_spec("queued-cancel"))  # a second job: cancel it while queued/running
        assert httpx.post(f"{url}/v1/jobs/{queued['id']}/cancel", timeout=10).status_code == 202
        wait_for(lambda: job(url, queued["id"])["status"] == "cancelled", timeout=10, what="cancelled")
        assert json.loads(httpx.get(f"{url}/v1/jobs/{job_id}/report", timeout=10).text)["verdict"] in {"healthy", "vanishing", "exploding"}
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_schema) -> str:  # type: ignore[no-untyped-def]
    """A new empty PostgreSQL schema; `gradwatch serve` migrates it on start."""
    return postgres_schema()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the worker processes")
def test_embedded_workers_do_not_outlive_a_killed_serve(tmp_path: Path, logs: Path) -> None:
    env = {"GRADWATCH_DATABASE_URL": f"sqlite:///{tmp_path}/gradwatch.db"}
    server, _ = start_server(env, logs, "--workers", "2")
    workers = wait_for(lambda: len(kids := _children(server.pid)) == 2 and kids, timeout=30, what="two workers")
    server.popen.send_signal(signal.SIGKILL)  # serve only: no cleanup code of its own runs
    server.popen.wait(10)
    wait_for(lambda: not any(_alive(pid) for pid in workers), timeout=15, what="orphaned workers to stop")
    server.stop()
