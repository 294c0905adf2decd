"""Offline verification: an untouched log verifies, every kind of tampering is found."""



from __future__ import annotations

import hashlib
import shutil
import sqlite3
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from callward.audit import FileSigner, SQLiteAuditStore, VerifiedLog, key_id_of, verify
from callward.audit._chain import GENESIS_PREV, canonical_body, format_ts, seal
from callward.audit._merkle import leaf_hash, root_from_leaf_hashes
from callward.core import ConfigurationError, VerificationFailed

N = 6


@pytest.fixture(name="log")
def _log(store, fill, signer):
    """A closed log of N records and its public key."""
    fill(N)
    store.close()
    return store.path, signer.public_key()


def _failure(log, message):
    """Verify ``log``, expecting a failure whose message matches ``message``."""
    db, public_key = log
    with pytest.raises(VerificationFailed, match=message) as caught:
        verify(db, public_key)
    assert "verification_failed" == caught.value.kind
    return caught.value


COLUMNS = "ts, kind, prev, key_id, body, record, hash, signature"


def _insert(sql, record):
    """Write a sealed record straight into the table, as a forger with the file could."""
    sql(
        "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        record.seq,
        record.ts,
        record.kind,
        record.prev,
        record.key_id,
        record.body_json.decode(),
        record.record_bytes,
        record.record_hash,
        record.signature,
    )


class TestUntouchedLog:
    def test_untouched_log_verifies(self, store, fill, signer):
        """A log as the store wrote it verifies, and the result names its head."""
        fill(N)
        head = store.last()
        first = store.get(1)

        root = root_from_leaf_hashes([leaf_hash(r.record_bytes) for r in store.records()])

        verified = verify(store.path, signer.public_key())

        assert (
            VerifiedLog(
                records=N,
                head_hash=head.record_hash,
                first_ts=first.ts,
                last_ts=head.ts,
                key_id=signer.key_id,
                root_hash=root.hex(),
                key_ids=(signer.key_id,),
            )
            == verified
        )

    def test_public_key_file_is_accepted(self, tmp_path, clock):
        """The public key may be given as the path of its PEM file."""
        signer = FileSigner.load_or_create(tmp_path / "keys")
        with SQLiteAuditStore(tmp_path / "audit.db", signer, clock=clock) as store:
            store.append("call.denied", {"call_id": "c1"})

        verified = verify(tmp_path / "audit.db", tmp_path / "keys" / "audit-ed25519.pub")

        assert 1 == verified.records

    def test_empty_log_verifies_with_genesis_head(self, store, signer):
        """A log with no records verifies as zero records ending at the genesis value."""
        verified = verify(store.path, signer.public_key())

        assert VerifiedLog(0, GENESIS_PREV, None, None, signer.key_id) == verified

    def test_verify_while_the_store_is_open(self, store, fill, signer):
        """A log being written verifies up to the last committed record."""
        fill(3)

        assert 3 == verify(store.path, signer.public_key()).records

        fill(2)

        assert 5 == verify(store.path, signer.public_key()).records

    def test_verify_does_not_change_the_file(self, log):
        """Verification opens the database read-only: the file's bytes are unchanged."""
        db, public_key = log
        before = hashlib.sha256(db.read_bytes()).hexdigest()

        verify(db, public_key)

        assert before == hashlib.sha256(db.read_bytes()).hexdigest()


