"""The SQLite audit store: durable, chained appends from threads and processes."""



from __future__ import annotations

import multiprocessing
import os
import shutil
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from callward.audit import FileSigner, SQLiteAuditStore, verify
from callward.audit._sqlite import APPLICATION_ID
from callward.core import AuditLog, AuditUnavailable, KeyId

GENESIS = "0" * 64


class StubSigner:
    """A signer whose key service is unreachable (an HSM or KMS cannot run here)."""

    def __init__(self, inner: FileSigner, *, fail: bool = True) -> None:
        self.inner = inner
        self.fail = fail

    @property
    def key_id(self) -> KeyId:
        return self.inner.key_id

    def sign(self, data: bytes) -> bytes:
        if self.fail:
            raise ConnectionRefusedError("key service unreachable")
        return self.inner.sign(data)

    def public_key_pem(self) -> bytes:
        return self.inner.public_key_pem()


def _append_from_process(db: str, keys_dir: str, n: int, worker: int, barrier) -> None:
    """Child process: open its own store on the shared file and append ``n`` records."""
    with SQLiteAuditStore(Path(db), FileSigner.load_or_create(Path(keys_dir))) as store:
        barrier.wait(timeout=60)
        for i in range(n):
            store.append("call.completed", {"worker": worker, "i": i})


class TestAppend:
    def test_constructor_does_no_io(self, tmp_path, signer):
        """Building a store touches nothing; open() creates the file."""
        db = tmp_path / "audit.db"

        store = SQLiteAuditStore(db, signer)

        assert not db.exists()
        store.open()
        store.close()
        assert db.exists()

    def test_appends_are_numbered_and_chained(self, store):
        """Seqs start at 1 and grow by one; each prev is the previous record's hash."""
        first = store.append("call.authorized", {"call_id": "c1"})
        second = store.append("call.completed", {"call_id": "c1", "outcome": "ok"})
        third = store.append("call.denied", {"call_id": "c2"})

        assert [1, 2, 3] == [first.seq, second.seq, third.seq]
        assert GENESIS == first.prev
        assert first.record_hash == second.prev
        assert second.record_hash == third.prev
        assert {"call_id": "c1", "outcome": "ok"} == second.body

    def test_records_read_back_exactly_as_appended(self, store):
        """last, get and records return the records append returned, byte for byte."""
        appended = [store.append("call.completed", {"i": i, "text": "ünï"}) for i in range(5)]

        assert appended[-1] == store.last()
        assert appended[2] == store.get(3)
        assert appended == list(store.records())
        assert appended[3:] == list(store.records(start=4))
        assert 5 == store.count()

    def test_empty_store(self, store):
        """An empty store has no last record, no records, a count of 0."""
        assert None is store.last()
        assert None is store.get(1)
        assert [] == list(store.records())
        assert 0 == store.count()

    def test_records_streams_past_one_page(self, store):
        """records() pages through the table and yields every seq once, in order."""
        for i in range(1100):
            store.append_at("call.completed", {"i": i}, now=datetime(2026, 11, 25, tzinfo=UTC))

        assert list(range(1, 1101)) == [record.seq for record in store.records()]
        assert list(range(1000, 1101)) == [record.seq for record in store.records(start=1000)]

    def test_timestamps_come_from_the_injected_clock(self, store):
        """append stamps each record with the clock's reading, in UTC with microseconds."""
        record = store.append("call.completed", {})

        assert "2026-11-25T08:00:00.001000Z" == record.ts

    def test_append_at_takes_the_time_given(self, store):
        """append_at, the twin tests call, records the instant it is given."""
        record = store.append_at(
            "call.completed", {}, now=datetime(2026, 11, 25, 9, 30, 0, 7, tzinfo=UTC)
        )

        assert "2026-11-25T09:30:00.000007Z" == record.ts

    def test_clock_stepping_back_holds_the_head_time(self, store, signer):
        """A clock that steps back cannot make ts go backwards: the head's ts is kept."""
        later = datetime(2026, 11, 25, 9, tzinfo=UTC)
        store.append_at("call.authorized", {}, now=later)

        with capture_logs() as logs:
            record = store.append_at("call.completed", {}, now=later - timedelta(seconds=5))

        assert "2026-11-25T09:00:00.000000Z" == record.ts
        assert ["audit_clock_went_backwards"] == [entry["event"] for entry in logs]
        assert 2 == verify(store.path, signer.public_key()).records

    def test_writer_that_waited_for_the_lock_is_held_at_head_quietly(self, store):
        """A ts a few milliseconds behind the head (a wait for the lock) is not a warning."""
        later = datetime(2026, 11, 25, 9, tzinfo=UTC)
        store.append_at("call.authorized", {}, now=later)

        with capture_logs() as logs:
            record = store.append_at("call.completed", {}, now=later - timedelta(milliseconds=3))

        assert "2026-11-25T09:00:00.000000Z" == record.ts
        assert [("audit_ts_held_at_head", "debug")] == [
            (entry["event"], entry["log_level"]) for entry in logs
        ]

    @pytest.mark.parametrize("kind", ["completed", "Call.completed", "call.", "call completed"])
    def test_malformed_kind_is_a_value_error(self, store, kind):
        """A malformed kind is the caller's bug, refused before anything is written."""
        with pytest.raises(ValueError, match="kind"):
            store.append(kind, {})

        assert 0 == store.count()

    def test_naive_time_is_refused(self, store):
        """append_at refuses a naive datetime instead of guessing its zone."""
        with pytest.raises(ValueError, match="timezone-aware"):
            store.append_at("call.completed", {}, now=datetime(2026, 11, 25))

    def test_store_is_an_audit_log(self, store):
        """SQLiteAuditStore satisfies callward.core.AuditLog, which the gateway is handed."""
        audit: AuditLog = store

        assert 1 == audit.append("call.denied", {"call_id": "c1"}).seq

    def test_file_is_wal_with_full_sync_and_marked_as_callward(self, store, sql):
        """The file is in WAL mode, appends sync fully, and the header names callward."""
        store.append("call.completed", {})

        assert [("wal",)] == sql("PRAGMA journal_mode")
        assert [(APPLICATION_ID,)] == sql("PRAGMA application_id")
        assert [(2,)] == store._conn.execute("PRAGMA synchronous").fetchall()  # FULL

    def test_reopened_store_continues_the_chain(self, db, signer, store):
        """Records survive close; a new store on the file appends after the head."""
        first = store.append("call.authorized", {})
        store.close()

        with SQLiteAuditStore(db, signer) as reopened:
            second = reopened.append("call.completed", {})

        assert 2 == second.seq
        assert first.record_hash == second.prev


