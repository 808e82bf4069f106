"""The FastAPI application: wiring only."""

from __future__ import annotations

from fastapi import FastAPI

from service import problems
from service.auth import KeyRing, env_digests
from service.db import Database
from service.metrics import LatencyMiddleware, make_registry
from service.routers import health, jobs, webhooks
from service.routers import pages
from service.settings import Settings, get_settings

DESCRIPTION = """\
**gradwatch** answers one question: *are my gradients vanishing or exploding, where, why, and
what fixes it?* Submit a network spec (a worker trains it) or stream statistics from your own
training loop, then read the report: one verdict, findings with evidence, and ranked remedies
as JSON Patches against your spec. Errors are RFC 9457 problem+json.
"""


def create_app(settings: Settings | None = None, db: Database | None = None) -> FastAPI:
    settings = settings or get_settings()
    db = db or Database(settings.database_url)
    app = FastAPI(title="gradwatch", version="1", description=DESCRIPTION)
    app.state.settings = settings
    app.state.db = db
    app.state.keyring = KeyRing(env_digests(settings.api_key_pairs))
    app.state.registry, latency = make_registry(db)
    app.add_middleware(LatencyMiddleware, histogram=latency)
    problems.install(app)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(webhooks.router)
    app.include_router(pages.router)  # HTML: /jobs, /jobs/{id}
    return app
