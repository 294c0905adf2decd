"""
Every audit reader on a fleet's PostgreSQL store, against the real server: verify with
a set of keys, show, query, export, prove, consistency, and ``callward audit`` on a URL.

The fleet logs here are built by hand (the audit migration, records sealed by
``_chain.seal`` under several replicas' keys, tree rows from ``_tree.extend_frontier``,
checkpoints from ``_checkpoint.sign_checkpoint``), so these tests read exactly what the
tables hold and depend on no writer.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from callward.audit import (
    CallFilter,
    FileSigner,
    SQLiteAuditStore,
    consistency,
    export_records,
    prove,
    query_calls,
    read_records,
    render_report,
    verify,
    verify_receipt,
)
from callward.audit._chain import GENESIS_PREV, canonical_body, format_ts, seal
from callward.audit._checkpoint import note_key_hash, sign_checkpoint
from callward.audit._merkle import Frontier, leaf_hash
from callward.audit._postgres_read import (
    PostgresReadConnection,
    connect_store_read_only,
    is_scan,
    to_postgres_sql,
)
from callward.audit._postgres_schema import COMPONENT, FLEET_ORIGIN_PREFIX, MIGRATIONS
from callward.audit._tree import extend_frontier
from callward.core._postgres import StoreUrl, migrate
from callward.core.errors import ConfigurationError, VerificationFailed

REPO = Path(__file__).resolve().parents[3]
CALLWARD = REPO / ".venv" / "bin" / "callward"
_START = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


@dataclass(frozen=True)
class FleetLog:
    url: str
    origin: str
    signers: tuple[FileSigner, ...]
    key_files: tuple[Path, ...]
    records: int


def _body(seq: int) -> dict[str, object]:
    if seq % 2:
        return {"call": {"id": f"c{seq}", "name": "echo" if seq % 4 == 1 else "fetch"},
                "principal": "alice" if seq % 4 == 1 else "bob", "session_id": "s1"}
    return {"authorized_seq": seq - 1, "call_id": f"c{seq - 1}", "outcome": "ok"}


def build_fleet_log(
    url: str,
    signers: tuple[FileSigner, ...],
    count: int,
    *,
    checkpoints: tuple[int, ...] = (),
    signer_of: Callable[[int], FileSigner] | None = None,
) -> str:
    """Write a fleet log of ``count`` records into the empty database at ``url``; its origin."""
    pick = signer_of or (lambda seq: signers[(seq - 1) % len(signers)])
    with psycopg.connect(url) as conn:
        migrate(conn, COMPONENT, MIGRATIONS)
        row = conn.execute("SELECT value FROM meta WHERE name = 'origin'").fetchone()
        assert row is not None
        origin = str(row[0])
        prev, frontier, tree = GENESIS_PREV, (), Frontier()
        records, nodes, notes = [], [], []
        ts = ""
        for seq in range(1, count + 1):
            kind = "call.authorized" if seq % 2 else "call.completed"
            ts = format_ts(_START + timedelta(milliseconds=seq))
            record = seal(seq=seq, ts=ts, kind=kind, prev=prev,
                          body_json=canonical_body(_body(seq)), signer=pick(seq))
            records.append((record.seq, record.ts, record.kind, record.prev, record.key_id,
                            record.body_json.decode(), record.record_bytes,
                            record.record_hash, record.signature))
            frontier, rows = extend_frontier(frontier, seq - 1, record.record_bytes)
            nodes.extend(rows)
            tree.append(leaf_hash(record.record_bytes))
            if seq in checkpoints:
                signer = signers[0]
                note = sign_checkpoint(origin, seq, tree.root(), signer=signer,
                                       key_hash=note_key_hash(origin, signer.public_key()))
                notes.append((seq, ts, note.note))
            prev = record.record_hash
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO records (seq, ts, kind, prev, key_id, body, record, hash, "
                "signature) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", records)
            cur.executemany("INSERT INTO merkle_nodes (level, idx, hash) VALUES (%s, %s, %s)",
                            nodes)
            cur.executemany("INSERT INTO checkpoints (size, ts, note) VALUES (%s, %s, %s)",
                            notes)
            cur.execute("UPDATE log_head SET seq = %s, hash = %s, ts = %s, frontier = %s",
                        (count, prev, ts or None, list(frontier)))
    return origin


def _sql(url: str, statement: str, params: tuple[object, ...] = ()) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(statement.encode(), params)


@pytest.fixture(name="signers")
def _signers(tmp_path: Path) -> tuple[tuple[FileSigner, ...], tuple[Path, ...]]:
    """Three replicas' keys, each in its own keys directory."""
    signers, files = [], []
    for name in ("r1", "r2", "r3"):
        keys = tmp_path / "replicas" / name / "keys"
        signers.append(FileSigner.load_or_create(keys))
        files.append(keys / "audit-ed25519.pub")
    return tuple(signers), tuple(files)


