"""
retry_once_on_broken_connection: a read (or the part of a write before its COMMIT) runs
once more on another connection when its own broke, and nothing else is ever retried.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
import pytest

from callward.core._postgres import retry_once_on_broken_connection


class FakeConnection:
    def __init__(self) -> None:
        self.closed = False


class FakePool:
    """Hands out a new connection each time; ``fail_on_return`` fails the first return."""

    def __init__(self, *, fail_on_return: bool = False) -> None:
        self.handed: list[FakeConnection] = []
        self._fail_on_return = fail_on_return

    @contextlib.contextmanager
    def connection(self) -> Iterator[FakeConnection]:
        conn = FakeConnection()
        self.handed.append(conn)
        yield conn
        if self._fail_on_return:  # the COMMIT at the end of the block
            self._fail_on_return = False
            conn.closed = True
            raise psycopg.OperationalError("server closed the connection unexpectedly")


def breaks(conn: FakeConnection) -> None:
    conn.closed = True
    raise psycopg.OperationalError("server closed the connection unexpectedly")


def test_a_read_on_a_broken_connection_runs_once_more_on_another():
    pool = FakePool()

    def read(conn: FakeConnection) -> str:
        if len(pool.handed) == 1:
            breaks(conn)
        return "rows"

    found = retry_once_on_broken_connection(pool, read)  # type: ignore[arg-type]

    assert ("rows", 2) == (found, len(pool.handed))


def test_a_second_broken_connection_is_raised():
    pool = FakePool()

    with pytest.raises(psycopg.OperationalError):
        retry_once_on_broken_connection(pool, breaks)  # type: ignore[arg-type]
    assert 2 == len(pool.handed)


@pytest.mark.parametrize("error", [
    psycopg.errors.LockNotAvailable("lock timeout"),  # an OperationalError, connection fine
    psycopg.errors.UniqueViolation("duplicate key"),
    psycopg.errors.DiskFull("no space"),
])
def test_a_failure_on_a_working_connection_is_never_retried(error):
    pool = FakePool()

    def fails(conn: FakeConnection) -> None:
        raise error

    with pytest.raises(type(error)):
        retry_once_on_broken_connection(pool, fails)  # type: ignore[arg-type]
    assert 1 == len(pool.handed)


def test_a_failure_at_the_commit_after_the_work_is_never_retried():
    """The outcome of a COMMIT that failed is unknown: running the write again could
    apply it twice."""
    pool = FakePool(fail_on_return=True)
    runs = []

    with pytest.raises(psycopg.OperationalError):
        retry_once_on_broken_connection(pool, runs.append)  # type: ignore[arg-type]
    assert (1, 1) == (len(runs), len(pool.handed))
