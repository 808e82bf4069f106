"""FastAPI dependencies, as `Annotated` aliases the routers use in their signatures."""

from __future__ import annotations

from typing import Annotated, Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.auth import DEFAULT_TENANT, KeyRing, is_loopback
from service.db import Database
from service.problems import Problem
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_database(request: Request) -> Database:
    return request.app.state.db


def get_session(db: Annotated[Database, Depends(get_database)]) -> Iterator[Session]:
    # Writes commit explicitly inside the endpoint, so the client never sees a 2xx for
    # something that is not yet durable; this context only rolls back on an error.
    with db.session() as session:
        yield session


KEY_COOKIE = "gradwatch_key"
SAFE_METHODS = ("GET", "HEAD")

SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_database)]
SessionDep = Annotated[Session, Depends(get_session)]


def get_tenant(request: Request, session: SessionDep) -> str:
    keyring: KeyRing = request.app.state.keyring
    if not keyring.any_keys(session):
        if not is_loopback(request.client.host if request.client else None):
            raise Problem(
                403, "keys-required", "API keys required",
                "This server has no API keys configured, so it only serves loopback clients. "
                "Set GRADWATCH_API_KEYS or run `gradwatch keys create --tenant NAME`.",
            )
        return DEFAULT_TENANT
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip() if scheme.lower() == "bearer" else ""
    if not key and request.method in SAFE_METHODS:
        # Browsers: the HTML pages' `?key=` sets this HttpOnly, SameSite=Strict cookie, so the
        # pages' images, JSON links and status polling work. Reads only: a POST still needs the
        # header, so a cookie can never be abused to change anything (no CSRF).
        key = request.cookies.get(KEY_COOKIE, "").strip()
    tenant = keyring.tenant_for(session, key) if key else None
    if tenant is None:
        raise Problem(
            401, "unauthorized", "Unauthorized", "Send a valid API key as `Authorization: Bearer KEY`.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]
