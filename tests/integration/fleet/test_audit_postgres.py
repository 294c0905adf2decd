"""
The fleet's audit log in a real PostgreSQL: one gapless chain and one Merkle tree from
many replicas (threads and processes, each with its own key), leases that close a dead
replica's calls exactly once, and appends that fail closed while the server is away
and succeed again, on the same store, once it is back.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from callward.audit import FileSigner, PostgresAuditStore, key_id_of, open_checkpoint
from callward.audit._chain import GENESIS_PREV, check_record
from callward.audit._merkle import leaf_hash, root_from_leaf_hashes
from callward.audit._proofs import verify_receipt
from callward.audit._sqlite_format import SELECT_RECORDS, row_to_record
from callward.core import AuditUnavailable, ConfigurationError, ReceiptIssuer
from callward.core._postgres import StoreUrl
from callward.core.types import AuditRecord

WORKERS = 4
THREADS = 25
PER_THREAD = 100  # 4 processes x 25 threads x 100 = 10,000 records


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _signer(raw: bytes) -> FileSigner:
    return FileSigner(Ed25519PrivateKey.from_private_bytes(raw))


def _append_from_process(url: str, raw: bytes, worker: int, barrier: Any, results: Any) -> None:
    """One replica: THREADS threads append PER_THREAD records each, then a receipt."""
    with PostgresAuditStore(StoreUrl.parse(url), _signer(raw), checkpoint_every=500) as store:
        barrier.wait(120)
        mine: list[AuditRecord] = []

        def run(thread: int) -> None:
            for i in range(PER_THREAD):
                mine.append(store.append("call.completed", {"w": worker, "t": thread, "i": i}))

        threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        newest = max(mine, key=lambda record: record.seq)
        results.put((worker, store.commits, store.receipt_for(newest).to_json()))


def _authorize_then_wait(url: str, raw: bytes, ready: Any) -> None:
    """A replica that authorizes ten calls, completes three, and waits to be killed."""
    store = PostgresAuditStore(
        StoreUrl.parse(url), _signer(raw), lease_seconds=1.5, heartbeat_seconds=0.3
    )
    store.open()
    seqs = [store.append("call.authorized", {"call": {"id": f"c{i}"}}).seq for i in range(10)]
    for i, seq in enumerate(seqs[:3]):
        store.append("call.completed", {"call_id": f"c{i}", "authorized_seq": seq})
    ready.set()
    time.sleep(300)


def _rows(url: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql.encode(), params).fetchall()


def _check_chain(records: list[AuditRecord], keys: dict[str, Ed25519PublicKey]) -> None:
    """Every record follows the one before, and verifies with the key its key_id names."""
    prev, not_before = GENESIS_PREV, None
    for expected_seq, record in enumerate(records, start=1):
        check_record(record, public_key=keys[record.key_id], key_id=record.key_id,
                     expected_seq=expected_seq, prev=prev, not_before=not_before)
        prev, not_before = record.record_hash, record.ts


def _collect(results: Any, workers: list[Any]) -> list[Any]:
    """One result per worker; fails at once if a worker died without one."""
    collected: list[Any] = []
    deadline = time.monotonic() + 120
    while len(collected) < len(workers) and time.monotonic() < deadline:
        try:
            collected.append(results.get(timeout=0.5))
        except queue.Empty:
            crashed = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            assert not crashed, f"a worker process failed: exit codes {crashed}"
    assert len(workers) == len(collected)
    return collected


@pytest.fixture(name="url")
def _url(postgres_url: str) -> StoreUrl:
    return StoreUrl.parse(postgres_url)


@pytest.fixture(name="keys")
def _keys() -> list[Ed25519PrivateKey]:
    return [Ed25519PrivateKey.generate() for _ in range(WORKERS)]


@pytest.fixture(name="store")
def _store(url: StoreUrl, keys: list[Ed25519PrivateKey]) -> Iterator[PostgresAuditStore]:
    with PostgresAuditStore(url, FileSigner(keys[0])) as store:
        yield store


class TestPostgresAuditStore:
    def test_append_and_read_back(self, store, keys):
        """Appends read back equal, gapless, chained, with ts held when the clock steps back."""
        t0 = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
        a = store.append_at("call.denied", {"n": 1}, now=t0)
        b = store.append_at("call.denied", {"n": 2}, now=t0 - timedelta(seconds=5))
        c = store.append("call.completed", {"n": 3})

        assert [1, 2, 3] == [a.seq, b.seq, c.seq]
        assert (GENESIS_PREV, a.record_hash, b.record_hash) == (a.prev, b.prev, c.prev)
        assert a.ts == b.ts < c.ts
        assert (b, c, 3, None) == (store.get(2), store.last(), store.count(), store.get(4))
        assert [b, c] == list(store.records(2))
        _check_chain([a, b, c], {store.key_id: keys[0].public_key()})

    def test_a_second_replica_continues_the_chain_with_its_own_key(self, url, store, keys):
        """Two replicas with two keys write one chain; their checkpoints name the fleet log."""
        first = store.append("call.completed", {"by": "one"})
        with PostgresAuditStore(url, FileSigner(keys[1])) as other:
            second = other.append("call.completed", {"by": "two"})
            checkpoint = other.checkpoint()
        records = list(store.records())

        assert (2, first.record_hash) == (second.seq, second.prev)
        assert [key_id_of(keys[0].public_key()), key_id_of(keys[1].public_key())] == [
            r.key_id for r in records
        ]
        assert store.origin == other.origin
        assert store.origin.startswith("callward.fleet/")
        opened = open_checkpoint(checkpoint.note, [keys[1].public_key()], origin=store.origin)
        assert root_from_leaf_hashes([leaf_hash(r.record_bytes) for r in records]) == opened.root
        assert checkpoint == store.checkpoint()  # nothing grew: the same, latest one
        assert store.checkpoint(only_if_grown=True) is None

    def test_receipts_verify_from_memory_and_from_the_table(self, url, store, keys):
        """A receipt made from the kept proof or read from merkle_nodes verifies offline."""
        records = [store.append("call.completed", {"i": i}) for i in range(23)]
        with PostgresAuditStore(url, FileSigner(keys[1])) as other:
            from_table = [other.receipt_for(record) for record in records]
        from_memory = [store.receipt_for(record) for record in records]
        public = [keys[0].public_key(), keys[1].public_key()]

        assert from_memory == from_table
        for receipt in from_memory + from_table:
            verify_receipt(receipt.to_json(), public)

    def test_a_record_the_tree_does_not_hold_gets_no_receipt(self, url, store, keys):
        """A forged record at a real seq fails against the stored root: no receipt."""
        store.append("call.completed", {"i": 1})
        real = store.append("call.completed", {"i": 2})
        with PostgresAuditStore(url, FileSigner(keys[1])) as other:
            forged = other.append("call.completed", {"i": 3})
            forged_at_two = AuditRecord(
                seq=real.seq, ts=forged.ts, kind=forged.kind, prev=forged.prev,
                key_id=forged.key_id, body_json=forged.body_json,
                record_bytes=forged.record_bytes, record_hash=forged.record_hash,
                signature=forged.signature,
            )

            with pytest.raises(AuditUnavailable, match="does not hold record 2"):
                other.receipt_for(forged_at_two)

    def test_the_store_is_a_receipt_issuer(self, store):
        """The gateway finds receipts on the store (mypy proves it is an AuditLog)."""
        assert isinstance(store, ReceiptIssuer)

    def test_a_closed_store_refuses_appends(self, url, keys):
        """Appending to a store that is not open raises audit_unavailable."""
        store = PostgresAuditStore(url, FileSigner(keys[0]))

        with pytest.raises(AuditUnavailable) as info:
            store.append("call.completed", {})
        assert "audit_unavailable" == info.value.kind

    def test_a_fleet_has_no_key_to_rotate(self, store, keys):
        """rotate_key is refused: a fleet adds a replica with a new key instead."""
        with pytest.raises(ConfigurationError, match="own key"):
            store.rotate_key(FileSigner(keys[1]))

    def test_a_heartbeat_no_shorter_than_the_lease_is_refused(self, url, keys):
        """A lease that could expire between heartbeats is a programming error."""
        with pytest.raises(ValueError, match="heartbeat"):
            PostgresAuditStore(url, FileSigner(keys[0]), lease_seconds=1, heartbeat_seconds=1)

    def test_the_face_loads_psycopg_only_for_the_fleet_writer(self):
        """import callward.audit loads no psycopg; PostgresAuditStore loads on first use."""
        code = (
            "import sys, callward.audit\n"
            "assert 'psycopg' not in sys.modules\n"
            "from callward.audit._postgres import PostgresAuditStore as S\n"
            "assert callward.audit.PostgresAuditStore is S\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)

        assert 0 == done.returncode, done.stderr.decode()


class TestAppendTransactions:
    def test_appenders_waiting_together_share_a_commit(self, url, store, keys):
        """Sixteen threads appending at once share commits, and the chain holds."""
        commits_before = store.commits

        def work(thread: int) -> None:
            for i in range(10):
                store.append("call.completed", {"t": thread, "i": i})

        threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        records = list(store.records())

        assert 160 == len(records)
        assert store.commits - commits_before <= 40  # at least four records a commit
        _check_chain(records, {store.key_id: keys[0].public_key()})

    def test_replicas_taking_turns_write_one_chain_and_one_tree(self, url, store, keys):
        """
        A replica that appends after another one did (its kept head is stale) writes
        nothing on the stale head and appends after the real one: one gapless chain,
        one tree, calls opened on one replica and closed on another leave none pending.
        """
        written: list[AuditRecord] = []
        with PostgresAuditStore(url, FileSigner(keys[1]), checkpoint_every=7) as other:
            for turn in range(6):
                for replica in (store, other, store) if turn % 2 else (other, store):
                    for i in range(3):
                        authorized = replica.append("call.authorized", {"call": {"id": f"c{i}"}})
                        written.append(authorized)
                        closer = other if replica is store else store
                        written.append(closer.append(
                            "call.completed", {"call_id": f"c{i}", "authorized_seq": authorized.seq}
                        ))
                if turn == 3:
                    other.checkpoint()
            written.append(store.append("call.completed", {"last": True}))
            final = other.checkpoint()
        records = list(store.records())

        assert list(range(1, len(written) + 1)) == [r.seq for r in records]
        assert written == sorted(written, key=lambda r: r.seq) == records
        _check_chain(records, {store.key_id: keys[0].public_key(),
                               other.key_id: keys[1].public_key()})
        opened = open_checkpoint(final.note, [keys[1].public_key()], origin=store.origin)
        assert root_from_leaf_hashes([leaf_hash(r.record_bytes) for r in records]) == opened.root
        assert [] == _rows(url.url, "SELECT authorized_seq FROM pending_calls")
        for record in records[-5:]:
            verify_receipt(store.receipt_for(record).to_json(),
                           [keys[0].public_key(), keys[1].public_key()])

    def test_an_append_connection_the_server_ended_is_replaced_before_use(self, url, store):
        """Appends go on after the server ended the store's connections (as a restart does)."""
        first = store.append("call.completed", {"i": 1})
        ended = _rows(url.url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                      " WHERE application_name = 'callward-audit' AND pid <> pg_backend_pid()")
        deadline = time.monotonic() + 10
        while _rows(url.url, "SELECT 1 FROM pg_stat_activity WHERE application_name ="
                    " 'callward-audit'") and time.monotonic() < deadline:
            time.sleep(0.01)
        second = store.append("call.completed", {"i": 2})

        assert ended
        assert (2, first.record_hash) == (second.seq, second.prev)
        assert [first, second] == list(store.records())


