"""
PostgreSQL for a fleet: the store's URL, connections, and versioned migrations.

Every part that keeps fleet state in PostgreSQL (the audit log, the policy's state,
anomalies, the tool registry, MCP pins, the replicas' registry) builds on this one
module, so that they name the server, sign in, migrate and fail the same way.

Invariants:

- A password never sits in a URL: ``StoreUrl.parse`` refuses one. libpq finds it in
  ``PGPASSWORD`` or a password file (``PGPASSFILE``, ``~/.pgpass``, or the store's
  ``password_file``), which libpq itself refuses unless it is 0600. So no URL that
  callward prints, logs or records can hold a secret.
- Every connection runs with ``synchronous_commit = on``: a commit returns only once
  its WAL is flushed on the server, whatever the server's default.
- ``migrate`` applies a component's schema steps in one transaction under a
  transaction-scoped advisory lock: two replicas starting at once migrate one after
  the other, the second finds nothing to do, and a failed step leaves the version
  where it was.
- A pooled connection is checked without a round trip when it is handed out: only
  one whose socket has something to say while idle (the server's goodbye, an EOF) is
  tested with a query, and dropped when broken. A connection that breaks while in use
  is dropped when it returns (psycopg_pool discards one in a BAD state), and
  ``retry_once_on_broken_connection`` runs a read, or the part of a write before its
  COMMIT, once more on another connection; never a COMMIT, whose outcome is unknown.
- psycopg is imported on first use: the offline verifier and every SQLite-only
  command never load it.
"""

from __future__ import annotations

import contextlib
import select
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NoReturn, TypeVar

from callward.core.errors import CallwardError, ConfigurationError

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

    Connection = psycopg.Connection[tuple[object, ...]]
    Pool = psycopg_pool.ConnectionPool[Connection]

T = TypeVar("T")

#: The URL schemes a store URL may have.
SCHEMES: Final = ("postgresql://", "postgres://")
#: The key of the one advisory lock every callward migration takes (``b"cwmigrat"``).
MIGRATION_LOCK: Final = 0x63776D6967726174
# Keys libpq reads from a URL that must not carry a secret.
_SECRET_KEYS: Final = frozenset({"password", "sslpassword"})
# SQLSTATE classes and codes, for errors a reader can act on.
_DISK_FULL: Final = "53100"
_CONNECTION_CLASS: Final = "08"
_SHUTDOWN_CODES: Final = frozenset({"57P01", "57P02", "57P03"})
_RECONNECT_SECONDS: Final = 30.0