class TestTampering:
    @pytest.mark.parametrize(
        ("column", "value", "message"),
        [
            ("body", '{"call_id":"c9","i":2,"note":"é ✓"}', "record 3: the body column differs"),
            ("kind", "call.denied", "record 3: the kind column differs"),
            ("ts", "2026-11-25T08:00:00.003500Z", "record 3: the ts column differs"),
            ("prev", "a" * 64, "record 3: the prev column differs"),
            ("key_id", "0123456789abcdef", "record 3: the key_id column differs"),
            ("hash", "b" * 64, "record 3: the stored hash is not the SHA-256"),
            ("signature", bytes(64), "record 3: the signature does not verify"),
        ],
    )
    def test_edited_column_fails_at_its_seq(self, log, sql, column, value, message):
        """Editing one column of record 3 fails at seq 3 and names what disagrees."""
        sql(f"UPDATE records SET {column} = ? WHERE seq = 3", value)  # noqa: S608 - test

        failure = _failure(log, message)

        assert 3 == failure.seq

    def test_edited_record_bytes_fail_at_their_seq(self, log, sql):
        """Changing the signed bytes themselves breaks the stored hash at that seq."""
        (record,) = sql("SELECT record FROM records WHERE seq = 3")[0]
        sql("UPDATE records SET record = ? WHERE seq = 3", record.replace(b'"i":2', b'"i":7'))

        failure = _failure(log, "record 3: the stored hash is not the SHA-256")

        assert 3 == failure.seq

    def test_edited_record_with_recomputed_hash_fails_the_signature(self, log, sql):
        """An editor who also recomputes the hash still cannot sign: the signature fails."""
        (record,) = sql("SELECT record FROM records WHERE seq = 3")[0]
        forged = record.replace(b'"i":2', b'"i":7')
        sql(
            "UPDATE records SET record = ?, body = ?, hash = ? WHERE seq = 3",
            forged,
            '{"call_id":"c1","i":7,"note":"é ✓"}',
            hashlib.sha256(forged).hexdigest(),
        )

        failure = _failure(log, "record 3: the signature does not verify")

        assert 3 == failure.seq

    def test_deleted_middle_row_fails_at_the_next_seq(self, log, sql):
        """Deleting record 3 leaves a gap that fails at seq 4, naming the missing record."""
        sql("DELETE FROM records WHERE seq = 3")

        failure = _failure(log, "record 3 is missing: seq 4 follows seq 2")

        assert 4 == failure.seq

    def test_deleted_first_row_fails_at_the_next_seq(self, log, sql):
        """Deleting record 1 fails at seq 2: the log does not start at 1."""
        sql("DELETE FROM records WHERE seq = 1")

        failure = _failure(log, "record 1 is missing: the log starts at seq 2")

        assert 2 == failure.seq

    def test_deleted_and_renumbered_rows_fail_where_the_numbers_moved(self, log, sql):
        """Closing the gap by renumbering fails at the first moved row: its signed seq differs."""
        sql("DELETE FROM records WHERE seq = 3")
        for seq in range(4, N + 1):
            sql("UPDATE records SET seq = ? WHERE seq = ?", seq - 1, seq)

        failure = _failure(log, "record 3: the signed record says seq 4")

        assert 3 == failure.seq

    def test_swapped_rows_fail_at_the_first_of_them(self, log, sql):
        """Swapping the contents of rows 2 and 5 fails at seq 2, saying the records moved."""
        two = sql(f"SELECT {COLUMNS} FROM records WHERE seq = 2")[0]  # noqa: S608 - test
        five = sql(f"SELECT {COLUMNS} FROM records WHERE seq = 5")[0]  # noqa: S608 - test
        assignments = ", ".join(f"{name} = ?" for name in COLUMNS.split(", "))
        sql(f"UPDATE records SET {assignments} WHERE seq = 2", *five)  # noqa: S608 - test
        sql(f"UPDATE records SET {assignments} WHERE seq = 5", *two)  # noqa: S608 - test

        failure = _failure(log, "record 2: the signed record says seq 5.*moved or swapped")

        assert 2 == failure.seq

    def test_inserted_row_fails_at_the_inserted_seq(self, log, sql, signer):
        """A validly signed record slipped in where one is expected breaks prev at its seq."""
        forged = seal(
            seq=N + 1,
            ts="2026-11-25T09:00:00.000000Z",
            kind="call.completed",
            prev="c" * 64,
            body_json=canonical_body({"call_id": "c99"}),
            signer=signer,
        )
        _insert(sql, forged)

        failure = _failure(log, f"record {N + 1}: prev is not the hash of record {N}")

        assert N + 1 == failure.seq

    def test_signed_ts_going_backwards_fails(self, store, sql, signer):
        """Even validly signed, a record whose ts is before its predecessor's fails."""
        first = store.append("call.authorized", {})
        forged = seal(
            seq=2,
            ts=format_ts(datetime(2020, 1, 1, tzinfo=UTC)),
            kind="call.completed",
            prev=first.record_hash,
            body_json=b"{}",
            signer=signer,
        )
        _insert(sql, forged)

        with pytest.raises(VerificationFailed, match="goes back") as caught:
            verify(store.path, signer.public_key())

        assert 2 == caught.value.seq

    def test_wrong_public_key_fails_at_seq_1(self, log):
        """Another key's public half fails at the first record, naming both key ids."""
        db, _ = log
        other = Ed25519PrivateKey.generate().public_key()

        with pytest.raises(VerificationFailed, match=f"has key id {key_id_of(other)}") as caught:
            verify(db, other)

        assert 1 == caught.value.seq

    def test_log_re_signed_with_another_key_fails_under_the_real_key(self, log, sql):
        """An attacker who re-signs everything with their own key is caught by the real key."""
        db, public_key = log
        attacker = FileSigner(Ed25519PrivateKey.generate())
        sql("DELETE FROM records")
        with SQLiteAuditStore(db, attacker) as store:
            store.append("call.completed", {"call_id": "c1", "outcome": "ok"})

        with pytest.raises(VerificationFailed, match="signed under key id") as caught:
            verify(db, public_key)

        assert 1 == caught.value.seq


