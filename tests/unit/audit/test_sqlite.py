"""The SQLite audit store: durable, chained appends from threads and processes."""



from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from callward.audit import FileSigner, SQLiteAuditStore, store_settings, verify
from callward.audit._checkpoint import note_key_hash, open_checkpoint, sign_checkpoint
from callward.audit._merkle import leaf_hash, root_from_leaf_hashes
from callward.audit._proofs import verify_receipt
from callward.audit._sqlite_format import APPLICATION_ID
from callward.audit._tree import root_at
from callward.audit._witness import CommandWitness, DirectoryWitness
from callward.core import (
    AuditLog,
    AuditUnavailable,
    ConfigurationError,
    KeyId,
    VerificationFailed,
)
from callward.core.gateway._config import load_config

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
        """The file is in WAL mode, authorizing appends sync fully, the header names callward."""
        store.append("call.authorized", {})

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


class StubBlockingSigner:
    """A signer whose first signature waits until ``waiting`` other appends are queued."""

    def __init__(self, inner: FileSigner, store_ref: list[SQLiteAuditStore], waiting: int):
        self.inner = inner
        self.store_ref = store_ref
        self.waiting = waiting
        self.first = True

    @property
    def key_id(self) -> KeyId:
        return self.inner.key_id

    def sign(self, data: bytes) -> bytes:
        if self.first:
            self.first = False
            deadline = time.monotonic() + 30
            group = self.store_ref[0]._group
            while len(group._queue) < self.waiting and time.monotonic() < deadline:
                time.sleep(0.001)
        return self.inner.sign(data)

    def public_key_pem(self) -> bytes:
        return self.inner.public_key_pem()


def _write_until_killed(db: str, keys_dir: str, ready) -> None:
    """Child process: authorize one call that never completes, then append from 4 threads."""
    store = SQLiteAuditStore(Path(db), FileSigner.load_or_create(Path(keys_dir)),
                             checkpoint_every=50)
    store.open()
    store.append("call.authorized", {"call": {"id": "stuck"}, "principal": "p"})

    def work(worker: int) -> None:
        for i in range(1_000_000):
            authorized = store.append("call.authorized", {"call": {"id": f"c{worker}-{i}"}})
            store.append("call.completed", {"call_id": f"c{worker}-{i}",
                                            "authorized_seq": authorized.seq})

    for worker in range(4):
        threading.Thread(target=work, args=(worker,), daemon=True).start()
    ready.set()
    time.sleep(600)


class TestGroupCommit:
    def test_appends_waiting_for_a_commit_share_the_next_one(self, db, signer):
        """Appends queued while a transaction is written go out together in the next one."""
        store_ref: list[SQLiteAuditStore] = []
        blocking = StubBlockingSigner(signer, store_ref, waiting=15)
        store = SQLiteAuditStore(db, blocking)
        store_ref.append(store)
        with store:
            threads = [
                threading.Thread(target=store.append, args=("call.completed", {"i": i}))
                for i in range(16)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

            assert 2 == store.commits
        assert 16 == verify(db, signer.public_key()).records

    def test_failed_batch_fails_every_append_in_it(self, db, signer):
        """When the shared transaction fails, every append of the batch raises."""
        with SQLiteAuditStore(db, StubSigner(signer)) as store:
            errors: list[BaseException] = []

            def work() -> None:
                try:
                    store.append("call.completed", {})
                except AuditUnavailable as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=work) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

            assert 8 == len(errors)
            assert 0 == store.count()


