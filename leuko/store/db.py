"""Database engine and schema migrations.

``$LEUKO_DB_URL`` takes any SQLAlchemy URL (PostgreSQL when a team shares the log);
otherwise an SQLite file in ``$LEUKO_HOME``. SQLite runs in WAL mode with a 30 s busy
timeout, foreign keys on, and write transactions started with ``BEGIN IMMEDIATE`` so that
concurrent writers queue instead of failing with "database is locked".
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import URL, Engine, create_engine, event, make_url, text
from sqlalchemy.exc import (ArgumentError, DataError, DBAPIError, IntegrityError, InternalError, NotSupportedError,
                            ProgrammingError)

from leuko.paths import leuko_home

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_MS = 30_000


class StoreUnavailableError(RuntimeError):
    """The database cannot be reached or written; nothing was saved."""


REFUSED_STATEMENTS = (IntegrityError, DataError, ProgrammingError, InternalError, NotSupportedError)
"""Errors in which the database refused one statement (a constraint, a value, a trigger) but
works; every other database error means the database itself cannot be used."""


def database_hint(url: str | URL) -> str:
    """What to check when the database at ``url`` cannot be used, naming the SQLite file, or
    the URL without its password, so the person reading the message knows what to fix."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return "check LEUKO_DB_URL: it must be an SQLAlchemy URL such as postgresql+psycopg://user@host/leuko"
    if parsed.get_backend_name() == "sqlite":
        return (f"check that {parsed.database} is a readable Leuko case database (move a damaged file aside "
                "to start a new one), or set LEUKO_HOME or LEUKO_DB_URL to use another")
    return (f"check LEUKO_DB_URL ({parsed.render_as_string(hide_password=True)}): the database server must be "
            "running and reachable, and its driver installed")


def unavailable(exc: BaseException, url: str | URL, action: str = "reached") -> StoreUnavailableError:
    """The :class:`StoreUnavailableError` for ``exc``, raised while the database at ``url``
    was being opened, reached or written (``action``)."""
    reason = exc.orig if isinstance(exc, DBAPIError) else exc
    return StoreUnavailableError(f"the case database cannot be {action}: {reason}; {database_hint(url)}")


def database_url(home: Path | None = None) -> str:
    """``$LEUKO_DB_URL``, else ``sqlite:///<LEUKO_HOME>/leuko.db``."""
    url = os.environ.get("LEUKO_DB_URL")
    if url:
        return url
    folder = Path(home or leuko_home())
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'leuko.db'}"


def make_engine(url: str) -> Engine:
    """An engine with the SQLite settings above, or plain pooling for other databases.

    A URL SQLAlchemy cannot parse, or whose dialect or driver is not installed, raises
    :class:`StoreUnavailableError`.
    """
    try:
        if not url.startswith("sqlite"):
            return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5}
                                 if url.startswith("postgresql") else {})
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})
    except (ArgumentError, ImportError) as exc:
        raise unavailable(exc, url, "opened") from exc

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


_UPGRADE_LOCK = threading.Lock()
PG_MIGRATION_LOCK = 7_365_301


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (run when the app starts).

    Alembic's command context is process-global, so upgrades are serialised within a
    process; on PostgreSQL an advisory lock serialises servers starting together.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    try:
        with _UPGRADE_LOCK, engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})"))
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except DBAPIError as exc:
        raise unavailable(exc, engine.url) from exc
