"""`gradwatch` command line: serve, worker, migrate, submit, report, jobs, keys.

Exit codes a script can use: 0 ok (healthy), 1 error, 2 bad usage or refused spec,
3 verdict vanishing, 4 verdict exploding, 5 the job failed or was cancelled,
6 (`report` only) the report is not final yet: the job is still running.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.settings import get_settings

app = typer.Typer(help="gradwatch: are my gradients vanishing or exploding, where, why, and what fixes it?",
                  no_args_is_help=True, add_completion=False)
keys_app = typer.Typer(help="Manage API keys (stored hashed).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

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
    from service.webhooks import start_dispatcher

    dispatcher = start_dispatcher(settings)  # webhooks go out even with --no-worker
    # uvicorn shuts down gracefully on SIGTERM, restores the handler it found and raises the
    # signal again: with the default handler that kills this process before `finally`, leaving
    # the worker processes orphaned. This handler turns it into an exit that runs `finally`.
    signal.signal(signal.SIGTERM, _exit_after_shutdown)
    try:
        uvicorn.run("service.main:app", host=host, port=port, log_level="info")
    finally:
        dispatcher.stop()
        pool.stop()


def _exit_after_shutdown(signum: int, _frame: Any) -> None:
    raise SystemExit(0)


class WorkerPool:
    """Embedded workers as child processes (training never runs in the API process, so a
    crash there cannot take the API down); a worker that dies is restarted."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stopping = threading.Event()

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "GRADWATCH_WORKERS_ON_MACHINE": str(self.count), "GRADWATCH_PARENT_PID": str(os.getpid())}
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


def _fail(exc: Exception | str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/] {escape(str(exc))}")
    return typer.Exit(code)


def _page_url(client: Any, job_id: str) -> str:
    return f"{getattr(client, 'base_url', '').rstrip('/')}/jobs/{job_id}"


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
        if as_json:
            print(json.dumps(job, indent=2))
        else:
            console.print(f"submitted job [bold]{job['id']}[/] ({job['status']}); "
                          f"follow it with `gradwatch report {job['id']}` or at {_page_url(client, job['id'])}")
        return
    try:
        job = _follow(client, job)
    except JobFailed as exc:
        err.print(f"[red]the job did not succeed:[/] {escape(str(exc))}")
        raise typer.Exit(5) from None
    except KeyboardInterrupt:
        err.print(f"\nstopped following; the job goes on: `gradwatch report {job['id']}`")
        raise typer.Exit(130) from None
    except (GradwatchError, httpx.HTTPError) as exc:
        raise _fail(exc) from None
    rep = client.report(job)
    _show_report(rep, as_json, job=job, page=_page_url(client, job["id"]))
    raise typer.Exit(EXIT_VERDICT.get(rep["verdict"], 0))


def _fmt(value: Any) -> str:
    if value is None:
        return "NaN/Inf"
    if isinstance(value, float):
        return f"{value:.3g}" if value and (abs(value) < 1e-3 or abs(value) >= 1e4) else f"{value:.4g}"
    return str(value)


class _Lines:
    """Progress for logs and pipes (stderr is not a terminal): one line per epoch."""

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total, self.last = name, total, ""

    def update(self, epoch: int, loss: str, verdict: str, status: str) -> None:
        line = f"{self.name}: epoch {epoch}/{self.total}" + (f"  {loss}" if loss else "") + \
            (f"  {verdict}" if verdict else "") + f"  ({status})"
        if line != self.last:
            err.print(line, highlight=False, soft_wrap=True)
            self.last = line