class TestMerkleTree:
    def test_stored_tree_has_the_root_of_the_records(self, store, fill, sql):
        """After appends the stored tree's root equals the RFC root over the record bytes."""
        fill(37)
        leaves = [leaf_hash(record.record_bytes) for record in store.records()]
        conn = sqlite3.connect(store.path)
        try:
            stored = root_at(conn, 37)
        finally:
            conn.close()

        assert root_from_leaf_hashes(leaves) == stored

    def test_receipt_proves_the_record_offline(self, store, fill, signer):
        """A receipt from the store verifies with nothing but the public key."""
        fill(11)
        record = store.get(7)

        receipt = store.receipt_for(record)
        verified = verify_receipt(receipt.to_json(), [signer.public_key()])

        assert (7, 7, record.record_hash) == (
            verified.seq, verified.tree_size, verified.record_hash
        )

    def test_damaged_tree_fails_the_receipt(self, db, signer, store, fill, sql):
        """
        A receipt read from the stored tree is never issued when that tree does not
        hold the record (a store that did not write the record reads the table).
        """
        fill(8)
        sql("UPDATE merkle_nodes SET hash = zeroblob(32) WHERE level = 1 AND idx = 2")

        with SQLiteAuditStore(db, signer) as reader, pytest.raises(
            AuditUnavailable, match="Merkle tree"
        ):
            reader.receipt_for(reader.get(8))

    def test_writer_keeps_the_proofs_of_its_records(self, db, signer, store, fill, sql):
        """
        The store that wrote a record proves it from the frontier it appended it to,
        without reading the table: the same proof as the table's, and it verifies.
        """
        fill(13)
        records = list(store.records())
        from_memory = [store.receipt_for(record) for record in records]
        with SQLiteAuditStore(db, signer) as reader:
            from_table = [reader.receipt_for(record) for record in records]
        sql("DELETE FROM merkle_nodes")

        again = store.receipt_for(records[-1])

        assert [r.proof.inclusion_proof for r in from_table] == [
            r.proof.inclusion_proof for r in from_memory
        ]
        assert from_table[-1].proof.inclusion_proof == again.proof.inclusion_proof
        for receipt in from_memory:
            verify_receipt(receipt.to_json(), [signer.public_key()])

    def test_version_1_file_is_upgraded_with_its_tree(self, db, signer, sql):
        """A log written before the tree existed gets its tree built when opened."""
        with SQLiteAuditStore(db, signer) as store:
            for i in range(5):
                store.append("call.completed", {"i": i})
        for table in ("merkle_nodes", "checkpoints", "meta", "pending_calls"):
            sql(f"DROP TABLE {table}")
        sql("PRAGMA user_version=1")

        with SQLiteAuditStore(db, signer) as store:
            store.append("call.completed", {"i": 5})
            receipt = store.receipt_for(store.get(3))

        verify_receipt(receipt.to_json(), [signer.public_key()])
        assert 1 == verify(db, signer.public_key()).checkpoints


