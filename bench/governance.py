"""
Governance overhead: parse + policy + two signed, fsynced audit records per call,
against baselines measured in the same process
(run: .venv/bin/python -m bench.governance).

The sandbox is left out on purpose: ``NullRunner`` answers at once, so what is
timed is what callward adds around a tool. Two audit settings: ``sync="authorized"``
(``call.authorized`` is fsynced before the call runs, ``call.completed`` with the next
fsync, one fsync per call: DESIGN's floor of one fsync per authorized batch) and
``sync="every"`` (the store's default: both fsynced before they return, two per call).
The ratio column is against the first. Baselines: strict JSON parsing alone, jsonschema
validation alone, one Ed25519 signature alone, and one SQLite insert with
synchronous=FULL alone. "CPU ms" is this thread's CPU time per call, which a busy
machine disturbs far less than wall time (an fsync waits without using CPU).
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

from jsonschema import Draft202012Validator

from bench._common import EXAMPLES, NullRunner, configure_logging, print_table, summarize
from callward.audit import FileSigner, SQLiteAuditStore
from callward.core import ToolRegistry, strict_loads
from callward.core.gateway import Gateway
from callward.policies import Policy

TEXT = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 40}}</tool_call>'


def timed(function, count: int) -> tuple[list[float], float]:
    """Wall ms of each call, and the thread's CPU ms per call over all of them."""
    samples = []
    cpu = time.thread_time()
    for _ in range(count):
        start = time.perf_counter()
        function()
        samples.append((time.perf_counter() - start) * 1000)
    return samples, (time.thread_time() - cpu) * 1000 / count


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        registry = ToolRegistry()
        registry.load(EXAMPLES / "tools.py")
        policy = Policy.from_file(EXAMPLES / "policy.yaml")
        signer = FileSigner.load_or_create(root / "keys")
        stores = {sync: SQLiteAuditStore(root / f"audit-{sync}.db", signer, sync=sync)
                  for sync in ("authorized", "every")}
        gateways = {}
        for sync, store in stores.items():
            store.open()
            gateways[sync] = Gateway(registry=registry, policy=policy, runner=NullRunner(),
                                     audit=store)

        validator = Draft202012Validator(registry.get("add").parameters)
        plain = sqlite3.connect(root / "plain.db", isolation_level=None)
        plain.execute("PRAGMA journal_mode=WAL")
        plain.execute("PRAGMA synchronous=FULL")
        plain.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
        body = b'{"x":' + b"1" * 400 + b"}"

        for gateway in gateways.values():
            for _ in range(200):  # warm-up
                gateway.handle_text(TEXT, principal="alice")

        rows = []
        governed = {
            sync: timed(lambda g=gateway: g.handle_text(TEXT, principal="alice"), args.calls)
            for sync, gateway in gateways.items()
        }
        baselines = {
            "strict JSON parse only": timed(lambda: strict_loads('{"a": 2, "b": 40}'), args.calls),
            "jsonschema validate only": timed(lambda: validator.validate({"a": 2, "b": 40}),
                                              args.calls),
            "Ed25519 sign only": timed(lambda: signer.sign(body), args.calls),
            "SQLite insert, sync=FULL": timed(
                lambda: plain.execute("INSERT INTO t (body) VALUES (?)", (body,)), args.calls),
        }
        p50 = summarize(governed["authorized"][0])[0]
        for sync, (samples, cpu) in governed.items():
            g50, g99, gmean = summarize(samples)
            fsyncs = "1 fsync" if sync == "authorized" else "2 fsyncs"
            rows.append((f"callward governance, audit sync={sync} ({fsyncs}/call)", g50, g99,
                         gmean, cpu, 1000 / gmean, f"{p50 / g50:.2f}"))
        for name, (samples, cpu) in baselines.items():
            b50, b99, bmean = summarize(samples)
            rows.append((name, b50, b99, bmean, cpu, 1000 / bmean, f"{p50 / b50:.2f}"))
        for store in stores.values():
            store.close()

    print_table(
        f"Governance overhead per call (parse + policy + 2 signed records + receipt; "
        f"{args.calls} calls, one process, 1 thread)",
        ["path", "p50 ms", "p99 ms", "mean ms", "CPU ms", "calls/s",
         "callward (sync=authorized) p50 / this p50"],
        rows,
    )


if __name__ == "__main__":
    main()
