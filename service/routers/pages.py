"""Server-rendered HTML pages for people: `/jobs` (a list) and `/jobs/{id}` (one job).

No front-end build: Jinja2 templates in service/templates, a little inline CSS and one small
inline script that polls the JSON API while a job runs. Same tenant rules as the API:
- no key configured anywhere: loopback clients only (as the API);
- keys configured: `Authorization: Bearer KEY`, or open any page once with `?key=KEY`: the key
  is checked, stored in an HttpOnly, SameSite=Lax cookie (`gradwatch_key`, Secure over https)
  and the browser is redirected to the same address without it. The cookie then also
  authenticates the API's GET endpoints (the pages' images, JSON links and status polling);
  never a POST. `/jobs/logout` forgets it.
- another tenant's job is a 404, exactly like a missing one.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jsonpatch
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from service import reports
from service.deps import KEY_COOKIE, SessionDep, get_tenant
from service.epoch_store import load_records
from service.plots import mentions_recurrent, has_temporal
from service.problems import Problem
from service.tables import Job
from service.views import FINAL_STATUSES, job_json

router = APIRouter(tags=["pages"], include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).resolve().parent.parent / "templates"))

COOKIE_MAX_AGE = 30 * 24 * 3600

VERDICT_WORDS = {
    "vanishing": ("Vanishing gradients",
                  "The gradient shrinks to almost nothing on its way back to the input, so the layers "
                  "near the input barely learn."),
    "exploding": ("Exploding gradients",
                  "Gradients (or the loss) grow out of control: updates are huge and training diverges."),
    "healthy": ("Healthy",
                "Gradients reach every layer at a sensible size; nothing here stops the network from learning."),
}
#: the finding kinds that decide each verdict (presentation: the engine sorts them first too)
DECISIVE = {
    "vanishing": {"vanishing_gradients"},
    "exploding": {"nonfinite_loss", "loss_divergence", "exploding_gradients"},
    "healthy": set(),
}


def _page_error(request: Request, status: int, title: str, message: str, *, key_form: bool = False) -> HTMLResponse:
    return templates.TemplateResponse(
        request, "error.html", {"title": title, "message": message, "key_form": key_form,
                                "path": request.url.path}, status_code=status,
        headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


def _authenticate(request: Request, session: Any) -> str | Response:
    """The tenant, or the response to send instead (a redirect that sets the key cookie, or an
    HTML 401/403 page)."""
    key = request.query_params.get("key")
    if key is not None:
        keyring = request.app.state.keyring
        if keyring.any_keys(session) and keyring.tenant_for(session, key.strip()) is None:
            return _page_error(request, 401, "That key is not valid",
                               "The API key in the address was not accepted. Check it and try again.", key_form=True)
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != "key"]
        target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(KEY_COOKIE, key.strip(), max_age=COOKIE_MAX_AGE, httponly=True, samesite="lax",
                            secure=request.url.scheme == "https", path="/")
        return response
    try:
        return get_tenant(request, session)
    except Problem as problem:
        if problem.status == 401:
            return _page_error(request, 401, "This server needs an API key",
                               "Open this page once with ?key=YOUR_KEY added to the address (the key is then "
                               "kept in a cookie for this browser), or send Authorization: Bearer YOUR_KEY.",
                               key_form=True)
        return _page_error(request, problem.status, problem.title, problem.detail)


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/jobs", status_code=307)


@router.get("/jobs/logout", response_class=HTMLResponse)
def logout(request: Request) -> Response:
    response = RedirectResponse("/jobs", status_code=303)
    response.delete_cookie(KEY_COOKIE, path="/")
    return response


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, session: SessionDep, status: str | None = None, cursor: str | None = None) -> Response:
    tenant = _authenticate(request, session)
    if isinstance(tenant, Response):
        return tenant
    from service.routers.jobs import list_jobs  # the API's own query: same order, cursor, tenant rule

    if status not in (None, "", "queued", "running", "succeeded", "failed", "cancelled"):
        status = None
    try:
        page = list_jobs(session=session, tenant=tenant, status=status or None, limit=50, cursor=cursor or None, parent_id=None)
    except Problem:
        page = list_jobs(session=session, tenant=tenant, status=status or None, limit=50, cursor=None, parent_id=None)
    items = page["items"]
    active = any(j["status"] not in FINAL_STATUSES for j in items)
    return templates.TemplateResponse(request, "jobs.html", {
        "jobs": items, "status": status or "", "next_cursor": page["next_cursor"], "active": active,
        "statuses": ["queued", "running", "succeeded", "failed", "cancelled"],
    })


def _diff(spec: Any, patch: Any) -> tuple[str | None, str | None]:
    """(unified diff of the spec before/after the patch, error)."""
    if not spec or not patch:
        return None, None
    try:
        patched = jsonpatch.apply_patch(copy.deepcopy(spec), patch)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, ValueError) as exc:
        return None, f"the patch does not apply to this spec: {exc}"
    before = json.dumps(spec, indent=2).splitlines()
    after = json.dumps(patched, indent=2).splitlines()
    lines = list(difflib.unified_diff(before, after, "spec.json", "spec.json (patched)", n=2, lineterm=""))
    return "\n".join(lines), None


def _decided(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Findings with `decisive` marked: those of the kinds that make the verdict."""
    kinds = DECISIVE.get(report.get("verdict") or "", set())
    findings = [dict(f) for f in report.get("findings") or []]
    for f in findings:
        f["decisive"] = f.get("kind") in kinds
    return findings


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, request: Request, session: SessionDep) -> Response:
    tenant = _authenticate(request, session)
    if isinstance(tenant, Response):
        return tenant
    job = session.get(Job, job_id)
    if job is None or job.tenant != tenant:
        return _page_error(request, 404, "No such job", f"There is no job {job_id} (or it belongs to someone else).")
    records = load_records(session, job.id)
    report = reports.report_for(session, job) if records or job.report is not None else None
    final = job.status in FINAL_STATUSES
    recommendations = []
    for rec in (report or {}).get("recommendations") or []:
        diff, error = _diff(job.spec, rec.get("patch"))
        recommendations.append({**rec, "diff": diff, "diff_error": error})
    last = records[-1] if records else None
    children = list(session.scalars(select(Job).where(Job.parent_id == job.id, Job.tenant == tenant)
                                    .order_by(Job.created_at)))
    verdict = (report or {}).get("verdict") if records else None
    context = {
        "job": job_json(job),
        "final": final,
        "report": report,
        "verdict": verdict,
        "verdict_words": VERDICT_WORDS.get(verdict or "", None),
        "findings": _decided(report) if report else [],
        "recommendations": recommendations,
        "records": len(records),
        "last_loss": last.get("loss") if last else None,
        "last_nonfinite": bool(last and last.get("nonfinite")),
        "last_metrics": (last or {}).get("metrics") or {},
        "temporal": has_temporal(records) or mentions_recurrent(job.spec) or mentions_recurrent(job.declared_layers),
        "children": [job_json(c) for c in children],
        "spec_json": json.dumps(job.spec, indent=2) if job.spec else None,
        "version": f"{job.epochs_done or 0}-{job.status}",
    }
    return templates.TemplateResponse(request, "job.html", context)
