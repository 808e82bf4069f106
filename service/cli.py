"""`gradwatch` command line: serve, worker, migrate, submit, report, jobs, keys.

Exit codes a script can use: 0 ok (healthy), 1 error, 2 bad usage or refused spec,
3 verdict vanishing, 4 verdict exploding, 5 the job failed or was cancelled.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.settings import get_settings

app = typer.Typer(help="gradwatch: are my gradients vanishing or exploding, where, why, and what fixes it?",
                  no_args_is_help=True, add_completion=False)
keys_app = typer.Typer(help="Manage API keys (stored hashed).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console()
err = Console(stderr=True)

EXIT_VERDICT = {"healthy": 0, "vanishing": 3, "exploding": 4}
UrlOpt = Annotated[str, typer.Option("--url", envvar="GRADWATCH_URL", help="Server URL.")]
KeyOpt = Annotated[Optional[str], typer.Option("--api-key", envvar="GRADWATCH_API_KEY", help="API key.")]


def _logging() -> None:
    logging.basicConfig(level=os.environ.get("GRADWATCH_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def migrate() -> None:
    """Apply database migrations (alembic upgrade head)."""
    from service.db import upgrade

    settings = get_settings()
    upgrade(settings.database_url)
    console.print(f"database at [bold]{_redact(settings.database_url)}[/] is up to date")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _keys_configured(settings: Any) -> bool:
    from sqlalchemy import func, select

    from service.db import Database
    from service.tables import ApiKey

    if settings.api_keys.strip():
        return True
    with Database(settings.database_url).session() as session:
        return bool(session.scalar(select(func.count()).select_from(ApiKey)))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Embedded worker processes.")] = 1,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="API only; run `gradwatch worker` elsewhere.")] = False,
) -> None:
    """Start the API plus N embedded worker processes; migrations are applied first."""
    import uvicorn

    from service.auth import is_loopback
    from service.db import upgrade

    _logging()
    settings = get_settings()
    upgrade(settings.database_url)
    if not is_loopback(host) and not _keys_configured(settings):
        err.print(f"[red]refusing to bind {host}:[/] no API keys are configured, so anyone who reaches "
                  "this address could use the service. Set GRADWATCH_API_KEYS=tenant:key or run "
                  "`gradwatch keys create --tenant NAME`, or bind 127.0.0.1.")
        raise typer.Exit(2)
    count = 0 if no_worker else workers
    pool = WorkerPool(count)
    pool.start()
    try:
        uvicorn.run("service.main:app", host=host, port=port, log_level="info")
    finally:
        pool.stop()


class WorkerPool:
    """Embedded workers as child processes (training never runs in the API process, so a
    crash there cannot take the API down); a worker that dies is restarted."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stopping = threading.Event()

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "GRADWATCH_WORKERS_ON_MACHINE": str(self.count)}
        return subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], env=env)

    def start(self) -> None:
        self.procs = [self._spawn() for _ in range(self.count)]
        if self.count:
            threading.Thread(target=self._watch, daemon=True, name="worker-watch").start()

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None and not self._stopping.is_set():
                    logging.getLogger("gradwatch").warning("worker pid %s exited (%s); restarting", proc.pid, proc.returncode)
                    self.procs[i] = self._spawn()

    def stop(self, timeout: float = 20.0) -> None:
        self._stopping.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()  # SIGTERM: the worker releases its job
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()


@app.command()
def worker(
    threads: Annotated[Optional[int], typer.Option(help="Torch threads (default: cores / workers on this machine).")] = None,
    worker_id: Annotated[Optional[str], typer.Option("--id", help="Worker id (default: host-pid-random).")] = None,
) -> None:
    """Run one standalone worker; any number of them, on any machines, share the queue."""
    from service.worker import run_worker

    _logging()
    run_worker(get_settings(), threads=threads, worker_id=worker_id)


@keys_app.command("create")
def keys_create(tenant: Annotated[str, typer.Option(help="Tenant the key belongs to.")]) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    from service.auth import create_key
    from service.db import Database, upgrade

    settings = get_settings()
    upgrade(settings.database_url)
    with Database(settings.database_url).session() as session:
        key = create_key(session, tenant)
    console.print(f"API key for tenant [bold]{tenant}[/] (shown once, stored hashed):")
    print(key)


def _client(url: str, api_key: Optional[str]):  # type: ignore[no-untyped-def]
    from gradwatch.client import Client

    return Client(url, api_key)


