"""Optuna study storage: URL checks, opening (SQLite file or shared PostgreSQL), and a study-wide lock.

SQLite (the default, ``sqlite:///<output>/study.db``) serves one process. PostgreSQL serves several
``clada-calibrate`` workers, possibly on different machines, that share one study: trials carry a heartbeat so
that a dead worker's trial is failed and redone, and ``study_lock`` serialises the step that claims a trial.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from .recipe import RecipeError

SCHEMES = ("sqlite", "postgresql")
HEARTBEAT_S = 5       # a running trial records a heartbeat this often (shared storages only)
GRACE_S = 60          # ... and is failed (then redone) once its heartbeat is this old


class StorageError(RecipeError):
    """The study storage cannot be opened (bad URL, missing driver, server unreachable, bad credentials)."""


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and reports)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - unparsable: keep the scheme, or what follows the last '@'
        if "://" in url:
            return url.split("://", 1)[0] + "://..."
        return "***@" + url.rpartition("@")[2] if "@" in url else url


def check_url(url: str, field: str = "search.storage") -> str:
    """Validate a storage URL without connecting: supported scheme, parsable, driver installed, and for SQLite
    an existing folder. Returns it."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme.split("+", 1)[0] not in SCHEMES:
        raise RecipeError(f"{field}: {redact(url)!r} is not supported; use sqlite:///PATH or "
                          "postgresql://USER@HOST[:PORT]/DATABASE")
    try:
        create_engine(url).dispose()  # parses the URL and imports the driver; does not connect
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise RecipeError(f"{field}: {redact(url)!r} is not a valid storage URL ({_first_line(exc)})") from None
    except ImportError as exc:
        raise RecipeError(f"{field}: {redact(url)!r} needs the {exc.name or 'database'} driver, which is not "
                          "installed (pip install 'clada[postgres]' installs psycopg, for postgresql:// URLs)") from None
    database = make_url(url).database
    if scheme.startswith("sqlite") and database and database != ":memory:" and not Path(database).parent.is_dir():
        raise RecipeError(f"{field}: {redact(url)!r}: folder {Path(database).parent} does not exist")
    return url


def is_shared(url: str | None) -> bool:
    """True for storages that several processes may use at once (PostgreSQL)."""
    return url is not None and url.startswith("postgresql")


def open_storage(url: str | None):
    """An Optuna storage for ``url`` (None: in memory). Shared storages get heartbeats; raises StorageError."""
    if url is None:
        return None
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    options = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S} if is_shared(url) else {}
    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental (since optuna 2.9)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, **options)
    except (SQLAlchemyError, RuntimeError, ImportError, ValueError) as exc:
        raise StorageError(f"study storage: cannot open {redact(url)} ({_first_line(exc)})") from None


def study_lock(storage, study_name: str) -> AbstractContextManager[None]:
    """Serialise a critical section across every process using ``storage`` for ``study_name``.

    PostgreSQL: a session advisory lock (released by the server if the holder dies). Other storages are used by
    one process, so the lock is a no-op.
    """
    engine = getattr(storage, "engine", None)
    if engine is None or engine.dialect.name != "postgresql":
        return nullcontext()
    return _advisory_lock(engine, int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True))


@contextmanager
def _advisory_lock(engine, key: int) -> Iterator[None]:
    from sqlalchemy import text

    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            conn.commit()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