def _follow(client: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Poll the job showing epoch, the last epoch's loss and the verdict so far: a live bar at
    a terminal, one line per epoch otherwise."""
    epochs = job["progress"]["epochs"] or 1
    state: dict[str, Any] = {"epoch": -1, "loss": "", "verdict": ""}
    live = err.is_terminal
    bar = Progress(TextColumn("[bold]{task.fields[name]}"), BarColumn(bar_width=24),
                   TextColumn("epoch {task.completed:.0f}/{task.total:.0f}"),
                   TextColumn("{task.fields[loss]}"), TextColumn("{task.fields[verdict]}"),
                   TextColumn("[dim]{task.fields[status]}"), TimeElapsedColumn(),
                   console=err, transient=False, disable=not live)
    lines = _Lines(job["name"], epochs)
    task = bar.add_task("train", total=epochs, name=job["name"], status=job["status"], loss="", verdict="")

    def show(epoch: int, status: str) -> None:
        if live:
            bar.update(task, completed=epoch, status=status, loss=state["loss"], verdict=state["verdict"])
        else:
            lines.update(epoch, state["loss"], state["verdict"], status)

    def progress(current: dict[str, Any]) -> None:
        status = current["status"]
        if status == "succeeded" and not current.get("report_final", True):
            status = "verifying remedies"
        epoch = current["progress"]["epoch"] or 0
        if epoch != state["epoch"] and epoch > 0:
            state["epoch"] = epoch
            try:  # loss from the epoch records, verdict so far from the partial report
                records = client.epochs(current)
                if records:
                    last = records[-1]
                    state["loss"] = "loss " + ("[red]NaN/Inf[/]" if last.get("nonfinite") else _fmt(last.get("loss")))
                verdict = client.report(current).get("verdict")
                if verdict:
                    state["verdict"] = f"verdict so far: [{VERDICT_STYLE.get(verdict, 'white')}]{verdict}[/]"
            except Exception:  # noqa: BLE001 - a missed update must never stop the wait
                pass
        if live or status not in ("succeeded", "failed", "cancelled"):
            show(epoch, status)  # a line for the final state comes once, below

    with bar:
        done = client.wait(job, on_progress=progress, poll=0.5)
        final_epoch = done["progress"]["epoch"] or 0
        early = done["status"] == "succeeded" and done.get("source") == "spec" and final_epoch < epochs
        if live and early:
            bar.update(task, total=max(1, final_epoch))
        state["verdict"] = state["verdict"].replace("verdict so far", "verdict")
        show(final_epoch, done["status"] + (", stopped early: the verdict was certain" if early else ""))
    return done


VERDICT_STYLE = {"healthy": "green", "vanishing": "yellow", "exploding": "red"}
VERDICT_WORDS = {
    "vanishing": "the gradient shrinks to almost nothing before it reaches the input layers",
    "exploding": "gradients (or the loss) grow out of control",
    "healthy": "gradients reach every layer at a sensible size",
}
#: finding kinds that make each verdict (the engine lists them first as well)
DECISIVE = {"vanishing": {"vanishing_gradients"},
            "exploding": {"nonfinite_loss", "loss_divergence", "exploding_gradients"}, "healthy": set()}


def _layers_text(layers: list[str], most: int = 3) -> str:
    if not layers:
        return ""
    shown = ", ".join(layers[:most])
    return shown + (f" and {len(layers) - most} more" if len(layers) > most else "")


def _finding(f: dict[str, Any]) -> None:
    sev = f.get("severity") or ""
    colour = {"high": "red", "medium": "yellow"}.get(sev, "dim")
    console.print(f"  • [{colour}]{sev.upper()}[/] [bold]{(f.get('kind') or '').replace('_', ' ')}[/]: "
                  f"{escape(f.get('message') or '')}")
    where = []
    if f.get("layers"):
        where.append("layers " + _layers_text(f["layers"]))
    if f.get("epochs"):
        e = f["epochs"]
        where.append(f"epochs {e[0]}–{e[-1]}" if len(e) > 1 and e[0] != e[-1] else f"epoch {e[0]}")
    if where:
        console.print(f"    [dim]{escape(' · '.join(where))}[/]")
    evidence = f.get("evidence") or {}
    if evidence:
        items = [f"{k} = {_fmt(v) if not isinstance(v, (dict, list)) else json.dumps(v)}" for k, v in list(evidence.items())[:4]]
        console.print(f"    [dim]evidence: {escape(', '.join(items))}[/]")


def _patch_lines(patch: list[dict[str, Any]], spec: dict[str, Any] | None) -> list[str]:
    """One readable line per JSON Patch operation: `path: old → new`."""
    import jsonpointer

    lines = []
    for op in patch:
        new = json.dumps(op.get("value"), separators=(", ", ": ")) if "value" in op else ""
        old = None
        if spec is not None and op.get("op") in ("replace", "remove"):
            try:
                old = json.dumps(jsonpointer.resolve_pointer(spec, op["path"]), separators=(", ", ": "))
            except (jsonpointer.JsonPointerException, KeyError, TypeError):
                old = None
        if op.get("op") == "replace" and old is not None:
            lines.append(f"{op['path']}: {old} → {new}")
        elif op.get("op") == "add":
            lines.append(f"{op['path']}: + {new}")
        elif op.get("op") == "remove":
            lines.append(f"{op['path']}: − {old or ''}".rstrip())
        else:
            lines.append(f"{op.get('op')} {op.get('path')} {new}".rstrip())
    return lines


def _show_report(report: dict[str, Any], as_json: bool, *, job: dict[str, Any] | None = None,
                 page: str | None = None) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    verdict = report.get("verdict") or ""
    style = VERDICT_STYLE.get(verdict, "white")
    console.print()
    console.print(f"[bold {style}]{verdict.upper()}[/] — {VERDICT_WORDS.get(verdict, '')} "
                  f"(confidence {report.get('confidence') or 0:.2f})" + ("" if report.get("final") else " [dim](partial: the job is still running)[/]"))
    if report.get("summary"):
        console.print(escape(report["summary"]))
    findings = report.get("findings") or []
    kinds = DECISIVE.get(verdict, set())
    decided = [f for f in findings if f.get("kind") in kinds]
    others = [f for f in findings if f.get("kind") not in kinds]
    if decided:
        console.print("\n[bold]Why[/] (the findings that decided it):")
        for f in decided:
            _finding(f)
    if others:
        console.print("\n[bold]Also found:[/]")
        for f in others:
            _finding(f)
    recs = report.get("recommendations") or []
    if recs:
        console.print("\n[bold]What to do[/] (best first):")
    spec = (job or {}).get("spec")
    for rec in recs:
        console.print(f"  {rec['priority']}. [bold]{escape(rec['title'])}[/]")
        if rec.get("rationale"):
            console.print(f"     {escape(rec['rationale'])}", style="dim")
        if rec.get("patch"):
            console.print("     patch:")
            for line in _patch_lines(rec["patch"], spec):
                console.print(f"       {escape(line)}", soft_wrap=True, highlight=False)
        elif rec.get("code"):
            console.print(f"     {escape(rec['code'])}", highlight=False)
        if rec.get("verification"):
            v = rec["verification"]
            console.print(f"     verified: {v.get('verdict')}, final loss {_fmt(v.get('final_loss'))} vs "
                          f"{_fmt(v.get('baseline_final_loss'))} ({'improved' if v.get('improved') else 'not improved'})")
    if page:
        console.print(f"\nthe report with its pictures: {page}", highlight=False)


@app.command()
def report(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report JSON.")] = False,
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """Print a job's report (exit code = verdict; 5 if the job failed or was cancelled; 6 while it runs)."""
    import httpx

    from gradwatch.client import GradwatchError

    client = _client(url, api_key)
    try:
        job = client.job(job_id)
        rep = client.report(job_id)
    except GradwatchError as exc:
        raise _fail(exc) from None
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach {url}: {exc}") from None
    _show_report(rep, as_json, job=job, page=None if as_json else _page_url(client, job_id))
    if job["status"] in ("failed", "cancelled"):
        if not as_json:
            error = job.get("error") or {}
            err.print(f"[red]the job {job['status']}[/]" + (f": {escape(error.get('message') or '')}" if error else ""))
        raise typer.Exit(5)
    if not rep.get("final"):
        raise typer.Exit(6)  # a verdict so far, not one a script should act on
    raise typer.Exit(EXIT_VERDICT.get(rep["verdict"], 0))


@app.command()
def jobs(
    status: Annotated[Optional[str], typer.Option(help="Only jobs with this status.")] = None,
    limit: Annotated[int, typer.Option(help="How many.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON list.")] = False,
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """List jobs, newest first."""
    import httpx

    from gradwatch.client import GradwatchError

    try:
        items = _client(url, api_key).jobs(status=status, limit=limit)
    except GradwatchError as exc:
        raise _fail(exc, 2 if exc.status == 422 else 1) from None
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach {url}: {exc}") from None
    if as_json:
        print(json.dumps(items, indent=2))
        return
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("id", no_wrap=True)  # what `gradwatch report ID` takes: never broken
    for column in ("name", "status", "epoch", "verdict", "created (UTC)"):
        table.add_column(column)
    for j in items:
        verdict = j.get("verdict") or ""
        table.add_row(j["id"], escape(j["name"]), j["status"], f"{j['progress']['epoch']}/{j['progress']['epochs'] or '?'}",
                      f"[{VERDICT_STYLE.get(verdict, 'white')}]{verdict}[/]",
                      (j.get("created_at") or "")[:19].replace("T", " "))
    # A pipe has no width: do not squeeze the table into 80 columns there.
    (console if console.is_terminal else Console(width=140, highlight=False)).print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