@pytest.fixture(name="fleet_log")
def _fleet_log(
    postgres_url: str, signers: tuple[tuple[FileSigner, ...], tuple[Path, ...]]
) -> FleetLog:
    """Twelve records signed in turn by three replicas, checkpoints at 4, 8 and 12."""
    keys, files = signers
    origin = build_fleet_log(postgres_url, keys, 12, checkpoints=(4, 8, 12))
    return FleetLog(postgres_url, origin, keys, files, 12)


def _failure(url: str, keys: object) -> VerificationFailed:
    with pytest.raises(VerificationFailed) as failed:
        verify(url, keys)  # type: ignore[arg-type]
    return failed.value


class TestVerifyFleetLog:
    def test_verifies_with_the_set_of_keys(self, fleet_log: FleetLog) -> None:
        """Records signed in turn by three trusted keys verify, checkpoints and all."""
        verified = verify(fleet_log.url, list(fleet_log.key_files))

        assert 12 == verified.records
        assert 3 == verified.checkpoints
        assert tuple(s.key_id for s in fleet_log.signers) == verified.key_ids
        assert fleet_log.signers[2].key_id == verified.key_id
        assert fleet_log.origin.startswith(FLEET_ORIGIN_PREFIX)

    def test_a_store_url_object_and_public_keys_are_accepted(self, fleet_log: FleetLog) -> None:
        """``StoreUrl`` and ``Ed25519PublicKey`` values serve as well as text and paths."""
        keys = [signer.public_key() for signer in fleet_log.signers]

        verified = verify(StoreUrl.parse(fleet_log.url), keys)

        assert 12 == verified.records

    def test_a_key_outside_the_set_fails_at_its_first_record(self, fleet_log: FleetLog) -> None:
        """Without the third replica's key, its first record (seq 3) fails, naming the key."""
        failure = _failure(fleet_log.url, list(fleet_log.key_files[:2]))

        assert 3 == failure.seq
        assert fleet_log.signers[2].key_id in failure.message
        assert "not one of the trusted keys" in failure.message

    def test_a_replica_key_alone_does_not_verify_the_fleet(self, fleet_log: FleetLog) -> None:
        """One replica's own key is no fleet's trust: the first other key fails (seq 2)."""
        failure = _failure(fleet_log.url, [fleet_log.key_files[0]])

        assert 2 == failure.seq

    def test_an_edited_body_fails_at_its_seq(self, fleet_log: FleetLog) -> None:
        """``UPDATE records SET body`` on record 7 fails verify at seq 7."""
        _sql(fleet_log.url, "UPDATE records SET body = %s WHERE seq = 7",
             ('{"call":{"id":"c7","name":"rm"},"principal":"mallory"}',))

        failure = _failure(fleet_log.url, list(fleet_log.key_files))

        assert 7 == failure.seq
        assert "body" in failure.message

    def test_a_record_resigned_by_an_untrusted_key_fails_at_its_seq(
        self, fleet_log: FleetLog, tmp_path: Path
    ) -> None:
        """A record re-sealed under an outsider's key (its key_id says so) fails at its seq."""
        outsider = FileSigner.load_or_create(tmp_path / "outsider")
        with psycopg.connect(fleet_log.url) as conn:
            row = conn.execute("SELECT ts, kind, prev, body FROM records WHERE seq = 5"
                               ).fetchone()
            assert row is not None
            forged = seal(seq=5, ts=row[0], kind=row[1], prev=row[2],
                          body_json=row[3].encode(), signer=outsider)
            conn.execute("UPDATE records SET key_id = %s, record = %s, hash = %s, "
                         "signature = %s WHERE seq = 5",
                         (forged.key_id, forged.record_bytes, forged.record_hash,
                          forged.signature))

        failure = _failure(fleet_log.url, list(fleet_log.key_files))

        assert 5 == failure.seq
        assert outsider.key_id in failure.message

    def test_a_deleted_middle_record_fails_where_the_chain_breaks(
        self, fleet_log: FleetLog
    ) -> None:
        """Deleting record 5 fails at seq 6, naming record 5 as missing."""
        _sql(fleet_log.url, "DELETE FROM records WHERE seq = 5")

        failure = _failure(fleet_log.url, list(fleet_log.key_files))

        assert 6 == failure.seq
        assert "record 5 is missing" in failure.message

    def test_records_removed_from_the_end_fail(
        self, postgres_url: str, signers: tuple[tuple[FileSigner, ...], tuple[Path, ...]]
    ) -> None:
        """Past the last checkpoint, the head row still catches a truncated log."""
        keys, files = signers
        build_fleet_log(postgres_url, keys, 10, checkpoints=(4,))
        _sql(postgres_url, "DELETE FROM records WHERE seq > 8")

        failure = _failure(postgres_url, list(files))

        assert 9 == failure.seq
        assert "removed from the end" in failure.message

    def test_a_forged_checkpoint_fails_at_its_size(self, fleet_log: FleetLog,
                                                   tmp_path: Path) -> None:
        """A checkpoint signed by a key outside the set fails at its size."""
        outsider = FileSigner.load_or_create(tmp_path / "outsider")
        note = sign_checkpoint(fleet_log.origin, 8, b"\x01" * 32, signer=outsider,
                               key_hash=note_key_hash(fleet_log.origin, outsider.public_key()))
        _sql(fleet_log.url, "UPDATE checkpoints SET note = %s WHERE size = 8", (note.note,))

        failure = _failure(fleet_log.url, list(fleet_log.key_files))

        assert 8 == failure.seq
        assert "checkpoint 8" in failure.message

    def test_a_long_log_streams_and_verifies_with_worker_processes(
        self, postgres_url: str, signers: tuple[tuple[FileSigner, ...], tuple[Path, ...]]
    ) -> None:
        """2,500 records (several server-side fetches) verify inline and with 2 workers alike."""
        keys, files = signers
        build_fleet_log(postgres_url, keys, 2500, checkpoints=(1000, 2500))

        inline = verify(postgres_url, list(files))
        pooled = verify(postgres_url, list(files), workers=2)

        assert 2500 == inline.records
        assert inline == pooled

    def test_an_empty_fleet_log_verifies(
        self, postgres_url: str, signers: tuple[tuple[FileSigner, ...], tuple[Path, ...]]
    ) -> None:
        """A migrated store with no record yet verifies as an empty log."""
        keys, files = signers
        build_fleet_log(postgres_url, keys, 0)

        verified = verify(postgres_url, list(files))

        assert (0, "0" * 64) == (verified.records, verified.head_hash)

    def test_a_database_that_is_not_a_store_is_refused(
        self, postgres_url: str, signers: tuple[tuple[FileSigner, ...], tuple[Path, ...]]
    ) -> None:
        """An empty database is not a fleet audit store: seq None, no record read."""
        failure = _failure(postgres_url, list(signers[1]))

        assert failure.seq is None
        assert "not a callward fleet audit store" in failure.message

    def test_an_unreachable_server_fails_without_a_seq(
        self, signers: tuple[tuple[FileSigner, ...], tuple[Path, ...]]
    ) -> None:
        """No server at the URL: a failure with seq None that names the URL."""
        url = "postgresql://callward@127.0.0.1:1/callward"

        failure = _failure(url, list(signers[1]))

        assert failure.seq is None
        assert url in failure.message

    def test_a_url_with_a_password_is_refused(self, fleet_log: FleetLog) -> None:
        """A password in the URL is a configuration error, never used or echoed."""
        url = fleet_log.url.replace("callward@", "callward:hunter2@", 1)

        with pytest.raises(ConfigurationError) as refused:
            verify(url, list(fleet_log.key_files))

        assert "hunter2" not in str(refused.value)


