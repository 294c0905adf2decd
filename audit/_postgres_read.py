"""
Reading a fleet's audit log from PostgreSQL, behind the surface the readers use on SQLite.

``verify``, ``prove``, ``consistency``, ``read_records``, ``query`` and ``export`` are
written against ``sqlite3``: ``conn.execute(sql, params)`` with ``?`` placeholders, rows
as tuples, failures as ``sqlite3.Error``. The fleet's tables have the SQLite file's
names and columns (``_postgres_schema``), so this module gives them a connection with
that surface (``_sqlite_format.ReadConnection``) and no reader needs a second path.

Invariants:

- Read-only, one snapshot: everything is read in one ``READ ONLY``, ``REPEATABLE
  READ`` transaction, so a verify that runs while replicas append checks one
  consistent prefix of the log (records, tree and checkpoints as of one instant),
  and nothing is ever written.
- Scans stream: a query ordered without a final ``LIMIT`` (every scan the readers
  make) runs on a server-side cursor fetched ``FETCH_ROWS`` rows at a time, so
  memory does not grow with the log. Point lookups run on ordinary cursors.
- Every psycopg failure leaves as ``PostgresReadError`` (a ``sqlite3.DatabaseError``)
  whose text is ``describe(exc)``: the class and SQLSTATE, never the server's
  message, which may quote a value; the URL holds no password by construction.
- A database that is not a callward fleet audit store (no ``audit`` component, a
  version this code does not know, other ``records`` columns) is refused as
  ``UnreadableDatabase`` before any record is read.
- psycopg is imported on first use, as in ``callward.core._postgres``.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import sqlite3
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final

from callward.audit._postgres_schema import COMPONENT, MIGRATIONS
from callward.audit._sqlite_format import COLUMNS, UnreadableDatabase
from callward.core._postgres import StoreUrl, connect, describe

if TYPE_CHECKING:
    import psycopg

#: Rows a server-side cursor fetches per round trip while a scan streams.
FETCH_ROWS: Final = 1000
#: How readers show up in ``pg_stat_activity``.
APPLICATION_NAME: Final = "callward-audit-reader"
# A scan: ordered, and no LIMIT after its last ORDER BY.
_LAST_ORDER_BY: Final = re.compile(r"\bORDER\s+BY\b(?!.*\bORDER\s+BY\b)(.*)\Z", re.I | re.S)
_LIMIT: Final = re.compile(r"\bLIMIT\b", re.I)


class PostgresReadError(sqlite3.DatabaseError):
    """
    PostgreSQL failed while an audit log was being read.

    It is not an SQLite error. It subclasses ``sqlite3.DatabaseError`` because the
    readers speak sqlite3's DB-API errors: their ``except sqlite3.Error`` paths (a
    verify that reports "could not be read after record N", a ``show`` that ends in
    ``AuditUnavailable``) then handle a fleet store's failures the same way, with no
    PostgreSQL branch of their own.

    Attributes:
        postgres_reason: ``describe(exc)``: the error's class and SQLSTATE, safe to
            print (``_sqlite_format.error_name`` shows it).
    """

    def __init__(self, postgres_reason: str) -> None:
        super().__init__(postgres_reason)
        self.postgres_reason = postgres_reason


@contextlib.contextmanager
def _read_errors() -> Iterator[None]:
    """Turn any psycopg failure inside the block into ``PostgresReadError``."""
    import psycopg  # noqa: PLC0415 - on first use

    try:
        yield
    except psycopg.Error as exc:
        raise PostgresReadError(describe(exc)) from exc


def to_postgres_sql(sql: str) -> bytes:
    """
    The readers' SQLite text for psycopg: each ``?`` becomes ``%s`` (a literal ``%``,
    ``%%``). The readers' SQL is constant and holds no ``?`` inside a string literal.
    """
    return sql.replace("%", "%%").replace("?", "%s").encode()


def is_scan(sql: str) -> bool:
    """Whether ``sql`` is ordered with no ``LIMIT`` after its last ``ORDER BY``."""
    last = _LAST_ORDER_BY.search(sql)
    return last is not None and not _LIMIT.search(last.group(1))


class PostgresRows:
    """The rows of one query (a ``sqlite3.Cursor``'s reading surface), errors mapped."""

    def __init__(
        self, cursor: psycopg.Cursor[tuple[Any, ...]] | psycopg.ServerCursor[tuple[Any, ...]]
    ) -> None:
        self._cursor = cursor

    def fetchone(self) -> Any:
        with _read_errors():
            return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        with _read_errors():
            return list(self._cursor.fetchall())

    def __iter__(self) -> Iterator[Any]:
        with _read_errors():
            yield from self._cursor


class PostgresReadConnection:
    """
    A fleet store opened for reading: one read-only, repeatable-read transaction,
    with ``sqlite3.Connection``'s ``execute``. Made by ``connect_store_read_only``.
    """

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]], url: StoreUrl) -> None:
        self._conn = conn
        self.url = url
        self._names = itertools.count(1)

    def execute(self, sql: str, parameters: Sequence[object] = (), /) -> PostgresRows:
        """
        Run one of the readers' queries (``?`` placeholders); a scan streams from a
        server-side cursor.

        Raises:
            PostgresReadError: PostgreSQL failed.
        """
        query = to_postgres_sql(sql)
        with _read_errors():
            if is_scan(sql):
                cursor = self._conn.cursor(name=f"callward_read_{next(self._names)}")
                cursor.itersize = FETCH_ROWS
                cursor.execute(query, tuple(parameters))
                return PostgresRows(cursor)
            return PostgresRows(self._conn.execute(query, tuple(parameters)))

    def has_table(self, name: str) -> bool:
        """
        Whether the store's schema holds the table ``name``.

        Raises:
            PostgresReadError: PostgreSQL failed.
        """
        row = self.execute("SELECT to_regclass(?) IS NOT NULL", (name,)).fetchone()
        return bool(row and row[0])

    def close(self) -> None:
        """End the snapshot (nothing was written) and the connection."""
        import psycopg  # noqa: PLC0415 - on first use

        with contextlib.suppress(psycopg.Error):  # a broken connection has nothing to end
            self._conn.rollback()
        self._conn.close()

    def check_store(self) -> None:
        """
        Raises:
            UnreadableDatabase: Not a callward fleet audit store this code can read.
            PostgresReadError: PostgreSQL failed.
        """
        where = self.url.url
        if not self.has_table("callward_schema"):
            raise UnreadableDatabase(f"{where} is not a callward fleet audit store (no schema)")
        row = self.execute(
            "SELECT version FROM callward_schema WHERE component = ?", (COMPONENT,)
        ).fetchone()
        if row is None or not 1 <= int(row[0]) <= len(MIGRATIONS):
            found = "none" if row is None else str(row[0])
            raise UnreadableDatabase(
                f"{where} is not a callward fleet audit store of a version this callward "
                f"reads (audit tables at version {found}, this callward knows "
                f"{len(MIGRATIONS)})"
            )
        columns = tuple(
            name for (name,) in self.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = "
                "current_schema() AND table_name = 'records' ORDER BY ordinal_position"
            ).fetchall()
        )
        if columns != COLUMNS:
            raise UnreadableDatabase(f"{where}: the records table is not callward's")


def connect_store_read_only(url: StoreUrl) -> PostgresReadConnection:
    """
    Open a fleet's store for reading, in one read-only, repeatable-read snapshot.

    Raises:
        UnreadableDatabase: The server cannot be reached or refused the sign-in, or
            the database is not a callward fleet audit store.
    """
    import psycopg  # noqa: PLC0415 - on first use

    try:
        conn = connect(url, application_name=APPLICATION_NAME)
    except psycopg.Error as exc:
        raise UnreadableDatabase(
            f"{url.url} cannot be opened as a fleet audit store ({describe(exc)})"
        ) from exc
    try:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        reader = PostgresReadConnection(conn, url)
        reader.check_store()
    except PostgresReadError as exc:
        conn.close()
        raise UnreadableDatabase(
            f"{url.url} cannot be read as a fleet audit store ({exc.postgres_reason})"
        ) from exc
    except BaseException:
        conn.close()
        raise
    return reader


__all__ = [
    "APPLICATION_NAME",
    "FETCH_ROWS",
    "PostgresReadConnection",
    "PostgresReadError",
    "PostgresRows",
    "connect_store_read_only",
    "is_scan",
    "to_postgres_sql",
]
