"""
Audit log write throughput: signed, chained, Merkle-tree records with group commit,
against a plain SQLite insert loop measured in the same run
(run: .venv/bin/python -m bench.audit_append).

Rows:

- plain insert, one commit each: ``INSERT`` of the same bytes with
  ``synchronous=FULL``, one transaction (one fsync) per row: the durable baseline.
- plain insert, one transaction: every row in one transaction (one fsync in all);
  the ceiling for SQLite itself, not a durable per-record design.
- callward, 1 thread: ``append`` in a loop; every record durable before the next.
- callward, N threads: N threads appending at once; each append still returns only
  once its record is durable, but waiting appends share the next commit.

Every callward row is a signed record (Ed25519), hash-chained, added to the Merkle
tree, and durable when ``append`` returns; the log is verified at the end.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench._common import configure_logging, print_table
from callward.audit import FileSigner, SQLiteAuditStore, verify

BODY = {"call_id": "call_0123456789abcdef01234567", "tool": "square@1.0.0", "outcome": "ok",
        "result_sha256": "0" * 64, "result_bytes": 2, "principal": "alice"}


def plain_inserts(path: Path, count: int, *, per_row_commit: bool) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, record BLOB, signature BLOB)")
    data, signature = b"x" * 400, b"s" * 64
    start = time.perf_counter()
    if not per_row_commit:
        conn.execute("BEGIN IMMEDIATE")
    for seq in range(1, count + 1):
        if per_row_commit:
            conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (?, ?, ?)", (seq, data, signature))
        if per_row_commit:
            conn.execute("COMMIT")
    if not per_row_commit:
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return count / elapsed


def callward_appends(path: Path, count: int, threads: int) -> tuple[float, float]:
    """Records per second, and records per commit (fsync)."""
    signer = FileSigner(Ed25519PrivateKey.generate())
    with SQLiteAuditStore(path, signer) as store:
        per_thread = count // threads
        barrier = threading.Barrier(threads + 1)

        def work() -> None:
            barrier.wait()
            for _ in range(per_thread):
                store.append("call.completed", BODY)

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for worker in workers:
            worker.start()
        barrier.wait()
        start = time.perf_counter()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - start
        commits = store.commits
    verified = verify(path, signer.public_key())
    if verified.records != per_thread * threads:
        raise SystemExit(f"verify found {verified.records} records")
    return per_thread * threads / elapsed, per_thread * threads / commits


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=12800)
    parser.add_argument("--threads", type=int, nargs="*", default=[8, 64, 128])
    args = parser.parse_args()
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        per_commit = plain_inserts(tmp / "plain1.db", min(args.records, 2000),
                                   per_row_commit=True)
        rows.append(["plain insert, one commit each (baseline)", round(per_commit), 1.0])
        one_txn = plain_inserts(tmp / "plain2.db", args.records, per_row_commit=False)
        rows.append(["plain insert, one transaction (ceiling)", round(one_txn),
                     float(args.records)])
        rate, batch = callward_appends(tmp / "cw1.db", min(args.records, 2000), 1)
        rows.append(["callward append, 1 thread", round(rate), batch])
        for threads in args.threads:
            rate, batch = callward_appends(tmp / f"cw{threads}.db", args.records, threads)
            rows.append([f"callward append, {threads} threads (group commit)", round(rate),
                         batch])
    print_table(
        "Audit log writes: durable signed records per second (same machine, same run)",
        ["what", "records/s", "records per fsync"],
        rows,
    )


if __name__ == "__main__":
    main()