_SCHEMA_TABLE: Final = """
CREATE TABLE IF NOT EXISTS callward_schema (
    component TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    migrated_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


def is_store_url(text: object) -> bool:
    """Whether ``text`` names a PostgreSQL store (``postgresql://...``)."""
    return isinstance(text, str) and text.startswith(SCHEMES)


@dataclass(frozen=True, slots=True)
class StoreUrl:
    """
    Where a fleet's PostgreSQL is, without its password.

    Attributes:
        url: ``postgresql://user@host:port/database[?params]``; safe to print and log.
        password_file: A libpq password file (mode 0600) to sign in with, or None to
            let libpq use ``PGPASSWORD``, ``PGPASSFILE`` or ``~/.pgpass``.
    """

    url: str
    password_file: str | None = None

    @classmethod
    def parse(cls, text: object, *, password_file: object = None) -> StoreUrl:
        """
        A store URL from configuration or the command line.

        Raises:
            ConfigurationError: Not a ``postgresql://`` URL, unparsable, or it holds a
                password.
        """
        if not isinstance(text, str) or not is_store_url(text):
            raise ConfigurationError(
                "store.url must be a postgresql:// URL",
                remediation="write e.g. store: {url: postgresql://callward@db:5432/callward}",
            )
        from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415 - on first use

        try:
            params = conninfo_to_dict(text)
        except Exception as exc:  # psycopg.ProgrammingError, which names no secret here
            raise ConfigurationError(
                "store.url is not a valid PostgreSQL URL",
                remediation="write postgresql://USER@HOST:PORT/DATABASE",
            ) from exc
        if _SECRET_KEYS & {key for key, value in params.items() if value}:
            raise ConfigurationError(
                "store.url holds a password; callward never keeps one in a URL or file it "
                "writes",
                remediation="remove it from the URL and give it in PGPASSWORD or a 0600 "
                "password file (PGPASSFILE, ~/.pgpass or store.password_file)",
            )
        if password_file is not None and not isinstance(password_file, str):
            raise ConfigurationError("store.password_file must be a path")
        return cls(url=text, password_file=password_file)

    def __str__(self) -> str:
        return self.url

    def conninfo(self, *, application_name: str) -> str:
        """The libpq connection string: the URL, with the name and the commit setting."""
        from psycopg.conninfo import make_conninfo  # noqa: PLC0415 - on first use

        extra: dict[str, str] = {
            "application_name": application_name[:63],
            "options": "-c synchronous_commit=on",
        }
        if self.password_file is not None:
            extra["passfile"] = self.password_file
        return make_conninfo(self.url, **extra)


def describe(exc: BaseException) -> str:
    """
    What went wrong, in words safe to log and record: the error's class and SQLSTATE
    and a plain reason for the ones an operator acts on; never the server's message,
    which may quote a value.
    """
    sqlstate = getattr(exc, "sqlstate", None)
    name = type(exc).__name__
    if sqlstate == _DISK_FULL:
        return f"the database is out of space ({name}, SQLSTATE {sqlstate})"
    if sqlstate in _SHUTDOWN_CODES:
        return f"the database is shutting down or restarting ({name}, SQLSTATE {sqlstate})"
    if (sqlstate or "").startswith(_CONNECTION_CLASS) or name in {
        "OperationalError", "PoolTimeout", "TooManyRequests", "PoolClosed",
    }:
        return f"the database cannot be reached ({name})"
    return f"{name}" + (f", SQLSTATE {sqlstate}" if sqlstate else "")


def raise_as(
    error: Callable[..., CallwardError],
    what: str,
    exc: BaseException,
    *,
    url: StoreUrl | None = None,
) -> NoReturn:
    """Raise ``error`` for ``exc`` met while doing ``what`` (no secret, no value)."""
    where = f" at {url.url}" if url is not None else ""
    raise error(
        f"{what}{where}: {describe(exc)}",
        remediation="check that PostgreSQL runs and has space; callward reconnects by itself",
    ) from exc


@contextlib.contextmanager
def store_errors(
    error: Callable[..., CallwardError], what: str, *, url: StoreUrl | None = None
) -> Iterator[None]:
    """Turn any psycopg or pool failure inside the block into ``error``."""
    import psycopg  # noqa: PLC0415 - on first use
    import psycopg_pool  # noqa: PLC0415

    try:
        yield
    except (psycopg.Error, psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed, OSError) as exc:
        raise_as(error, what, exc, url=url)


def connect(
    url: StoreUrl, *, application_name: str, connect_timeout: float = 5.0, autocommit: bool = False
) -> psycopg.Connection[tuple[object, ...]]:
    """
    One connection to the store.

    Raises:
        psycopg.OperationalError: The server cannot be reached or refused the sign-in
            (callers wrap it with ``store_errors``).
    """
    import psycopg  # noqa: PLC0415 - on first use

    return psycopg.connect(
        url.conninfo(application_name=application_name),
        connect_timeout=max(1, round(connect_timeout)),
        autocommit=autocommit,
    )


def check_idle(conn: Connection) -> None:
    """
    The pool's check of a connection it is about to hand out, without a round trip in
    the common case: an idle connection's socket has nothing to read, unless the
    server said goodbye (a restart's FATAL message) or the connection was cut (EOF,
    a reset). Only then is it tested with an empty query, which raises when it is
    broken, so the pool drops it and hands out another.

    Raises:
        psycopg.OperationalError: The connection is closed or broken.
    """
    import psycopg  # noqa: PLC0415 - on first use
    import psycopg_pool  # noqa: PLC0415

    if conn.closed:
        raise psycopg.OperationalError("the connection is closed")
    if _readable(conn.fileno()):
        psycopg_pool.ConnectionPool.check_connection(conn)


def _readable(fd: int) -> bool:
    """Whether the socket ``fd`` has something to read (or hung up), without waiting."""
    poll = getattr(select, "poll", None)
    if poll is None:  # pragma: no cover - no poll() on this platform
        return bool(select.select([fd], [], [fd], 0)[0])
    poller = poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def pool(
    url: StoreUrl,
    *,
    application_name: str,
    max_size: int = 8,
    timeout: float = 5.0,
    autocommit: bool = False,
    configure: Callable[[Connection], None] | None = None,
) -> Pool:
    """
    A pool of connections that heals itself: a connection found broken, when it is
    handed out (``check_idle``) or when it comes back, is dropped and a new one made,
    so a replica serves again once the server is back, without a restart. Opened at
    once, waiting for no connection (a server down at start is reported by the first
    use, not here).

    Args:
        autocommit: Connections in autocommit mode: a single statement is one round
            trip (no BEGIN, no COMMIT); ``conn.transaction()`` still makes a
            transaction of several.
        configure: Called once on each new connection, for session settings
            (``SET lock_timeout ...``); a transaction it leaves open is committed.
            ``synchronous_commit = on`` comes from the connection string, whatever
            ``configure`` does.
    """
    import psycopg_pool  # noqa: PLC0415 - on first use

    def configured(conn: Connection) -> None:
        if configure is not None:
            configure(conn)
        if not conn.autocommit:
            conn.commit()

    created: Pool = psycopg_pool.ConnectionPool(
        url.conninfo(application_name=application_name),
        min_size=1,
        max_size=max_size,
        timeout=timeout,
        kwargs={"connect_timeout": max(1, round(timeout)), "autocommit": autocommit},
        configure=configured,
        check=check_idle,
        # A background attempt to refill the pool backs off and gives up after this
        # long; a later request that finds the pool empty starts a new one, so a replica
        # heals however long the server was away.
        reconnect_timeout=_RECONNECT_SECONDS,
        open=False,
        name=application_name[:63],
    )
    created.open(wait=False)
    return created


def retry_once_on_broken_connection(connections: Pool, work: Callable[[Connection], T]) -> T:
    """
    ``work(conn)`` on a pooled connection; when it fails because that connection broke
    (``psycopg.OperationalError`` with the connection now closed, e.g. the server
    restarted), once more on another connection (the pool drops the broken one).

    Only for work that may run twice: a read, or a write that does not commit inside
    ``work`` (on a connection that is not in autocommit mode; the pool's ``connection()``
    commits it after ``work`` returns). A failure during that COMMIT, whose outcome is
    unknown, is never retried; nor is any other failure, nor a second one: they
    propagate (callers turn them into their error with ``store_errors``).
    """
    import psycopg  # noqa: PLC0415 - on first use

    retries = 1
    while True:
        with connections.connection() as conn:
            try:
                return work(conn)
            except psycopg.OperationalError:
                if retries == 0 or not conn.closed:
                    raise
                retries -= 1


def migrated_pool(
    url: StoreUrl,
    *,
    component: str,
    steps: Sequence[str],
    error: Callable[..., CallwardError],
    what: str,
    application_name: str,
    max_size: int = 8,
    timeout: float = 5.0,
    autocommit: bool = False,
    configure: Callable[[Connection], None] | None = None,
) -> Pool:
    """
    A store's pool (``pool``), its ``component``'s tables migrated before it is handed
    out; closed again if that fails, so the next use tries afresh.

    Raises:
        ``error``: The server cannot be reached, or its tables were migrated by a newer
            callward (a ``ConfigurationError`` kept as it is when ``error`` is that).
    """
    opened = pool(url, application_name=application_name, max_size=max_size,
                  timeout=timeout, autocommit=autocommit, configure=configure)
    try:
        with store_errors(error, what, url=url), opened.connection() as conn:
            migrate(conn, component, steps)
    except ConfigurationError as exc:
        opened.close()
        if error is ConfigurationError:
            raise
        raise error(exc.message, exc.remediation) from exc  # a newer callward's tables
    except BaseException:
        opened.close()
        raise
    return opened


def migrate(conn: psycopg.Connection[tuple[object, ...]], component: str,
            steps: Sequence[str]) -> int:
    """
    Bring ``component``'s tables to ``len(steps)``: apply each step not yet applied, in
    order, in one transaction, under the migration lock. Never runs a step twice;
    refuses a database whose version is newer than this code knows.

    Returns:
        The version the component is at now.

    Raises:
        ConfigurationError: The database was migrated by a newer callward.
        psycopg.Error: A step failed (nothing of this call is kept).
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(_SCHEMA_TABLE)
        row = conn.execute(
            "SELECT version FROM callward_schema WHERE component = %s", (component,)
        ).fetchone()
        version = 0 if row is None else int(str(row[0]))
        if version > len(steps):
            raise ConfigurationError(
                f"the store's {component} tables are at version {version}; this callward "
                f"knows {len(steps)}",
                remediation="upgrade this replica to the callward version the fleet runs",
            )
        for step in steps[version:]:
            conn.execute(step.encode())  # steps are constants of ours, never built from input
        if version < len(steps):
            conn.execute(
                "INSERT INTO callward_schema (component, version) VALUES (%s, %s) "
                "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version, "
                "migrated_at = now()",
                (component, len(steps)),
            )
    return len(steps)


__all__ = [
    "MIGRATION_LOCK",
    "SCHEMES",
    "StoreUrl",
    "check_idle",
    "connect",
    "describe",
    "is_store_url",
    "migrate",
    "migrated_pool",
    "pool",
    "raise_as",
    "retry_once_on_broken_connection",
    "store_errors",
]