class TestReadConnection:
    @pytest.fixture(name="reader")
    def _reader(self, fleet_log: FleetLog) -> Iterator[PostgresReadConnection]:
        reader = connect_store_read_only(StoreUrl.parse(fleet_log.url))
        yield reader
        reader.close()

    def test_writes_are_refused_as_sqlite_errors(self, reader: PostgresReadConnection) -> None:
        """The snapshot is read-only; the failure is a sqlite3.Error the readers catch."""
        with pytest.raises(sqlite3.Error) as refused:
            reader.execute("DELETE FROM records WHERE seq = ?", (1,)).fetchall()

        assert "SQLSTATE 25006" in str(refused.value)

    def test_one_snapshot_while_others_append(self, fleet_log: FleetLog,
                                              reader: PostgresReadConnection) -> None:
        """A record committed after the reader's first query is not seen by it."""
        (before,) = reader.execute("SELECT count(*) FROM records").fetchone()
        _sql(fleet_log.url, "DELETE FROM records WHERE seq = 12")

        (after,) = reader.execute("SELECT count(*) FROM records").fetchone()

        assert (12, 12) == (before, after)

    def test_tables_and_placeholders(self, reader: PostgresReadConnection) -> None:
        """has_table knows the store's tables; ? placeholders bind; scans stream."""
        rows = list(reader.execute("SELECT seq FROM records WHERE seq >= ? ORDER BY seq", (10,)))

        assert [(10,), (11,), (12,)] == rows
        assert (True, False) == (reader.has_table("merkle_nodes"), reader.has_table("nope"))
        assert b"SELECT 1 %% 2 WHERE a = %s" == to_postgres_sql("SELECT 1 % 2 WHERE a = ?")
        assert is_scan("SELECT x FROM (SELECT x FROM t ORDER BY x DESC LIMIT ?) ORDER BY x")
        assert not is_scan("SELECT size FROM checkpoints ORDER BY size LIMIT 1")