class TestCheckpoints:
    def test_checkpoint_every_n_records_and_on_close(self, db, signer, sql):
        """Checkpoints are written at every N records and once more on close."""
        with SQLiteAuditStore(db, signer, checkpoint_every=4) as store:
            for i in range(10):
                store.append("call.completed", {"i": i})

        assert [(4,), (8,), (10,)] == sql("SELECT size FROM checkpoints ORDER BY size")
        assert 3 == verify(db, signer.public_key()).checkpoints

    def test_checkpoint_after_t_seconds_while_idle(self, db, signer, sql):
        """A log that stops growing is still checkpointed after checkpoint_seconds."""
        with SQLiteAuditStore(db, signer, checkpoint_seconds=0.05) as store:
            store.append("call.completed", {})
            deadline = time.monotonic() + 10
            while not sql("SELECT size FROM checkpoints") and time.monotonic() < deadline:
                time.sleep(0.01)

            assert [(1,)] == sql("SELECT size FROM checkpoints")

    def test_witness_directory_gets_each_checkpoint(self, tmp_path, db, signer):
        """Each checkpoint is copied to a directory witness, which keeps the latest."""
        witness = DirectoryWitness(tmp_path / "witness")
        with SQLiteAuditStore(db, signer, checkpoint_every=3, witnesses=[witness]) as store:
            for i in range(7):
                store.append("call.completed", {"i": i})
            origin = store.origin

        held = open_checkpoint(witness.path_for(origin).read_text(), [signer.public_key()])
        assert 7 == held.size

    def test_command_witness_gets_the_note_on_stdin(self, tmp_path, db, signer):
        """A command witness runs the operator's command with the checkpoint on stdin."""
        out = tmp_path / "pushed"
        witness = CommandWitness(["sh", "-c", f'cat > "{out}"'])
        with SQLiteAuditStore(db, signer, witnesses=[witness]) as store:
            store.append("call.completed", {})

        assert 1 == open_checkpoint(out.read_text(), [signer.public_key()]).size

    def test_failing_witness_never_fails_an_append(self, db, signer):
        """A witness that cannot be reached is logged; the append still succeeds."""
        witness = CommandWitness(["false"])
        with capture_logs() as logs, SQLiteAuditStore(
            db, signer, checkpoint_every=1, witnesses=[witness]
        ) as store:
            record = store.append("call.completed", {})

        assert 1 == record.seq
        assert "audit_witness_failed" in [e["event"] for e in logs]

    def test_database_rolled_back_to_an_older_copy_is_detected(self, tmp_path, db, signer):
        """Restoring an older copy of the database is caught against a witness."""
        witness_dir = tmp_path / "witness"
        with SQLiteAuditStore(db, signer, witnesses=[DirectoryWitness(witness_dir)]) as store:
            for i in range(3):
                store.append("call.completed", {"i": i})
        backup = tmp_path / "backup.db"
        shutil.copy(db, backup)
        with SQLiteAuditStore(db, signer, witnesses=[DirectoryWitness(witness_dir)]) as store:
            for i in range(3):
                store.append("call.completed", {"i": i})
        shutil.copy(backup, db)

        with pytest.raises(VerificationFailed, match="rolled back"):
            verify(db, signer.public_key(), witnesses=[witness_dir])

    def test_whole_log_rewritten_with_the_key_is_detected(self, tmp_path, db, signer):
        """Someone holding the file and the key who rewrites history is caught by a witness."""
        witness_dir = tmp_path / "witness"
        with SQLiteAuditStore(db, signer, witnesses=[DirectoryWitness(witness_dir)]) as store:
            for i in range(3):
                store.append("call.completed", {"i": i})
        db.unlink()
        with SQLiteAuditStore(db, signer) as store:
            for i in range(4):
                store.append("call.completed", {"i": i, "rewritten": True})

        with pytest.raises(VerificationFailed, match="rewritten"):
            verify(db, signer.public_key(), witnesses=[witness_dir])

    def test_truncated_log_fails_against_its_own_checkpoint(self, db, signer, sql):
        """Removing records from the end is caught by the last checkpoint."""
        with SQLiteAuditStore(db, signer) as store:
            for i in range(5):
                store.append("call.completed", {"i": i})
        sql("DELETE FROM records WHERE seq = 5")

        with pytest.raises(VerificationFailed, match="removed from the end") as caught:
            verify(db, signer.public_key())

        assert 5 == caught.value.seq

    def test_checkpoint_with_a_wrong_root_fails_at_its_size(self, db, signer, sql):
        """A stored checkpoint whose root is not the records' is reported at its size."""
        other = FileSigner(signer._private_key)
        with SQLiteAuditStore(db, signer, checkpoint_every=2) as store:
            for i in range(4):
                store.append("call.completed", {"i": i})
        note = sign_checkpoint(
            sql("SELECT value FROM meta WHERE name = 'origin'")[0][0], 2, bytes(32),
            signer=other,
            key_hash=note_key_hash(sql("SELECT value FROM meta WHERE name = 'origin'")[0][0],
                                   signer.public_key()),
        ).note
        sql("UPDATE checkpoints SET note = ? WHERE size = 2", note)

        with pytest.raises(VerificationFailed, match="checkpoint 2: its root") as caught:
            verify(db, signer.public_key())

        assert 2 == caught.value.seq


class TestKeyRotation:
    def test_rotation_verifies_across_the_boundary(self, db, signer):
        """Records before and after a rotation verify from the old key alone."""
        new = FileSigner(Ed25519PrivateKey.generate())
        with SQLiteAuditStore(db, signer, checkpoint_every=2) as store:
            store.append("call.completed", {"i": 0})
            rotation = store.rotate_key(new)
            store.append("call.completed", {"i": 1})
            last = store.append("call.completed", {"i": 2})

        verified = verify(db, signer.public_key())

        assert (signer.key_id, new.key_id) == verified.key_ids
        assert (signer.key_id, new.key_id) == (rotation.key_id, last.key_id)
        assert 4 == verified.records

    def test_key_set_accepts_either_key(self, db, signer):
        """Given both keys, a rotated log verifies too."""
        new = FileSigner(Ed25519PrivateKey.generate())
        with SQLiteAuditStore(db, signer) as store:
            store.append("call.completed", {})
            store.rotate_key(new)
            store.append("call.completed", {})

        assert 3 == verify(db, [new.public_key(), signer.public_key()]).records

    def test_old_key_after_rotation_fails(self, db, signer, sql):
        """A record signed by the old key after the rotation does not verify."""
        new = FileSigner(Ed25519PrivateKey.generate())
        with SQLiteAuditStore(db, signer) as store:
            store.rotate_key(new)
        sql("DELETE FROM meta WHERE name = 'current_key_id'")
        with SQLiteAuditStore(db, signer) as stale:
            stale.append("call.completed", {})

        with pytest.raises(VerificationFailed, match="record 2") as caught:
            verify(db, signer.public_key())

        assert 2 == caught.value.seq

    def test_store_with_the_old_key_refuses_to_append(self, db, signer):
        """Another gateway still holding the old key cannot append after a rotation."""
        new = FileSigner(Ed25519PrivateKey.generate())
        with SQLiteAuditStore(db, signer) as old, SQLiteAuditStore(db, signer) as rotating:
            rotating.rotate_key(new)

            with pytest.raises(AuditUnavailable, match="rotated"):
                old.append("call.completed", {})


