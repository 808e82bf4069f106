"""Every error leaves the API as RFC 9457 problem+json, so clients parse one shape.

Field-level errors go in `errors: [{"pointer": "/json/pointer", "detail": "..."}]`, the
extension RFC 9457 itself suggests, with pointers into the request body as submitted.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("gradwatch.api")

MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    """An error the API reports on purpose: status, a stable type slug and a sentence."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        errors: Iterable[dict[str, str]] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.slug, self.title, self.detail = status, slug, title, detail
        self.errors = list(errors)
        self.headers = headers


def problem_response(request: Request, problem: Problem) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"urn:gradwatch:problem:{problem.slug}",
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
        "instance": request.url.path,
    }
    if problem.errors:
        body["errors"] = problem.errors
    return JSONResponse(body, status_code=problem.status, media_type=MEDIA_TYPE, headers=problem.headers)


def not_found(what: str = "job") -> Problem:
    # Another tenant's job is reported exactly like a missing one: existence is not leaked.
    return Problem(404, "not-found", "Not found", f"No such {what}.")


def pointer_from_loc(loc: Iterable[Any]) -> str:
    """FastAPI/pydantic `loc` -> JSON Pointer into the body ('body' prefix dropped)."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _validation_problem(exc: RequestValidationError) -> Problem:
    errors = []
    for err in exc.errors():
        loc = list(err.get("loc", ()))
        where = loc[0] if loc else "body"
        if err.get("type") == "json_invalid":
            return Problem(400, "malformed-json", "Malformed JSON", "The request body is not valid JSON.")
        errors.append({"pointer": pointer_from_loc(loc), "detail": err.get("msg", "invalid"), "in": str(where)})
    first = errors[0] if errors else {"pointer": "", "detail": "invalid request"}
    detail = f"{first['pointer'] or 'the request'}: {first['detail']}"
    return Problem(422, "invalid-request", "Invalid request", detail, errors)


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(request, _validation_problem(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = {404: "Not found", 405: "Method not allowed", 406: "Not acceptable"}.get(exc.status_code, "HTTP error")
        detail = exc.detail if isinstance(exc.detail, str) else title
        return problem_response(request, Problem(exc.status_code, "http", title, detail, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(
            request, Problem(500, "internal", "Internal error", "The server failed; the error is logged.")
        )