class TestReadersOnAStore:
    def test_show_query_and_export(self, fleet_log: FleetLog) -> None:
        """read_records, query_calls and export_records read a store URL as a file."""
        last = [r.seq for r in read_records(fleet_log.url, last=3)]
        alice = list(query_calls(fleet_log.url, CallFilter(principal="alice")))
        out = io.StringIO()
        exported = export_records(fleet_log.url, out, format="ocsf")

        assert [10, 11, 12] == last
        assert [1, 2, 5, 6, 9, 10] == [view["seq"] for view in alice]
        assert 12 == exported == len(out.getvalue().splitlines())

    def test_prove_and_verify_a_receipt(self, fleet_log: FleetLog) -> None:
        """A receipt proved from the store verifies with the fleet's public keys alone."""
        receipt = prove(fleet_log.url, 6)
        keys = [signer.public_key() for signer in fleet_log.signers]

        verified = verify_receipt(receipt, keys)

        assert (6, 8, fleet_log.origin) == (verified.seq, verified.tree_size, verified.origin)
        assert verified.record_checked

    def test_consistency_between_checkpoints(self, fleet_log: FleetLog) -> None:
        """The store's checkpoints 4 and 12 prove the log only grew."""
        keys = [signer.public_key() for signer in fleet_log.signers]

        proof = consistency(fleet_log.url, 4, 12, keys)

        assert (4, 12) == (proof["old_size"], proof["new_size"])

    def test_report(self, fleet_log: FleetLog) -> None:
        """The HTML report verifies the store and names it by its URL."""
        keys = [signer.public_key() for signer in fleet_log.signers]

        page = render_report(fleet_log.url, keys)

        assert "Verification OK: 12 records, 3 checkpoints" in page
        assert fleet_log.url in page