class TestCrashRecovery:
    def test_killed_writer_leaves_a_verifiable_log_and_interrupted_calls(self, tmp_path):
        """
        Killing a writer mid-batch loses no committed record; its unfinished
        authorized calls get call.interrupted at the next start, each exactly once.
        """
        db, keys_dir = tmp_path / "audit.db", tmp_path / "keys"
        signer = FileSigner.load_or_create(keys_dir)
        context = multiprocessing.get_context("spawn")
        ready = context.Event()
        child = context.Process(target=_write_until_killed, args=(str(db), str(keys_dir), ready))
        child.start()
        assert ready.wait(60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            conn = sqlite3.connect(db)
            try:
                (count,) = conn.execute("SELECT count(*) FROM records").fetchone()
            finally:
                conn.close()
            if count >= 300:
                break
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)

        before = verify(db, signer.public_key())
        with SQLiteAuditStore(db, signer) as store:
            interrupted = store.recover_interrupted()
            again = store.recover_interrupted()
            records = list(store.records())
        authorized = {r.seq for r in records if r.kind == "call.authorized"}
        closed = [r.body["authorized_seq"] for r in records
                  if r.kind in ("call.completed", "call.interrupted")]

        assert before.records >= 300
        assert "stuck" in [r.body["call_id"] for r in interrupted]
        assert [] == again
        assert sorted(authorized) == sorted(closed)
        assert len(records) == verify(db, signer.public_key()).records

    def test_running_writer_calls_are_left_alone(self, db, signer):
        """A call authorized by a gateway that is still running is not interrupted."""
        with SQLiteAuditStore(db, signer) as running, SQLiteAuditStore(db, signer) as starting:
            running.append("call.authorized", {"call": {"id": "c1"}})

            assert [] == starting.recover_interrupted()


class TestSettings:
    def test_config_section_names_witnesses_and_checkpoint_policy(self, tmp_path):
        """The audit section of callward.yaml becomes the store's settings."""
        config = tmp_path / "callward.yaml"
        config.write_text(
            "tools: [tools.py]\npolicy: policy.yaml\naudit:\n  checkpoint_every: 10\n"
            "  checkpoint_seconds: 5\n  witnesses:\n    - directory: w\n"
            "    - command: [push, --log, prod]\n"
        )

        loaded = load_config(config)
        settings = store_settings(loaded.audit or {}, base=tmp_path)

        assert (10, 5.0) == (settings.checkpoint_every, settings.checkpoint_seconds)
        assert [f"dir:{tmp_path / 'w'}", "command:push"] == [w.name for w in settings.witnesses]

    def test_unknown_witness_shape_is_refused_at_load(self, tmp_path):
        """A witness that is neither a directory nor a command fails when the file loads."""
        config = tmp_path / "callward.yaml"
        config.write_text("tools: [t.py]\npolicy: p.yaml\naudit:\n  witnesses:\n    - url: x\n")

        with pytest.raises(ConfigurationError, match="audit"):
            load_config(config)


class TestWriterFiles:
    def test_lock_files_of_gone_writers_are_removed(self, db, signer):
        """Recovery removes the lock files writers that died left behind, not live ones."""
        with SQLiteAuditStore(db, signer):
            pass
        writers = db.with_name(db.name + ".writers")
        (writers / "dead-writer").write_bytes(b"")
        with SQLiteAuditStore(db, signer) as store:
            store.recover_interrupted()

            assert [store.writer_id] == [p.name for p in writers.iterdir()]


class TestStoredTreeIsVerified:
    def test_damaged_tree_table_fails_verify_at_the_checkpoint(self, db, signer, sql):
        """A stored tree that no longer gives the records' root is reported by verify."""
        with SQLiteAuditStore(db, signer, checkpoint_every=4) as store:
            for i in range(8):
                store.append("call.completed", {"i": i})
        sql("UPDATE merkle_nodes SET hash = zeroblob(32) WHERE level = 2 AND idx = 0")

        with pytest.raises(VerificationFailed, match="stored Merkle tree") as caught:
            verify(db, signer.public_key())

        assert 4 == caught.value.seq
