"""
When appends are fsynced: ``call.authorized`` before the call runs, the records after it
(completed, denied, rejected) with the next fsynced commit, a flush, a checkpoint or close.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from callward.audit import FileSigner, SQLiteAuditStore, store_settings, verify_receipt
from callward.audit._merkle import leaf_hash, root_from_leaf_hashes
from callward.audit._sqlite import DEFERRED_SYNC_KINDS
from callward.audit._tree import root_at
from callward.core import (
    ConfigurationError,
    Execution,
    ResourceLimits,
    Sha256Hex,
    ToolCall,
    ToolRegistry,
    ToolSpec,
    Usage,
    canonical_bytes,
)
from callward.core.gateway import Gateway
from callward.core.gateway._config import example_config_path, load_config
from callward.policies import Policy

FULL, NORMAL = 2, 1


def _synchronous(store: SQLiteAuditStore) -> int:
    (mode,) = store._conn.execute("PRAGMA synchronous").fetchone()  # type: ignore[union-attr]
    return int(mode)


@pytest.fixture(name="fsyncs")
def _fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths os.fsync is called on (the real fsync still runs)."""
    calls: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


@pytest.fixture(name="deferred")
def _deferred(db: Path, signer: FileSigner, clock: object) -> Iterator[SQLiteAuditStore]:
    """An open store with sync="authorized" (completions fsynced with the next call)."""
    with SQLiteAuditStore(db, signer, clock=clock, sync="authorized") as store:
        yield store


def test_every_record_is_fsynced_by_default(store):
    """Without a sync setting, a completion is fsynced before append returns, too."""
    store.append("call.authorized", {"call": {"id": "c1"}})

    store.append("call.completed", {"call_id": "c1", "authorized_seq": 1})

    assert (FULL, False) == (_synchronous(store), store.unsynced)


class TestDeferredSync:
    def test_only_completion_records_are_deferred(self):
        """Nothing that lets work start is deferred: only what reports on work done."""
        assert frozenset({"call.completed", "call.denied", "call.rejected"}) == DEFERRED_SYNC_KINDS

    @pytest.mark.parametrize("kind", ["call.authorized", "key.rotated", "model.turn",
                                      "policy.reloaded", "call.interrupted"])
    def test_other_kinds_commit_with_fsync(self, deferred, kind):
        """Every other kind commits with synchronous=FULL and leaves nothing unsynced."""
        deferred.append("call.completed", {})

        deferred.append(kind, {})

        assert (FULL, False) == (_synchronous(deferred), deferred.unsynced)

    def test_completion_commits_without_waiting_for_fsync(self, deferred, sql):
        """A call.completed is committed (another connection reads it) and waits for fsync."""
        deferred.append("call.authorized", {"call": {"id": "c1"}})

        record = deferred.append("call.completed", {"call_id": "c1", "authorized_seq": 1})

        assert (NORMAL, True) == (_synchronous(deferred), deferred.unsynced)
        assert [(record.seq, "call.completed")] == sql("SELECT seq, kind FROM records WHERE seq=2")

    def test_flush_fsyncs_the_wal(self, deferred, db, fsyncs):
        """flush() fsyncs the WAL file, which holds every commit so far."""
        deferred.append("call.completed", {})

        deferred.flush()
        deferred.flush()  # nothing new: no second fsync

        assert [str(db.with_name(db.name + "-wal"))] == fsyncs
        assert not deferred.unsynced

    def test_close_leaves_nothing_unsynced(self, db, signer, fsyncs):
        """close() ends with every record fsynced (its checkpoint commits with FULL)."""
        store = SQLiteAuditStore(db, signer, sync="authorized")
        store.open()
        store.append("call.denied", {})
        assert store.unsynced

        store.close()

        assert not store.unsynced

    def test_sync_every_fsyncs_every_commit(self, db, signer):
        """sync="every" keeps every append fsynced before it returns."""
        with SQLiteAuditStore(db, signer, sync="every") as store:
            store.append("call.completed", {})

            assert (FULL, False) == (_synchronous(store), store.unsynced)

    def test_unknown_sync_is_refused(self, db, signer):
        with pytest.raises(ValueError, match="sync"):
            SQLiteAuditStore(db, signer, sync="never")  # type: ignore[arg-type]

    def test_a_due_checkpoint_is_on_disk_before_witnesses_see_it(self, db, signer, fsyncs):
        """A checkpoint written by a store commit is fsynced before it is published."""
        with SQLiteAuditStore(db, signer, checkpoint_every=2, sync="authorized") as store:
            store.append("call.completed", {})
            fsyncs.clear()

            store.append("call.completed", {})

            assert [str(db.with_name(db.name + "-wal"))] == fsyncs
            assert not store.unsynced


