"""The HTML pages (/jobs, /jobs/{id}) and the plot endpoints, in-process on SQLite: content,
tenant rules (header, ?key= -> HttpOnly cookie, another tenant's job = 404), caching."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service import plots
from service.app import create_app
from service.db import Database, upgrade
from service.settings import Settings
from service.worker import Worker

VANISHING = {
    "name": "tiny-init-page",
    "network": {"layers": [
        {"type": "repeat", "times": 10, "layers": [
            {"type": "linear", "out_features": 32, "init": {"name": "normal", "std": 0.01}}, {"type": "tanh"}]},
        {"type": "linear", "out_features": 1}]},
    "data": {"name": "teacher", "features": 8, "outputs": 1, "n_samples": 300, "seed": 0},
    "training": {"optimizer": "sgd", "lr": 0.05, "batch_size": 32, "epochs": 3, "seed": 0},
}
HEALTHY = {
    "name": "healthy-page",
    "network": {"layers": [{"type": "linear", "out_features": 16}, {"type": "relu"}, {"type": "linear", "out_features": 3}]},
    "data": {"name": "blobs", "features": 4, "classes": 3, "n_samples": 120, "seed": 0},
    "training": {"optimizer": "adam", "lr": 0.01, "batch_size": 32, "epochs": 2, "seed": 0},
}
KEYS = "alice:key-alice-0123456789,bob:key-bob-0123456789"


def rnn_record(epoch: int) -> dict[str, Any]:
    grad = {"mean": 0.3, "min": 0.2, "max": 0.4, "last": 0.3}
    return {"epoch": epoch, "loss": 0.2, "metrics": {}, "nonfinite": False,
            "layers": [{"name": "rnn", "type": "rnn", "grad_norm": grad, "grad_max_abs": 0.1, "weight_norm": 1.0,
                        "update_ratio": 0.01, "nonfinite_grads": 0, "activation": None}],
            "temporal": {"layer": "rnn", "wrt": "hidden", "grad_norm_by_step": [10.0 ** (t - 12) for t in range(12)]}}


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path_factory.mktemp('pages') / 'gradwatch.db'}"
    upgrade(url)
    database = Database(url)
    yield database
    database.dispose()


def settings(db: Database, **extra: Any) -> Settings:
    return Settings(database_url=db.engine.url.render_as_string(hide_password=False), **extra)


@pytest.fixture(scope="module")
def open_client(db: Database) -> Iterator[TestClient]:
    with TestClient(create_app(settings(db), db)) as client:
        yield client


@pytest.fixture(scope="module")
def jobs(open_client: TestClient, db: Database) -> dict[str, str]:
    """Three finished jobs (two trained for real, one external RNN) and one still queued."""
    ids = {name: open_client.post("/v1/jobs", json=spec).json()["id"] for name, spec in
           (("vanishing", VANISHING), ("healthy", HEALTHY))}
    worker = Worker(db, settings(db), worker_id="w-pages", threads=1)
    while worker.run_once():
        pass
    ext = open_client.post("/v1/jobs", json={"source": "external", "name": "my-rnn",
                                             "layers": [{"name": "rnn", "type": "lstm"}]}).json()
    open_client.post(f"/v1/jobs/{ext['id']}/epochs", json=[rnn_record(1), rnn_record(2)])
    open_client.post(f"/v1/jobs/{ext['id']}/complete")
    ids["rnn"] = ext["id"]
    ids["queued"] = open_client.post("/v1/jobs", json={**HEALTHY, "name": "waiting"}).json()["id"]
    return ids


def test_job_page_shows_verdict_findings_diffs_plots_and_json_links(open_client: TestClient, jobs: dict[str, str]) -> None:
    job_id = jobs["vanishing"]
    assert open_client.get(f"/v1/jobs/{job_id}").json()["verdict"] == "vanishing"
    page = open_client.get(f"/jobs/{job_id}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "Vanishing gradients" in html and 'data-verdict="vanishing"' in html
    assert "decided the verdict" in html and "vanishing gradients" in html  # the deciding finding
    assert "Recommendations" in html and 'class="diff"' in html
    # The patch shown as a diff of the spec: removed and added lines of spec.json.
    assert re.search(r'<span class="del">-\s+&#34;', html) and re.search(r'<span class="add">\+\s+&#34;', html)
    assert "--- spec.json" in html and "+++ spec.json (patched)" in html
    for plot in ("gradient-flow", "loss"):
        assert f"/v1/jobs/{job_id}/plots/{plot}.png" in html
        png = open_client.get(f"/v1/jobs/{job_id}/plots/{plot}.png")
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert "temporal.png" not in html  # no recurrent layer
    for link in ("", "/report", "/epochs"):
        assert f'href="/v1/jobs/{job_id}{link}"' in html
    assert "<script>" not in html  # final: nothing to poll


def test_healthy_page_and_recurrent_page(open_client: TestClient, jobs: dict[str, str]) -> None:
    html = open_client.get(f"/jobs/{jobs['healthy']}").text
    assert "Healthy" in html and 'data-verdict="healthy"' in html
    rnn = open_client.get(f"/jobs/{jobs['rnn']}").text
    assert f"/v1/jobs/{jobs['rnn']}/plots/temporal.png" in rnn
    png = open_client.get(f"/v1/jobs/{jobs['rnn']}/plots/temporal.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    missing = open_client.get(f"/v1/jobs/{jobs['healthy']}/plots/temporal.png")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("application/problem+json")


def test_queued_job_page_polls_and_list_page_refreshes(open_client: TestClient, jobs: dict[str, str]) -> None:
    html = open_client.get(f"/jobs/{jobs['queued']}").text
    assert "No verdict yet" in html and "<script>" in html and f'"/v1/jobs/" + id' in html
    assert 'http-equiv="refresh"' in html  # inside <noscript>
    listing = open_client.get("/jobs").text
    assert all(f'href="/jobs/{i}"' in listing for i in jobs.values())
    assert 'http-equiv="refresh"' in listing  # a job is still queued
    assert 'class="badge vanishing"' in listing and 'class="badge healthy"' in listing
    only = open_client.get("/jobs?status=queued").text
    assert f'href="/jobs/{jobs["queued"]}"' in only and f'href="/jobs/{jobs["vanishing"]}"' not in only
    assert open_client.get("/", follow_redirects=False).headers["location"] == "/jobs"


def test_unknown_job_page_is_an_html_404(open_client: TestClient, jobs: dict[str, str]) -> None:
    page = open_client.get("/jobs/not-a-job")
    assert page.status_code == 404 and "No such job" in page.text and page.headers["content-type"].startswith("text/html")


def test_final_plots_are_cached_with_an_etag(open_client: TestClient, jobs: dict[str, str]) -> None:
    plots.cache.clear()
    url = f"/v1/jobs/{jobs['healthy']}/plots/loss.png"
    first = open_client.get(url)
    again = open_client.get(url)
    assert first.content == again.content and plots.cache.hits == 1 and plots.cache.misses == 1
    assert "max-age" in first.headers["cache-control"] and first.headers["etag"]
    assert open_client.get(url, headers={"If-None-Match": first.headers["etag"]}).status_code == 304
    running = open_client.get(f"/v1/jobs/{jobs['queued']}/plots/gradient-flow.png")
    assert running.status_code == 200 and running.headers["cache-control"] == "no-store"


@pytest.fixture(scope="module")
def keyed(db: Database) -> Iterator[TestClient]:
    with TestClient(create_app(settings(db, api_keys=KEYS), db)) as client:
        yield client


def test_pages_follow_the_api_tenant_rules(keyed: TestClient) -> None:
    alice = {"Authorization": "Bearer key-alice-0123456789"}
    job = keyed.post("/v1/jobs", json={"source": "external", "name": "alice-run",
                                       "layers": [{"name": "fc", "type": "linear"}]}, headers=alice).json()
    keyed.cookies.clear()
    # No key: an HTML 401 that tells a person what to do.
    denied = keyed.get(f"/jobs/{job['id']}")
    assert denied.status_code == 401 and "?key=" in denied.text and denied.headers["content-type"].startswith("text/html")
    assert keyed.get("/jobs").status_code == 401
    assert keyed.get(f"/v1/jobs/{job['id']}/plots/gradient-flow.png").status_code == 401
    # The header works as for the API.
    assert keyed.get(f"/jobs/{job['id']}", headers=alice).status_code == 200
    # A wrong ?key= is refused and sets nothing.
    wrong = keyed.get(f"/jobs/{job['id']}?key=nope", follow_redirects=False)
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    # ?key= sets an HttpOnly cookie and redirects to the address without the key.
    login = keyed.get(f"/jobs/{job['id']}?key=key-alice-0123456789", follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == f"/jobs/{job['id']}"
    cookie = login.headers["set-cookie"].lower()
    assert "gradwatch_key=" in cookie and "httponly" in cookie and "samesite=lax" in cookie
    # The cookie now opens the page, its images and the JSON links (GET only)...
    assert keyed.get(f"/jobs/{job['id']}").status_code == 200
    assert "alice-run" in keyed.get("/jobs").text
    assert keyed.get(f"/v1/jobs/{job['id']}/plots/loss.png").status_code == 200
    assert keyed.get(f"/v1/jobs/{job['id']}/report").status_code == 200
    # ...but never authorises a write (no CSRF through the cookie).
    assert keyed.post(f"/v1/jobs/{job['id']}/cancel").status_code == 401
    # Another tenant's job is a 404, on the page and on the API, exactly like a missing one.
    bob_job = keyed.post("/v1/jobs", json={"source": "external", "name": "bob-run",
                                           "layers": [{"name": "fc", "type": "linear"}]},
                         headers={"Authorization": "Bearer key-bob-0123456789"}).json()
    assert keyed.get(f"/jobs/{bob_job['id']}").status_code == 404
    assert keyed.get(f"/v1/jobs/{bob_job['id']}/plots/gradient-flow.png").status_code == 404
    assert "bob-run" not in keyed.get("/jobs").text
    # Logging out forgets the key.
    keyed.get("/jobs/logout")
    assert keyed.get(f"/jobs/{job['id']}").status_code == 401


def test_templates_ship_with_the_package() -> None:
    root = Path(__file__).resolve().parent.parent
    assert {p.name for p in (root / "service/templates").glob("*.html")} >= {"base.html", "job.html", "jobs.html", "error.html"}
    assert "templates/*.html" in (root / "pyproject.toml").read_text()


def test_names_and_messages_are_escaped(open_client: TestClient) -> None:
    job = open_client.post("/v1/jobs", json={"source": "external", "name": "<script>alert(1)</script>",
                                             "layers": [{"name": "<b>fc</b>", "type": "linear"}]}).json()
    for path in (f"/jobs/{job['id']}", "/jobs"):
        html = open_client.get(path).text
        assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