def _callward(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CALLWARD_HOME": str(home)}
    env.pop("CALLWARD_CONFIG", None)
    return subprocess.run([str(CALLWARD), *args], capture_output=True, text=True, env=env,
                          check=False, timeout=120)


class TestAuditCommandsOnAStore:
    def test_verify_with_keys_prints_ok(self, fleet_log: FleetLog, tmp_path: Path) -> None:
        """`audit verify --store URL --public-key ...` exits 0 with the usual JSON."""
        keys = [arg for key in fleet_log.key_files for arg in ("--public-key", str(key))]

        done = _callward("audit", "verify", "--store", fleet_log.url, *keys, home=tmp_path)

        assert 0 == done.returncode, done.stderr
        result = json.loads(done.stdout)
        assert ("OK", 12, 3, fleet_log.url) == (result["verdict"], result["records"],
                                                result["checkpoints"], result["log"])
        assert [s.key_id for s in fleet_log.signers] == result["key_ids"]

    def test_verify_with_a_keys_dir_and_a_url_as_db(self, fleet_log: FleetLog,
                                                   tmp_path: Path) -> None:
        """--keys-dir trusts every *.pub in it; --db takes a URL as well as a path."""
        trusted = tmp_path / "trusted"
        trusted.mkdir()
        for index, key in enumerate(fleet_log.key_files):
            (trusted / f"r{index}.pub").write_bytes(key.read_bytes())

        done = _callward("audit", "verify", "--db", fleet_log.url, "--keys-dir", str(trusted),
                         home=tmp_path)

        assert 0 == done.returncode, done.stderr
        assert "OK" == json.loads(done.stdout)["verdict"]

    def test_verify_of_an_edited_store_exits_1_naming_the_seq(
        self, fleet_log: FleetLog, tmp_path: Path
    ) -> None:
        """An edited record makes verify exit 1 with verdict FAILED and its seq."""
        _sql(fleet_log.url, "UPDATE records SET body = '{}' WHERE seq = 4")
        keys = [arg for key in fleet_log.key_files for arg in ("--public-key", str(key))]

        done = _callward("audit", "verify", "--store", fleet_log.url, *keys, home=tmp_path)

        assert 1 == done.returncode
        result = json.loads(done.stdout)
        assert ("FAILED", 4, fleet_log.url) == (result["verdict"], result["seq"], result["log"])

    def test_verify_without_keys_is_refused(self, fleet_log: FleetLog, tmp_path: Path) -> None:
        """A store needs its trusted keys named: exit 2, saying how to give them."""
        FileSigner.load_or_create(tmp_path / "keys")  # HOME's own key is not enough

        done = _callward("audit", "verify", "--store", fleet_log.url, home=tmp_path)

        assert 2 == done.returncode
        assert "--keys-dir" in done.stderr

    def test_a_password_in_the_url_is_refused_and_not_printed(
        self, fleet_log: FleetLog, tmp_path: Path
    ) -> None:
        """exit 2, and the password appears in no output."""
        url = fleet_log.url.replace("callward@", "callward:hunter2@", 1)

        done = _callward("audit", "show", "--store", url, home=tmp_path)

        assert 2 == done.returncode
        assert "hunter2" not in done.stdout + done.stderr

    def test_show_query_export_prove_and_consistency(self, fleet_log: FleetLog,
                                                     tmp_path: Path) -> None:
        """The other readers take --store too and print what they print for a file."""
        store = ("--store", fleet_log.url)
        keys = [arg for key in fleet_log.key_files for arg in ("--public-key", str(key))]

        show = _callward("audit", "show", *store, "--last", "2", home=tmp_path)
        query = _callward("audit", "query", *store, "--principal", "bob", home=tmp_path)
        export = _callward("audit", "export", *store, home=tmp_path)
        proved = _callward("audit", "prove", *store, "3", home=tmp_path)
        grown = _callward("audit", "consistency", *store, "4", "8", *keys, home=tmp_path)

        assert [11, 12] == [json.loads(line)["seq"] for line in show.stdout.splitlines()]
        assert [3, 4, 7, 8, 11, 12] == [json.loads(line)["seq"]
                                        for line in query.stdout.splitlines()]
        assert 12 == len(export.stdout.splitlines())
        assert (3, 4) == (json.loads(proved.stdout)["seq"], json.loads(proved.stdout)["tree_size"])
        assert "OK" == json.loads(grown.stdout)["verdict"], grown.stderr

    def test_the_configurations_store_is_the_default(self, fleet_log: FleetLog,
                                                     tmp_path: Path) -> None:
        """With store: in HOME/callward.yaml, `audit show` and `stats` read the fleet's log."""
        (tmp_path / "callward.yaml").write_text(f"store:\n  url: {fleet_log.url}\n")

        show = _callward("audit", "show", "--last", "1", home=tmp_path)
        stats = _callward("stats", "--json", home=tmp_path)

        assert 0 == show.returncode, show.stderr
        assert 12 == json.loads(show.stdout)["seq"]
        assert 0 == stats.returncode, stats.stderr
        summary = json.loads(stats.stdout)
        assert (fleet_log.url, 6) == (summary["source"], summary["calls"])


class TestFleetOriginInAFile:
    @pytest.fixture(name="file_log")
    def _file_log(self, tmp_path: Path) -> tuple[Path, FileSigner]:
        """An SQLite log of three records, its meta origin a fleet's, no checkpoint."""
        signer = FileSigner.load_or_create(tmp_path / "keys")
        db = tmp_path / "audit.db"
        with SQLiteAuditStore(db, signer) as store:
            for n in range(3):
                store.append("call.denied", {"call_id": f"c{n}", "kind": "schema"})
        with sqlite3.connect(db) as conn:
            conn.execute("DELETE FROM checkpoints")
            conn.execute("UPDATE meta SET value = 'callward.fleet/copy' WHERE name = 'origin'")
        conn.close()
        return db, signer

    def test_a_file_with_a_fleet_origin_is_verified_against_the_set(
        self, file_log: tuple[Path, FileSigner], tmp_path: Path
    ) -> None:
        """A copy of a fleet's log in a file: each record's key must be in the given set."""
        db, signer = file_log
        outsider = FileSigner.load_or_create(tmp_path / "outsider")

        verified = verify(db, [outsider.public_key(), signer.public_key()])
        with pytest.raises(VerificationFailed) as failed:
            verify(db, [outsider.public_key()])

        assert (3, (signer.key_id,)) == (verified.records, verified.key_ids)
        assert 1 == failed.value.seq
        assert "not one of the trusted keys" in failed.value.message


class TestWithTheWriter:
    def test_two_replicas_log_verifies_with_both_keys(
        self, postgres_url: str, signers: tuple[tuple[FileSigner, ...], tuple[Path, ...]]
    ) -> None:
        """What two PostgresAuditStores append in turn verifies and proves with both keys."""
        # Imported here: only this test depends on the writer.
        from callward.audit._postgres import PostgresAuditStore

        keys, files = signers
        stores = [PostgresAuditStore(StoreUrl.parse(postgres_url), signer, checkpoint_every=5)
                  for signer in keys[:2]]
        for store in stores:
            store.open()
        try:
            for n in range(20):
                stores[n % 2].append("call.denied", {"call_id": f"c{n}", "kind": "schema"})
        finally:
            for store in stores:
                store.close()

        verified = verify(postgres_url, list(files[:2]))
        receipt = verify_receipt(prove(postgres_url, 7), [k.public_key() for k in keys[:2]])

        assert (20, 4) == (verified.records, verified.checkpoints)
        assert (keys[0].key_id, keys[1].key_id) == verified.key_ids
        assert 10 == receipt.tree_size