class TestFailedWrites:
    def test_body_that_is_not_json_fails_and_does_not_advance(self, store):
        """A NaN in the body is audit_unavailable; nothing is written; the next seq is next."""
        store.append("call.authorized", {})

        with pytest.raises(AuditUnavailable) as caught:
            store.append("call.completed", {"value": float("nan")})

        assert "audit_unavailable" == caught.value.kind
        assert 1 == store.count()
        assert 2 == store.append("call.completed", {}).seq

    def test_write_blocked_by_another_writer_fails_and_does_not_advance(self, db, signer, sql):
        """When another connection holds the write lock past the timeout, append fails."""
        with SQLiteAuditStore(db, signer, busy_timeout_seconds=0.05) as store:
            first = store.append("call.authorized", {})
            other = sqlite3.connect(db, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            try:
                with pytest.raises(AuditUnavailable, match="SQLITE_BUSY"):
                    store.append("call.completed", {})
            finally:
                other.execute("ROLLBACK")
                other.close()

            second = store.append("call.completed", {})

        assert 2 == second.seq
        assert first.record_hash == second.prev
        assert [(2,)] == sql("SELECT count(*) FROM records")

    def test_signer_failure_fails_the_append_and_does_not_advance(self, db, signer):
        """A signer that cannot sign makes the append audit_unavailable, writing nothing."""
        stub = StubSigner(signer)
        with SQLiteAuditStore(db, stub) as store:
            with pytest.raises(AuditUnavailable, match="ConnectionRefusedError"):
                store.append("call.authorized", {})
            stub.fail = False

            record = store.append("call.authorized", {})

        assert 1 == record.seq
        assert GENESIS == record.prev

    def test_closed_store_fails(self, store):
        """Appending to or reading a closed store is audit_unavailable, not a crash."""
        store.append("call.authorized", {})
        store.close()

        with pytest.raises(AuditUnavailable, match="not open"):
            store.append("call.completed", {})
        with pytest.raises(AuditUnavailable, match="not open"):
            store.last()

    def test_reopen_after_failure_continues(self, store):
        """After a failed append on a closed store, reopening continues at the next seq."""
        store.append("call.authorized", {})
        store.close()
        with pytest.raises(AuditUnavailable):
            store.append("call.completed", {})

        store.open()

        assert 2 == store.append("call.completed", {}).seq

    def test_store_in_removed_directory_fails_to_open(self, tmp_path, signer):
        """A store whose directory was removed cannot open: audit_unavailable."""
        directory = tmp_path / "home"
        directory.mkdir()
        shutil.rmtree(directory)

        with pytest.raises(AuditUnavailable, match="open"):
            SQLiteAuditStore(directory / "audit.db", signer).open()

    @pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only directories")
    def test_store_in_read_only_directory_fails_to_open(self, tmp_path, signer):
        """A store in a directory it cannot write fails to open: audit_unavailable."""
        directory = tmp_path / "ro"
        directory.mkdir()
        directory.chmod(0o500)
        try:
            with pytest.raises(AuditUnavailable):
                SQLiteAuditStore(directory / "audit.db", signer).open()
        finally:
            directory.chmod(0o700)

    def test_other_database_is_refused(self, db, signer, sql):
        """An SQLite file that is not a callward audit log is never written to."""
        sql("CREATE TABLE notes (text TEXT)")

        with pytest.raises(AuditUnavailable, match="not a callward audit database"):
            SQLiteAuditStore(db, signer).open()

        assert [("notes",)] == sql("SELECT name FROM sqlite_master")

    def test_file_that_is_not_sqlite_is_refused(self, db, signer):
        """A file that is not SQLite at all fails to open and is left untouched."""
        db.write_bytes(b"not a database" * 100)

        with pytest.raises(AuditUnavailable):
            SQLiteAuditStore(db, signer).open()

        assert b"not a database" * 100 == db.read_bytes()


class TestConcurrency:
    def test_two_threads_append_one_chain(self, store, signer):
        """Two threads x 200 appends give seqs 1..400, each once, and the log verifies."""
        barrier = threading.Barrier(2)
        seqs: list[list[int]] = [[], []]

        def work(worker: int) -> None:
            barrier.wait()
            for i in range(200):
                seqs[worker].append(store.append("call.completed", {"w": worker, "i": i}).seq)

        threads = [threading.Thread(target=work, args=(worker,)) for worker in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert list(range(1, 401)) == sorted(seqs[0] + seqs[1])
        assert 400 == verify(store.path, signer.public_key()).records

    def test_two_processes_append_one_chain(self, tmp_path):
        """Two processes x 100 appends on one file give seqs 1..200 once, and it verifies."""
        db, keys_dir = tmp_path / "audit.db", tmp_path / "keys"
        signer = FileSigner.load_or_create(keys_dir)
        with SQLiteAuditStore(db, signer):
            pass  # create the file once, before the race
        context = multiprocessing.get_context("spawn")
        barrier = context.Barrier(2)
        workers = [
            context.Process(
                target=_append_from_process, args=(str(db), str(keys_dir), 100, w, barrier)
            )
            for w in (0, 1)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)

        assert [0, 0] == [worker.exitcode for worker in workers]
        with SQLiteAuditStore(db, signer) as store:
            records = list(store.records())
        assert list(range(1, 201)) == [record.seq for record in records]
        assert [100, 100] == [
            sum(1 for record in records if record.body["worker"] == w) for w in (0, 1)
        ]
        assert 200 == verify(db, keys_dir / "audit-ed25519.pub").records