class TestNotALog:
    def test_missing_file_fails_without_a_seq(self, tmp_path, signer):
        """A missing database is a failed verification of the log as a whole."""
        with pytest.raises(VerificationFailed, match="does not exist") as caught:
            verify(tmp_path / "absent.db", signer.public_key())

        assert None is caught.value.seq

    def test_file_that_is_not_sqlite_fails_without_a_seq(self, tmp_path, signer):
        """A file that is not SQLite fails as a whole."""
        db = tmp_path / "audit.db"
        db.write_bytes(b"GIF89a" + bytes(4096))

        with pytest.raises(VerificationFailed, match="cannot be opened") as caught:
            verify(db, signer.public_key())

        assert None is caught.value.seq

    def test_other_sqlite_database_fails_without_a_seq(self, db, sql, signer):
        """An SQLite database that is not a callward log fails as a whole."""
        sql("CREATE TABLE records (seq INTEGER PRIMARY KEY, text TEXT)")

        with pytest.raises(VerificationFailed, match="not a callward audit database") as caught:
            verify(db, signer.public_key())

        assert None is caught.value.seq

    def test_public_key_path_that_is_not_a_key_is_a_configuration_error(self, log, tmp_path):
        """A public key file that is not a key is the operator's mistake, not tampering."""
        db, _ = log
        bogus = tmp_path / "bogus.pub"
        bogus.write_text("hello")

        with pytest.raises(ConfigurationError):
            verify(db, bogus)


@pytest.fixture(name="long_log", scope="module")
def _long_log(tmp_path_factory):
    """A pristine log of 2,500 records (three signature batches) and its public key."""
    directory = tmp_path_factory.mktemp("long")
    signer = FileSigner(Ed25519PrivateKey.generate())
    with SQLiteAuditStore(directory / "audit.db", signer) as store:
        for i in range(2500):
            store.append("call.completed", {"call_id": f"c{i}", "i": i})
    return directory / "audit.db", signer.public_key()