class TestFleet:
    def test_four_processes_write_one_verifiable_log(self, postgres_url, keys):
        """
        4 processes x 2,500 appends, each with its own key: seqs 1..10,000 once each,
        every prev the record before, every signature good under its key_id's key,
        every checkpoint the root of its records, receipts from any replica verify.
        """
        context = multiprocessing.get_context("spawn")
        barrier, results = context.Barrier(WORKERS), context.Queue()
        workers = [
            context.Process(target=_append_from_process,
                            args=(postgres_url, _raw(keys[w]), w, barrier, results))
            for w in range(WORKERS)
        ]
        for worker in workers:
            worker.start()
        reported = _collect(results, workers)
        for worker in workers:
            worker.join(timeout=60)
        public = {key_id_of(k.public_key()): k.public_key() for k in keys}
        rows = _rows(postgres_url, f"{SELECT_RECORDS} ORDER BY seq")
        records = [row_to_record(row) for row in rows]
        checkpoints = _rows(postgres_url, "SELECT size, note FROM checkpoints ORDER BY size")
        (head,) = _rows(postgres_url, "SELECT seq, hash FROM log_head")
        leaves = [leaf_hash(record.record_bytes) for record in records]

        assert [0] * WORKERS == [worker.exitcode for worker in workers]
        assert list(range(1, 10_001)) == [record.seq for record in records]
        _check_chain(records, public)
        assert {key: 2_500 for key in public} == {
            key: sum(1 for r in records if r.key_id == key) for key in public
        }
        assert (10_000, records[-1].record_hash) == head
        assert all(commits < 2_500 for _, commits, _ in reported)  # group commit batched
        origin = open_checkpoint(checkpoints[-1][1], public.values()).origin
        for size, note in checkpoints:
            opened = open_checkpoint(note, public.values(), origin=origin)
            assert root_from_leaf_hashes(leaves[:size]) == opened.root
        for _, _, receipt in reported:
            verify_receipt(receipt, public.values())
        with PostgresAuditStore(StoreUrl.parse(postgres_url), FileSigner(keys[0])) as reader:
            for record in (records[0], records[4_999], records[-1]):
                verify_receipt(reader.receipt_for(record).to_json(), public.values())

    def test_a_killed_replicas_calls_are_interrupted_exactly_once(self, url, keys):
        """
        SIGKILL a replica with open calls: its lease lapses by the database's clock,
        and two replicas recovering at once write one call.interrupted per open call.
        """
        context = multiprocessing.get_context("spawn")
        ready = context.Event()
        child = context.Process(target=_authorize_then_wait, args=(url.url, _raw(keys[3]), ready))
        child.start()
        assert ready.wait(60)
        settings = {"lease_seconds": 3.0, "heartbeat_seconds": 1.0}
        with (
            PostgresAuditStore(url, FileSigner(keys[0]), **settings) as a,
            PostgresAuditStore(url, FileSigner(keys[1]), **settings) as b,
        ):
            while_alive = a.recover_interrupted()
            os.kill(child.pid, signal.SIGKILL)
            child.join(30)
            time.sleep(2.0)  # past the 1.5 s lease
            start = threading.Barrier(2)
            recovered: dict[str, list[AuditRecord]] = {}

            def recover(name: str, store: PostgresAuditStore) -> None:
                start.wait()
                recovered[name] = store.recover_interrupted()

            threads = [threading.Thread(target=recover, args=item) for item in (("a", a), ("b", b))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            again = a.recover_interrupted() + b.recover_interrupted()
            records = list(a.records())
        authorized = [r.seq for r in records if r.kind == "call.authorized"]
        interrupted = [r.body["authorized_seq"] for r in records if r.kind == "call.interrupted"]
        by_recovery = [r.body["authorized_seq"] for r in recovered["a"] + recovered["b"]]

        assert [] == while_alive
        assert sorted(interrupted) == sorted(authorized[3:])
        assert sorted(by_recovery) == sorted(interrupted)
        assert [] == again
        assert [] == _rows(url.url, "SELECT * FROM pending_calls")
        assert {a.key_id, b.key_id} >= {r.key_id for r in records if r.kind == "call.interrupted"}

    def test_whichever_replica_notices_closes_a_gone_writers_calls(self, url, keys):
        """A running replica's heartbeat thread closes out a closed writer's calls by itself."""
        with PostgresAuditStore(url, FileSigner(keys[0])) as gone:
            call = gone.append("call.authorized", {"call": {"id": "left-open"}})
        with PostgresAuditStore(
            url, FileSigner(keys[1]), lease_seconds=1.0, heartbeat_seconds=0.1
        ) as watcher:
            deadline = time.monotonic() + 15
            while _rows(url.url, "SELECT 1 FROM pending_calls") and time.monotonic() < deadline:
                time.sleep(0.1)
            closed = [r for r in watcher.records() if r.kind == "call.interrupted"]

        assert [(call.seq, watcher.key_id)] == [
            (r.body["authorized_seq"], r.key_id) for r in closed
        ]


class TestServerOutage:
    def test_appends_fail_closed_while_the_server_is_down_and_resume_after(
        self, private_postgres, keys
    ):
        """
        While the server is stopped (mid-run, by crash) appends raise audit_unavailable;
        once it is back the same store appends again, and every record it reported
        written is in a chain that continues without a gap.
        """
        store = PostgresAuditStore(StoreUrl.parse(private_postgres.url), FileSigner(keys[0]))
        store.open()
        written: list[AuditRecord] = []
        failed: list[AuditUnavailable] = []

        def append_until_it_fails() -> None:
            for i in range(100_000):
                try:
                    written.append(store.append("call.completed", {"i": i}))
                except AuditUnavailable as exc:
                    failed.append(exc)
                    return

        appender = threading.Thread(target=append_until_it_fails)
        appender.start()
        while len(written) < 50 and appender.is_alive():
            time.sleep(0.01)
        private_postgres.stop("immediate")  # a crash, likely mid-transaction
        appender.join(30)
        with pytest.raises(AuditUnavailable) as info:
            store.append("call.completed", {"while": "down"})
        private_postgres.start()
        private_postgres.wait_until_answers()
        after = store.append("call.completed", {"after": "restart"})
        records = list(store.records())
        store.close()

        assert ["audit_unavailable"] * 2 == [exc.kind for exc in (*failed, info.value)]
        assert list(range(1, len(records) + 1)) == [r.seq for r in records]
        _check_chain(records, {store.key_id: keys[0].public_key()})
        stored = {r.seq: r.record_hash for r in records}
        assert all(stored[r.seq] == r.record_hash for r in [*written, after])
        assert after == records[-1]
