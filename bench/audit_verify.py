"""
Offline verification speed: a whole log, and one receipt, against baselines measured in
the same run (run: .venv/bin/python -m bench.audit_verify [--records 1000000]).

The log is built with the store's own record format (``seal``), tree (``add_leaf``)
and checkpoint (``sign_checkpoint``) functions, in large transactions so that building
a million records does not take as long as writing them one fsync at a time.

Baselines: reading every row with no checks (SQLite alone), and one Ed25519 signature
check per record in one process (the cost the verifier must pay at least once per
record without worker processes).
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench._common import configure_logging, print_table, summarize
from callward.audit import FileSigner, SQLiteAuditStore, prove, verify, verify_receipt
from callward.audit._chain import GENESIS_PREV, canonical_body, format_ts, seal
from callward.audit._checkpoint import note_key_hash, sign_checkpoint
from callward.audit._tree import add_leaf, root_at

CHECKPOINT_EVERY = 1000
_INSERT = (
    "INSERT INTO records (seq, ts, kind, prev, key_id, body, record, hash, signature)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def build(path: Path, count: int, signer: FileSigner) -> None:
    with SQLiteAuditStore(path, signer, checkpoint_seconds=0) as store:
        origin = store.origin
    key_hash = note_key_hash(origin, signer.public_key())
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")  # building the fixture only; not how the store writes
    start_ts = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
    prev = GENESIS_PREV
    conn.execute("BEGIN")
    for seq in range(1, count + 1):
        kind = "call.authorized" if seq % 2 else "call.completed"
        body = {"call_id": f"call_{seq // 2:08d}", "principal": "alice", "tool": "square",
                "outcome": "ok", "result_sha256": "0" * 64}
        record = seal(seq=seq, ts=format_ts(start_ts + timedelta(microseconds=seq * 500)),
                      kind=kind, prev=prev, body_json=canonical_body(body), signer=signer)
        conn.execute(_INSERT, (record.seq, record.ts, record.kind, record.prev, record.key_id,
                               record.body_json.decode(), record.record_bytes,
                               record.record_hash, record.signature))
        add_leaf(conn, seq - 1, record.record_bytes)
        prev = record.record_hash
        if seq % CHECKPOINT_EVERY == 0 or seq == count:
            note = sign_checkpoint(origin, seq, root_at(conn, seq), signer=signer,
                                   key_hash=key_hash).note
            conn.execute("INSERT INTO checkpoints (size, ts, note) VALUES (?, ?, ?)",
                         (seq, record.ts, note))
        if seq % 50_000 == 0:
            conn.execute("COMMIT")
            conn.execute("BEGIN")
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def read_only(path: Path) -> float:
    start = time.perf_counter()
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    for _ in conn.execute("SELECT seq, ts, kind, prev, key_id, body, record, hash, signature "
                          "FROM records ORDER BY seq"):
        pass
    conn.close()
    return time.perf_counter() - start


def signatures_only(path: Path, signer: FileSigner) -> float:
    key = signer.public_key()
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    start = time.perf_counter()
    for data, signature in conn.execute("SELECT record, signature FROM records ORDER BY seq"):
        key.verify(signature, data)
    conn.close()
    return time.perf_counter() - start


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--receipts", type=int, default=500)
    args = parser.parse_args()
    signer = FileSigner(Ed25519PrivateKey.generate())
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as directory:
        db = Path(directory) / "audit.db"
        started = time.perf_counter()
        build(db, args.records, signer)
        print(f"built {args.records} records in {time.perf_counter() - started:.1f} s",
              file=sys.stderr)
        n = args.records
        seconds = read_only(db)
        rows.append(["read every row, no checks (baseline)", seconds, round(n / seconds)])
        seconds = signatures_only(db, signer)
        rows.append(["Ed25519 verify per record, 1 process (baseline)", seconds,
                     round(n / seconds)])
        for workers in (1, 2):
            started = time.perf_counter()
            verified = verify(db, signer.public_key(), workers=workers)
            seconds = time.perf_counter() - started
            if verified.records != n or verified.checkpoints != -(-n // CHECKPOINT_EVERY):
                raise SystemExit(f"unexpected result {verified}")
            rows.append([f"callward verify, workers={workers} (full: signatures, chain, "
                         "tree, checkpoints)", seconds, round(n / seconds)])
        receipts = [prove(db, 1 + (i * 7919) % n) for i in range(args.receipts)]
        samples = []
        for receipt in receipts:
            started = time.perf_counter()
            verify_receipt(receipt, [signer.public_key()])
            samples.append((time.perf_counter() - started) * 1000)
        p50, p99, _ = summarize(samples)
    print_table(
        f"Offline verification of a {n:,}-record log (same machine, same run)",
        ["what", "seconds", "records/s"],
        rows,
    )
    print_table("One receipt (record signature, checkpoint signature, inclusion proof)",
                ["what", "p50 ms", "p99 ms"], [["verify_receipt", p50, p99]])


if __name__ == "__main__":
    main()
