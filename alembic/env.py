"""Alembic environment for gradwatch.

Which database, first match wins:
1. ``config.attributes["connection"]``: a live SQLAlchemy Connection (service.db.upgrade(Database));
2. ``config.attributes["url"]``: set by service.db.alembic_config(url);
3. ``alembic -x url=...`` on the command line;
4. ``sqlalchemy.url`` in alembic.ini (unset by default);
5. ``GRADWATCH_DATABASE_URL`` / service.settings (default ``sqlite:///./gradwatch.db``).

SQLite migrations run in batch mode (``render_as_batch``: SQLite cannot ALTER most things, so a
changed table is copied), with foreign keys off (so copying a parent table cannot cascade into
its children). On PostgreSQL an advisory lock serialises concurrent ``upgrade`` runs (several
``gradwatch serve`` starting at once): the second one waits, then finds nothing to do.
"""

from __future__ import annotations

from logging.config import fileConfig
from pathlib import Path
from typing import Any

from alembic import context
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from service.db import SQLITE_BUSY_TIMEOUT_S, normalize_url, url_to_string
from service.settings import Settings
from service.tables import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata

# An arbitrary constant shared by every gradwatch process: pg_advisory_xact_lock(key).
MIGRATION_LOCK_KEY = 0x6772_6164_7761  # "gradwa"

if config.config_file_name is not None and not config.attributes.get("programmatic"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    url = config.attributes.get("url")
    if not url:
        url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        url = config.get_main_option("sqlalchemy.url")
    if not url:
        url = Settings().database_url
    return url_to_string(normalize_url(url))


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Autogenerate writes plain SQLAlchemy types, so new migrations never import service.tables."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def configure(**kwargs: Any) -> None:
    dialect_name = kwargs.pop("dialect_name")
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=dialect_name == "sqlite",
        render_item=render_item,
        **kwargs,
    )


def run_migrations_offline() -> None:
    url = database_url()
    configure(
        url=url,
        dialect_name=normalize_url(url).get_backend_name(),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_with_connection(connection: Connection) -> None:
    configure(connection=connection, dialect_name=connection.dialect.name)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_with_connection(connection)
        return
    url = normalize_url(database_url())
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        # No foreign_keys pragma here on purpose (see the module docstring).
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        if url.database not in (None, "", ":memory:"):
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            run_with_connection(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
