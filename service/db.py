"""Engine, sessions and migrations.

    db = Database(settings.database_url)
    with db.session() as session:        # one short transaction: commit on success, rollback on error
        queue.claim(session, worker_id, lease_seconds)

Backends:
- SQLite (the embedded default): every connection gets WAL, a 30 s busy timeout (writers queue
  up instead of failing with "database is locked"), ``foreign_keys=ON`` and
  ``synchronous=NORMAL`` (safe with WAL); ``check_same_thread=False`` so a pooled connection may
  serve any thread. ``sqlite://`` / ``sqlite:///:memory:`` use one shared connection
  (StaticPool) and are meant for unit tests.
- PostgreSQL through psycopg 3 (``postgresql://`` and ``postgres://`` are read as
  ``postgresql+psycopg://``), with ``pool_pre_ping`` so a restarted server costs no request.

JSON columns are written with ``allow_nan=False``: a NaN/Inf inside a JSON value is stored as
null (JSON has no NaN and PostgreSQL refuses it), matching the contract's "non-finite numbers are
sent as null".
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

ROOT = Path(__file__).resolve().parent.parent
ALEMBIC_INI = ROOT / "alembic.ini"
ALEMBIC_DIR = ROOT / "alembic"

SQLITE_BUSY_TIMEOUT_S = 30.0


def normalize_url(url: str | URL) -> URL:
    """Parse ``url``; PostgreSQL without a driver (or the ``postgres://`` alias) means psycopg 3."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def url_to_string(url: str | URL) -> str:
    """The URL as text, password included (``str(URL)`` masks it)."""
    return normalize_url(url).render_as_string(hide_password=False)


def is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _finite_json(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def json_dumps(value: Any) -> str:
    """JSON for the database: NaN/Inf anywhere inside become null."""
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except ValueError:  # a non-finite float somewhere: rare, so only then walk the value
        return json.dumps(_finite_json(value), allow_nan=False, separators=(",", ":"))


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def create_db_engine(url: str | URL, *, echo: bool = False, **kwargs: Any) -> Engine:
    """An engine configured for gradwatch (see the module docstring); ``kwargs`` go to create_engine."""
    parsed = normalize_url(url)
    backend = parsed.get_backend_name()
    options: dict[str, Any] = {"echo": echo, "json_serializer": json_dumps}
    if backend == "sqlite":
        options["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}
        if is_memory_sqlite(parsed):
            options["poolclass"] = StaticPool
        else:
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    elif backend == "postgresql":
        options["pool_pre_ping"] = True
        options["connect_args"] = {"application_name": "gradwatch"}
    options.update(kwargs)
    engine = create_engine(parsed, **options)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
    return engine


class Database:
    """An engine and its session factory. Create one per process (after any fork)."""

    def __init__(self, url: str | URL, *, echo: bool = False, **engine_kwargs: Any) -> None:
        self.url: URL = normalize_url(url)
        self.engine: Engine = create_db_engine(self.url, echo=echo, **engine_kwargs)
        self.sessionmaker: sessionmaker[Session] = sessionmaker(
            self.engine, expire_on_commit=False
        )

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: commits when the block ends normally, rolls back when it raises."""
        session = self.sessionmaker()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def ping(self) -> bool:
        """True when the database answers a trivial query (readiness)."""
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    def dispose(self) -> None:
        """Close every pooled connection (at shutdown, or in a child after fork)."""
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Database({self.url!r})"


def alembic_config(url: str | URL | None = None) -> Any:
    """An alembic ``Config`` for this repository's migrations, aimed at ``url`` when given
    (otherwise alembic/env.py uses GRADWATCH_DATABASE_URL)."""
    from alembic.config import Config

    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(ALEMBIC_DIR).replace("%", "%%"))
    config.attributes["programmatic"] = True  # leave the application's logging alone
    if url is not None:
        config.attributes["url"] = url_to_string(url)
    return config


def _run_alembic(target: str | URL | Database, action: Any, revision: str) -> None:
    if not isinstance(target, Database):
        action(alembic_config(target), revision)
        return
    # Reuse the Database's own connection: the only way to reach a StaticPool in-memory SQLite.
    config = alembic_config(target.url)
    with target.engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Batch migrations rebuild tables; with foreign keys on, dropping the old copy of a
            # parent table would cascade into its children. (PRAGMA is a no-op inside a transaction.)
            connection.exec_driver_sql("PRAGMA foreign_keys = OFF")
        try:
            config.attributes["connection"] = connection
            action(config, revision)
            connection.commit()
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys = ON")


def upgrade(target: str | URL | Database, revision: str = "head") -> None:
    """``alembic upgrade head`` on ``target`` (a URL or a Database). Safe to run when already there."""
    from alembic import command

    _run_alembic(target, command.upgrade, revision)


def downgrade(target: str | URL | Database, revision: str) -> None:
    """``alembic downgrade REVISION`` on ``target``."""
    from alembic import command

    _run_alembic(target, command.downgrade, revision)