class TestWorkers:
    @pytest.fixture(name="copy")
    def _copy(self, long_log, tmp_path):
        """A copy of the long log to tamper with, and a way to run statements on it."""
        db = tmp_path / "audit.db"
        shutil.copyfile(long_log[0], db)

        def sql(statement, *params):
            conn = sqlite3.connect(db, isolation_level=None)
            try:
                conn.execute(statement, params)
            finally:
                conn.close()

        return db, sql

    def _outcomes(self, db, public_key):
        """What verify says with one process and with two workers."""
        outcomes = []
        for workers in (1, 2):
            try:
                outcomes.append(verify(db, public_key, workers=workers))
            except VerificationFailed as failure:
                outcomes.append((failure.seq, failure.message))
        return outcomes

    def test_workers_verify_an_untouched_log_alike(self, long_log):
        """Two worker processes reach the same result as one process."""
        one, two = self._outcomes(*long_log)

        assert 2500 == one.records
        assert one == two

    @pytest.mark.parametrize(
        ("statements", "seq", "message"),
        [
            (["UPDATE records SET signature = zeroblob(64) WHERE seq = 1500"], 1500, "signature"),
            (["UPDATE records SET body = '{}' WHERE seq = 1500"], 1500, "body column"),
            (
                [
                    "UPDATE records SET signature = zeroblob(64) WHERE seq = 1100",
                    "DELETE FROM records WHERE seq = 2000",
                ],
                1100,
                "signature",
            ),
            (
                [
                    "UPDATE records SET key_id = 'ffffffffffffffff' WHERE seq = 1500",
                    "UPDATE records SET signature = zeroblob(64) WHERE seq = 1500",
                ],
                1500,
                "signed under key id ffffffffffffffff",
            ),
            (["DELETE FROM records WHERE seq = 2"], 3, "record 2 is missing"),
        ],
        ids=["signature", "body", "signature-before-gap", "signature-before-column", "gap"],
    )
    def test_workers_report_the_same_first_failure(self, copy, long_log, statements, seq, message):
        """With workers, the failure reported is the same first failure, same seq and message."""
        db, sql = copy
        for statement in statements:
            sql(statement)

        one, two = self._outcomes(db, long_log[1])

        assert seq == one[0]
        assert message in one[1]
        assert one == two

    def test_auto_uses_this_process_for_a_short_log(self, log):
        """workers="auto" verifies a short log without starting processes."""
        db, public_key = log

        assert N == verify(db, public_key, workers="auto").records

    def test_workers_below_one_are_refused(self, log):
        """Zero or negative workers is a caller's mistake."""
        with pytest.raises(ValueError, match="workers"):
            verify(log[0], log[1], workers=0)


_READ_COLUMN = {
    "record": "SELECT record FROM records WHERE seq = 3",
    "signature": "SELECT signature FROM records WHERE seq = 3",
}
_WRITE_COLUMN = {
    "record": "UPDATE records SET record = ? WHERE seq = 3",
    "signature": "UPDATE records SET signature = ? WHERE seq = 3",
}


class TestEverySingleByte:
    @pytest.mark.parametrize("column", ["record", "signature"])
    def test_any_changed_byte_of_a_record_or_signature_fails_at_its_seq(
        self, tmp_path, log, column
    ):
        """Flipping any one byte of record 3's signed bytes or signature fails at seq 3."""
        db, public_key = log
        conn = sqlite3.connect(db)
        try:
            (original,) = conn.execute(_READ_COLUMN[column]).fetchone()
        finally:
            conn.close()
        missed = []
        for i in range(len(original)):
            copy = tmp_path / f"copy-{column}-{i}.db"
            shutil.copy(db, copy)
            changed = original[:i] + bytes([original[i] ^ 0x20]) + original[i + 1 :]
            conn = sqlite3.connect(copy)
            try:
                conn.execute(_WRITE_COLUMN[column], (changed,))
                conn.commit()
            finally:
                conn.close()
            try:
                verify(copy, public_key)
            except VerificationFailed as failure:
                if failure.seq != 3 or "record 3" not in failure.message:
                    missed.append((i, failure.seq, failure.message))
            else:
                missed.append((i, None, "verified"))
            copy.unlink()

        assert [] == missed
