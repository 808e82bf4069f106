"""Tier 3: the HTML pages in headless Chromium (Debian's `chromium`, driven by Playwright)
against a real `gradwatch serve` + `gradwatch worker` with API keys configured.

The page of a queued job follows it by itself until the verdict appears; the verdict is shown
in words; every image loads. Screenshots go to $GRADWATCH_SCREENSHOTS (default: the test's tmp
dir); `GRADWATCH_SCREENSHOTS=docs/img` refreshes the ones in the repository.

Skipped only outside CI when Chromium or Playwright is missing; under CI=true that is a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import start_server, start_worker, wait_for
from tests.test_pages import HEALTHY, VANISHING

pytestmark = pytest.mark.e2e

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "browser-test-key-0123456789"
FINAL = {"succeeded", "failed", "cancelled"}


def chromium_path() -> str:
    found = os.environ.get("GRADWATCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "the playwright Python package is not installed (pip install -e '.[dev]')"
    if problem is None and not Path(found).exists():
        problem = "Chromium is not installed (apt-get install -y chromium)"
    if problem:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"browser test cannot run under CI: {problem}", pytrace=False)
        pytest.skip(problem)
    return found


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    target = Path(os.environ.get("GRADWATCH_SCREENSHOTS") or tmp_path / "screenshots")
    target.mkdir(parents=True, exist_ok=True)
    return target


def images_loaded(page: Any) -> list[tuple[str, bool, int]]:
    page.wait_for_load_state("networkidle")
    page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=30_000)
    return page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.id, i.complete, i.naturalWidth])")


def test_job_pages_in_chromium(tmp_path: Path, shots: Path) -> None:
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    env = {"GRADWATCH_DATABASE_URL": f"sqlite:///{tmp_path}/gradwatch.db", "GRADWATCH_API_KEYS": f"demo:{KEY}"}
    server, url = start_server(env, tmp_path, "--no-worker")
    worker = None
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        vanishing = httpx.post(f"{url}/v1/jobs", json=VANISHING, headers=auth, timeout=30).json()["id"]
        healthy = httpx.post(f"{url}/v1/jobs", json=HEALTHY, headers=auth, timeout=30).json()["id"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                # Without a key: a page that says how to give one.
                denied = page.goto(f"{url}/jobs/{vanishing}")
                assert denied is not None and denied.status == 401
                assert "needs an API key" in page.inner_text("h1")
                # ?key= once: redirected to the clean address, the key now in an HttpOnly cookie.
                page.goto(f"{url}/jobs/{vanishing}?key={KEY}")
                assert page.url == f"{url}/jobs/{vanishing}"
                assert page.inner_text("#status") == "queued" and "No verdict yet" in page.inner_text("#verdict")
                # A worker arrives; the open page follows the job by itself to its verdict.
                worker = start_worker(env, tmp_path, "browser")
                page.wait_for_selector('#verdict[data-verdict="vanishing"]', timeout=120_000)
                page.wait_for_selector('#status.succeeded', timeout=120_000)
                assert "Vanishing gradients" in page.inner_text("#verdict")
                assert page.locator(".finding.decisive").count() >= 1
                assert page.locator("pre.diff .add").count() >= 1 and page.locator("pre.diff .del").count() >= 1
                loaded = images_loaded(page)
                assert {i[0] for i in loaded} >= {"plot-gradient-flow", "plot-loss"}
                assert all(complete and width > 0 for _, complete, width in loaded), loaded
                page.screenshot(path=str(shots / "page-vanishing.png"), full_page=True)
                page.locator("#plot-gradient-flow").screenshot(path=str(shots / "page-vanishing-gradient-flow.png"))

                wait_for(lambda: httpx.get(f"{url}/v1/jobs/{healthy}", headers=auth, timeout=10).json()["status"] in FINAL,
                         timeout=120, what="the healthy job")
                page.goto(f"{url}/jobs/{healthy}")
                assert "Healthy" in page.inner_text("#verdict")
                assert all(complete and width > 0 for _, complete, width in images_loaded(page))
                page.screenshot(path=str(shots / "page-healthy.png"), full_page=True)

                page.goto(f"{url}/jobs")
                rows = page.locator("table#jobs tbody tr")
                assert rows.count() == 2
                assert page.locator("table#jobs .badge.vanishing").count() == 1
                assert page.locator("table#jobs .badge.healthy").count() == 1
                page.screenshot(path=str(shots / "page-jobs.png"), full_page=True)

                # The JSON links work from the browser too (the cookie authorises GETs).
                page.goto(f"{url}/v1/jobs/{vanishing}/report")
                assert '"verdict":"vanishing"' in page.content().replace(" ", "")
            finally:
                browser.close()
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
