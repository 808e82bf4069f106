"""Shared fixtures.

``database``: a migrated, empty ``service.db.Database``, once per backend ("sqlite",
"postgresql"). Each backend is migrated once per test session; every test starts from emptied
tables. PostgreSQL (GRADWATCH_TEST_POSTGRES_URL, default the local ``test`` database) gets a
fresh schema per test session, dropped at the end, so parallel sessions of several people
never meet. PostgreSQL is skipped when unreachable, unless GRADWATCH_REQUIRE_POSTGRES=1 (CI).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from service.db import Database, url_to_string, upgrade
from service.tables import Base

POSTGRES_URL = os.environ.get(
    "GRADWATCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def postgres_schema() -> Iterator[Callable[[], str]]:
    """``new()`` -> URL of a new empty schema (first in search_path); all dropped at session end."""
    admin = create_engine(POSTGRES_URL, poolclass=NullPool, connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # unreachable, or no such database/user
        admin.dispose()
        message = f"PostgreSQL at {make_url(POSTGRES_URL)!r} is unreachable: {exc}"
        if os.environ.get("GRADWATCH_REQUIRE_POSTGRES") == "1":
            pytest.fail(message + " (GRADWATCH_REQUIRE_POSTGRES=1)", pytrace=False)
        pytest.skip(message)
    schemas: list[str] = []

    def new() -> str:
        schema = f"gwtest_{uuid.uuid4().hex[:12]}"
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        schemas.append(schema)
        url: URL = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        return url_to_string(url)

    yield new
    with admin.begin() as connection:
        for schema in schemas:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(scope="session")
def _migrated() -> Iterator[dict[str, Database]]:
    databases: dict[str, Database] = {}
    yield databases
    for db in databases.values():
        db.dispose()


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def database(request, _migrated, tmp_path_factory) -> Database:
    backend = request.param
    db = _migrated.get(backend)
    if db is None:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'gradwatch.db'}"
        else:
            url = request.getfixturevalue("postgres_schema")()
        upgrade(url)
        db = _migrated[backend] = Database(url)
    # Empty every table (children first). DELETE rather than TRUNCATE: on tables this small it
    # is ~20x faster on PostgreSQL, and no test depends on id sequences restarting.
    with db.engine.begin() as connection:
        if backend == "postgresql":
            connection.execute(text("SET LOCAL lock_timeout = '10s'"))  # fail, don't hang
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())
    return db