def _fail(exc: Exception, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/] {exc}")
    return typer.Exit(code)


@app.command()
def submit(
    spec_file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Job spec JSON file.")],
    wait: Annotated[bool, typer.Option("--wait", help="Show progress, then the report.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a summary.")] = False,
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """Submit a spec; with --wait, follow it to the report (exit code = verdict)."""
    import httpx

    from gradwatch.client import GradwatchError, JobFailed

    try:
        spec = json.loads(spec_file.read_text())
    except json.JSONDecodeError as exc:
        raise _fail(f"{spec_file} is not valid JSON: {exc}", 2) from None
    client = _client(url, api_key)
    try:
        job = client.submit(spec)
    except GradwatchError as exc:
        raise _fail(exc, 2 if exc.status == 422 else 1) from None
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach {url}: {exc}") from None
    if not wait:
        console.print_json(data=job) if as_json else console.print(f"submitted job [bold]{job['id']}[/] ({job['status']})")
        return
    try:
        job = _follow(client, job)
    except JobFailed as exc:
        raise _fail(exc, 5) from None
    report = client.report(job)
    _show_report(report, as_json)
    raise typer.Exit(EXIT_VERDICT.get(report["verdict"], 0))


def _follow(client: Any, job: dict[str, Any]) -> dict[str, Any]:
    epochs = job["progress"]["epochs"] or 1
    with Progress(TextColumn("[bold]{task.fields[name]}"), BarColumn(), TextColumn("epoch {task.completed:.0f}/{task.total:.0f}"),
                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=err, transient=False) as bar:
        task = bar.add_task("train", total=epochs, name=job["name"], status=job["status"])

        def progress(current: dict[str, Any]) -> None:
            status = current["status"] + (f" · verdict so far: {current['verdict']}" if current.get("verdict") else "")
            if current["status"] == "succeeded" and not current.get("report_final", True):
                status = "verifying remedies"
            bar.update(task, completed=current["progress"]["epoch"], status=status)

        done = client.wait(job, on_progress=progress, poll=0.5)
        bar.update(task, completed=done["progress"]["epoch"], total=max(epochs, done["progress"]["epoch"] or 1))
    return done


VERDICT_STYLE = {"healthy": "green", "vanishing": "yellow", "exploding": "red"}


def _show_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    style = VERDICT_STYLE.get(report["verdict"], "white")
    console.print(f"[bold {style}]{report['verdict'].upper()}[/] (confidence {report.get('confidence', 0):.2f})"
                  + ("" if report.get("final") else " [dim](partial)[/]"))
    console.print(report.get("summary", ""))
    for finding in report.get("findings", []):
        console.print(f"  • [{finding.get('severity')}] {finding.get('kind')}: {finding.get('message')}")
    for rec in report.get("recommendations", []):
        console.print(f"  {rec['priority']}. [bold]{rec['title']}[/] — {rec.get('rationale', '')}")
        if rec.get("patch"):
            console.print(f"     patch: {json.dumps(rec['patch'])}", soft_wrap=True)
        if rec.get("verification"):
            v = rec["verification"]
            console.print(f"     verified: {v.get('verdict')}, final loss {v.get('final_loss')} vs {v.get('baseline_final_loss')}"
                          f" ({'improved' if v.get('improved') else 'not improved'})")


@app.command()
def report(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report JSON.")] = False,
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """Print a job's report (exit code = verdict)."""
    from gradwatch.client import GradwatchError

    try:
        rep = _client(url, api_key).report(job_id)
    except GradwatchError as exc:
        raise _fail(exc) from None
    _show_report(rep, as_json)
    raise typer.Exit(EXIT_VERDICT.get(rep["verdict"], 0))


@app.command()
def jobs(
    status: Annotated[Optional[str], typer.Option(help="Only jobs with this status.")] = None,
    limit: Annotated[int, typer.Option(help="How many.")] = 20,
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """List jobs, newest first."""
    from gradwatch.client import GradwatchError

    try:
        items = _client(url, api_key).jobs(status=status, limit=limit)
    except GradwatchError as exc:
        raise _fail(exc) from None
    table = Table("id", "name", "status", "epoch", "verdict", "created")
    for j in items:
        verdict = j.get("verdict") or ""
        table.add_row(j["id"], j["name"], j["status"], f"{j['progress']['epoch']}/{j['progress']['epochs'] or '?'}",
                      f"[{VERDICT_STYLE.get(verdict, 'white')}]{verdict}[/]", j["created_at"] or "")
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