class _DurabilityProbe:
    """A runner that records, when asked to run, whether the log had anything unsynced."""

    def __init__(self) -> None:
        self.store: SQLiteAuditStore | None = None
        self.seen: list[tuple[bool, int]] = []

    @property
    def image_digest(self) -> Sha256Hex:
        return Sha256Hex("ab" * 32)

    def run(self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
        assert self.store is not None
        self.seen.append((self.store.unsynced, _synchronous(self.store)))
        return Execution("ok", canonical_bytes(9), "", Usage(1.0, 0, 1))


class TestGatewayDurability:
    def test_call_authorized_is_fsynced_before_the_call_runs(self, tmp_path: Path):
        """
        Each call's call.authorized commits with fsync (and so makes the previous
        call's completion durable too) before the sandbox is asked to run.
        """
        examples = example_config_path().parent
        registry = ToolRegistry()
        registry.load(str(examples / "tools.py"))
        probe = _DurabilityProbe()
        with SQLiteAuditStore(tmp_path / "audit.db", FileSigner.load_or_create(tmp_path / "keys"),
                              sync="authorized") as store:
            probe.store = store
            gateway = Gateway(registry=registry, policy=Policy.from_file(examples / "policy.yaml"),
                              runner=probe, audit=store)
            for _ in range(3):
                (result,) = gateway.handle_text('call function("square", [3], 9)',
                                                principal="alice")
                assert "ok" == result.kind
                assert store.unsynced  # the completion waits for the next fsync
            rows = sqlite3.connect(tmp_path / "audit.db").execute(
                "SELECT kind FROM records ORDER BY seq").fetchall()

        assert [(False, FULL)] * 3 == probe.seen
        assert [("call.authorized",), ("call.completed",)] * 3 == rows


class TestKeptTree:
    def test_two_writers_on_one_file_keep_one_tree(self, db, signer):
        """A store that finds another writer's records reloads its frontier from the table."""

        with SQLiteAuditStore(db, signer) as first, SQLiteAuditStore(db, signer) as second:
            written = []
            for i in range(23):
                store = first if i % 3 else second
                kind = "call.authorized" if i % 2 else "call.completed"
                written.append((store, store.append(kind, {"i": i})))
            receipts = [store.receipt_for(record) for store, record in written]
            leaves = [leaf_hash(record.record_bytes) for record in first.records()]
            conn = sqlite3.connect(db)
            try:
                stored = root_at(conn, 23)
            finally:
                conn.close()

        assert root_from_leaf_hashes(leaves) == stored
        assert list(range(1, 24)) == [record.seq for _, record in written]
        for receipt in receipts:
            verify_receipt(receipt.to_json(), [signer.public_key()])

    def test_threads_appending_at_once_get_proofs_that_verify(self, db, signer):
        """Group commits of mixed kinds: every record's kept proof verifies."""
        with SQLiteAuditStore(db, signer) as store:
            records = []
            lock = threading.Lock()

            def work(worker: int) -> None:
                for i in range(25):
                    kind = "call.authorized" if (worker + i) % 2 else "call.completed"
                    record = store.append(kind, {"w": worker, "i": i})
                    with lock:
                        records.append(record)

            threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            receipts = [store.receipt_for(record) for record in records]

        assert list(range(1, 151)) == sorted(record.seq for record in records)
        for receipt in receipts:
            verify_receipt(receipt.to_json(), [signer.public_key()])


class TestSyncSetting:
    @pytest.mark.parametrize(("text", "expected"), [("", "every"),
                                                    ("  sync: every\n", "every"),
                                                    ("  sync: authorized\n", "authorized")])
    def test_audit_sync_in_callward_yaml(self, tmp_path, text, expected):
        """audit.sync picks when completions are fsynced; every (the strict one) when not given."""
        config = tmp_path / "callward.yaml"
        config.write_text(f"tools: [t.py]\npolicy: p.yaml\naudit:\n  checkpoint_every: 9\n{text}")

        settings = store_settings(load_config(config).audit or {}, base=tmp_path)

        assert expected == settings.sync

    def test_unknown_audit_sync_is_refused_at_load(self, tmp_path):
        config = tmp_path / "callward.yaml"
        config.write_text("tools: [t.py]\npolicy: p.yaml\naudit:\n  sync: never\n")

        with pytest.raises(ConfigurationError, match="audit"):
            load_config(config)
