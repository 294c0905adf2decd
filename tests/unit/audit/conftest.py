"""Fixtures for the audit tests: real Ed25519 keys and real SQLite files under tmp_path."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from callward.audit import FileSigner, SQLiteAuditStore

START = datetime(2026, 11, 25, 8, 0, 0, tzinfo=UTC)


class StepClock:
    """A clock that starts at ``START`` and moves one millisecond per reading."""

    def __init__(self, start: datetime = START, step: timedelta = timedelta(milliseconds=1)):
        self.now = start
        self.step = step

    def __call__(self) -> datetime:
        self.now += self.step
        return self.now


@pytest.fixture(name="signer")
def _signer() -> FileSigner:
    """A signer with a fresh Ed25519 key, held in memory."""
    return FileSigner(Ed25519PrivateKey.generate())


@pytest.fixture(name="clock")
def _clock() -> StepClock:
    return StepClock()


@pytest.fixture(name="db")
def _db(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture(name="sql")
def _sql(db: Path) -> Callable[..., list[tuple[object, ...]]]:
    """Run one statement on the database file outside the store, as anyone with the file can."""

    def sql(statement: str, *params: object) -> list[tuple[object, ...]]:
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            return conn.execute(statement, params).fetchall()
        finally:
            conn.close()

    return sql


@pytest.fixture(name="store")
def _store(db: Path, signer: FileSigner, clock: StepClock) -> Iterator[SQLiteAuditStore]:
    """An open store on a new file, closed after the test."""
    with SQLiteAuditStore(db, signer, clock=clock) as store:
        yield store


@pytest.fixture(name="fill")
def _fill(store: SQLiteAuditStore) -> Callable[[int], None]:
    """Append ``n`` records of alternating kinds to the store."""

    def fill(n: int) -> None:
        for i in range(n):
            kind = "call.authorized" if i % 2 == 0 else "call.completed"
            store.append(kind, {"call_id": f"c{i // 2}", "i": i, "note": "é ✓"})

    return fill
