"""
A fleet on one PostgreSQL (#16): governance per call and durable signed records per
second, SQLite with one gateway against PostgreSQL with 1, 2 and 4 replica processes,
with the server's own figures as baselines in the same run
(run: .venv/bin/python -m bench.fleet; --quick for a smoke run).

Each replica is a process of its own (multiprocessing, spawn) with its own Ed25519
key and its own store objects, all on one database made fresh for the run and
dropped at its end; they start together (a barrier) and the aggregate rate is the
work done over the time from the first start to the last end.

Governance: ``Gateway.handle_text`` of one ``add`` call, the sandbox left out
(``NullRunner``), as bench.governance does: parse, policy (with a token-bucket rate
limit far above what the bench reaches, so the policy state is written on every call
and every call is allowed), and two signed records made durable before the call
returns (``call.authorized``, ``call.completed``). SQLite: ``SQLiteAuditStore``
(``sync="every"``) and a ``PolicyState`` file, one gateway. PostgreSQL:
``PostgresAuditStore`` and ``PostgresPolicyState``, one replica per process, each
under its own principal (its own rate-limit key), calls one after the other. The
baseline is the server's floor for such a call: three one-row commits in a row on one
connection, no callward.

Records: threads in each process append a small ``call.denied``-like body to the
store; an append returns only once its record is committed (SQLite
``synchronous=FULL``; PostgreSQL ``synchronous_commit = on``), and concurrent appends
in one process share a transaction (group commit). The baselines involve no
callward: plain INSERTs of a row like a record (one commit each, every thread its own
connection), and the same INSERT behind one counter row updated in the same
transaction, which is how a single sequencer orders a log: what the server itself
does, so the rows show what callward adds on top. After each PostgreSQL run the
fleet log must have grown by exactly the records appended (one seq each, none lost).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import queue as queue_module
import subprocess
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, Literal

from bench._common import (
    EXAMPLES,
    REPO,
    NullRunner,
    configure_logging,
    cpu_summary,
    print_table,
    summarize,
)

TEXT = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 40}}</tool_call>'
BODY = {"call_id": "call_0123456789abcdef01234567", "tool": "add@1.0.0", "kind": "policy",
        "rule": "bench-denies", "principal": "replica0", "arguments_sha256": "0" * 64}
PASSFILE = "/var/lib/callward-postgres/callward.pgpass"
MAX_REPLICAS = 8
MAX_THREADS = 32
# The example policy's rules, for principals replica0..N, and a rate limit per
# principal that the bench never reaches: every call is allowed and charges the state.
POLICY = """\
version: 1
default: deny
principals:
{principals}
rules:
  - {{id: analysts-use-calculators, effect: allow, roles: [analyst], tools: [square, add]}}
rate_limits:
  - {{id: adds-per-minute, tools: [add], per: [principal], limit: 100000000,
     window_seconds: 60, algorithm: token_bucket}}
"""
# A row like an audit record (the ``records`` table's columns), for the plain baselines.
PLAIN_TABLES = """
CREATE TABLE plain_records (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, ts TEXT NOT NULL,
    kind TEXT NOT NULL, prev TEXT NOT NULL, key_id TEXT NOT NULL, body TEXT NOT NULL,
    record BYTEA NOT NULL, hash TEXT NOT NULL, signature BYTEA NOT NULL);
CREATE TABLE sequenced_records (
    seq BIGINT PRIMARY KEY, ts TEXT NOT NULL, kind TEXT NOT NULL, prev TEXT NOT NULL,
    key_id TEXT NOT NULL, body TEXT NOT NULL, record BYTEA NOT NULL, hash TEXT NOT NULL,
    signature BYTEA NOT NULL);
CREATE TABLE sequenced_head (one BOOLEAN PRIMARY KEY DEFAULT TRUE, seq BIGINT NOT NULL);
INSERT INTO sequenced_head (seq) VALUES (0);
"""
PLAIN_INSERT = (
    "INSERT INTO plain_records (ts, kind, prev, key_id, body, record, hash, signature) "
    "VALUES (%s, 'call.denied', %s, %s, %s, %s, %s, %s)"
)
# The single-sequencer pattern: the head row stays locked from its UPDATE to the commit.
SEQUENCED_INSERT = (
    "WITH head AS (UPDATE sequenced_head SET seq = seq + 1 RETURNING seq) "
    "INSERT INTO sequenced_records (seq, ts, kind, prev, key_id, body, record, hash, "
    "signature) SELECT head.seq, %s, 'call.denied', %s, %s, %s, %s, %s, %s FROM head"
)

Backend = Literal["sqlite", "postgres"]
Work = Literal["governance", "floor", "records", "plain", "sequenced"]
#: A governed call's commits on PostgreSQL: the rate-limit charge, call.authorized and
#: call.completed, each durable before the call goes on.
COMMITS_PER_CALL = 3


@dataclass(frozen=True, slots=True)
class Job:
    """What one process does; picklable, for a spawned process."""

    work: Work
    backend: Backend
    index: int
    count: int
    threads: int
    warmup: int
    url: str
    root: str


@dataclass(slots=True)
class Outcome:
    """What one process reports: how much it did, when, and each call's wall ms."""

    done: int
    start: float
    end: float
    cpu_seconds: float
    samples_ms: list[float] = field(default_factory=list)
    commits: int | None = None


# -- inside a replica process -------------------------------------------------


def _signer() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )

    from callward.audit import FileSigner  # noqa: PLC0415

    return FileSigner(Ed25519PrivateKey.generate())


@contextlib.contextmanager
def _store(job: Job) -> Iterator[Any]:
    """The job's audit store, open, with a key of this process's own."""
    signer = _signer()
    if job.backend == "sqlite":
        from callward.audit import SQLiteAuditStore  # noqa: PLC0415

        store: Any = SQLiteAuditStore(Path(job.root) / f"audit-{job.work}.db", signer)
    else:
        from callward.audit import PostgresAuditStore  # noqa: PLC0415
        from callward.core._postgres import StoreUrl  # noqa: PLC0415

        store = PostgresAuditStore(StoreUrl.parse(job.url), signer)
    store.open()
    try:
        yield store
    finally:
        store.close()


def _governance(job: Job, barrier: Barrier) -> Outcome:
    from callward.core import ToolRegistry  # noqa: PLC0415
    from callward.core.gateway import Gateway  # noqa: PLC0415
    from callward.policies import Policy, PolicyState  # noqa: PLC0415

    registry = ToolRegistry()
    registry.load(EXAMPLES / "tools.py")
    if job.backend == "sqlite":
        state: Any = PolicyState(Path(job.root) / "policy-state.db")
    else:
        from callward.core._postgres import StoreUrl  # noqa: PLC0415
        from callward.policies import PostgresPolicyState  # noqa: PLC0415

        state = PostgresPolicyState(StoreUrl.parse(job.url))
    principal = f"replica{job.index}"
    try:
        policy = Policy.from_file(Path(job.root) / "policy.yaml", state=state)
        with _store(job) as store:
            gateway = Gateway(registry=registry, policy=policy, runner=NullRunner(),
                              audit=store)
            for _ in range(job.warmup):
                (result,) = gateway.handle_text(TEXT, principal=principal)
                if result.kind != "ok":
                    raise SystemExit(f"{principal}'s warm-up call ended as {result.kind}")
            samples = []
            barrier.wait()
            cpu, start = time.process_time(), time.perf_counter()
            for _ in range(job.count):
                began = time.perf_counter()
                (result,) = gateway.handle_text(TEXT, principal=principal)
                samples.append((time.perf_counter() - began) * 1000)
                if result.kind != "ok":
                    raise SystemExit(f"{principal}'s call ended as {result.kind}")
            end = time.perf_counter()
            return Outcome(job.count, start, end, time.process_time() - cpu, samples)
    finally:
        state.close()


def _threads(job: Job, work: Callable[[int], None], barrier: Barrier) -> tuple[float, float]:
    """Run ``work(thread_index)`` in ``job.threads`` threads from the barrier on."""
    errors: list[BaseException] = []
    ready = threading.Barrier(job.threads + 1)

    def run(index: int) -> None:
        ready.wait()
        try:
            work(index)
        except BaseException as exc:  # noqa: BLE001 - reported by the process below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(job.threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    ready.wait()
    for worker in workers:
        worker.join()
    end = time.perf_counter()
    if errors:
        raise errors[0]
    return start, end


def _records(job: Job, barrier: Barrier) -> Outcome:
    with _store(job) as store:
        for _ in range(job.warmup):
            store.append("call.denied", BODY)
        commits_before = getattr(store, "commits", None)
        cpu = time.process_time()

        def work(_: int) -> None:
            for _ in range(job.count):
                store.append("call.denied", BODY)

        start, end = _threads(job, work, barrier)
        commits = getattr(store, "commits", None)
        if commits is not None and commits_before is not None:
            commits -= commits_before
        return Outcome(job.count * job.threads, start, end, time.process_time() - cpu,
                       commits=commits)


def _plain(job: Job, barrier: Barrier) -> Outcome:
    """INSERTs with no callward: one commit each, every thread its own connection."""
    import psycopg  # noqa: PLC0415

    statement = PLAIN_INSERT if job.work == "plain" else SEQUENCED_INSERT
    record, signature = b"r" * 320, b"s" * 64
    row = ("2026-12-06T00:00:00.000000Z", "0" * 64, "k" * 16, str(BODY), record, "h" * 64,
           signature)
    connections = [psycopg.connect(job.url, autocommit=True,
                                   options="-c synchronous_commit=on")
                   for _ in range(job.threads)]
    try:
        for connection in connections:
            for _ in range(max(1, job.warmup // job.threads)):
                connection.execute(statement, row, prepare=True)
        cpu = time.process_time()

        def work(index: int) -> None:
            connection = connections[index]
            for _ in range(job.count):
                connection.execute(statement, row, prepare=True)

        start, end = _threads(job, work, barrier)
        return Outcome(job.count * job.threads, start, end, time.process_time() - cpu,
                       commits=job.count * job.threads)
    finally:
        for connection in connections:
            connection.close()


def _floor(job: Job, barrier: Barrier) -> Outcome:
    """
    What the server needs for one governed call at least: ``COMMITS_PER_CALL`` one-row
    commits one after the other on one connection, no callward.
    """
    import psycopg  # noqa: PLC0415

    row = ("2026-12-06T00:00:00.000000Z", "0" * 64, "k" * 16, str(BODY), b"r" * 320, "h" * 64,
           b"s" * 64)
    with psycopg.connect(job.url, autocommit=True,
                         options="-c synchronous_commit=on") as connection:
        for _ in range(job.warmup):
            connection.execute(PLAIN_INSERT, row, prepare=True)
        samples = []
        barrier.wait()
        cpu, start = time.process_time(), time.perf_counter()
        for _ in range(job.count):
            began = time.perf_counter()
            for _ in range(COMMITS_PER_CALL):
                connection.execute(PLAIN_INSERT, row, prepare=True)
            samples.append((time.perf_counter() - began) * 1000)
        end = time.perf_counter()
    return Outcome(job.count, start, end, time.process_time() - cpu, samples)


def _replica(job: Job, barrier: Barrier, results: multiprocessing.Queue[Any]) -> None:
    """A replica process: do the job, report its outcome or the error that ended it."""
    configure_logging()
    if os.path.exists(PASSFILE):
        os.environ.setdefault("PGPASSFILE", PASSFILE)
    runs = {"governance": _governance, "floor": _floor, "records": _records, "plain": _plain,
            "sequenced": _plain}
    try:
        results.put((job.index, runs[job.work](job, barrier)))
    except BaseException:  # noqa: BLE001 - the parent reports it and stops
        barrier.abort()
        results.put((job.index, traceback.format_exc()))


# -- the parent -----------------------------------------------------------------


def run_replicas(jobs: Sequence[Job], *, timeout_seconds: float = 900) -> list[Outcome]:
    """Start one process per job, release them together, and gather their outcomes."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(jobs) + 1)
    results: multiprocessing.Queue[Any] = context.Queue()
    processes = [context.Process(target=_replica, args=(job, barrier, results), daemon=True)
                 for job in jobs]
    for process in processes:
        process.start()
    outcomes: dict[int, Outcome] = {}
    failures: list[str] = []
    try:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=timeout_seconds)
        while len(outcomes) + len(failures) < len(jobs):
            try:
                index, outcome = results.get(timeout=timeout_seconds)
            except queue_module.Empty:
                failures.append("a replica neither finished nor failed in time")
                break
            if isinstance(outcome, Outcome):
                outcomes[index] = outcome
            else:
                failures.append(f"replica {index}:\n{outcome}")
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    if failures:
        raise SystemExit(f"{jobs[0].work} on {jobs[0].backend} failed:\n" + "\n".join(failures))
    return [outcomes[i] for i in sorted(outcomes)]


def aggregate_rate(outcomes: Sequence[Outcome]) -> float:
    """Everything done, over the time from the first start to the last end."""
    elapsed = max(o.end for o in outcomes) - min(o.start for o in outcomes)
    return sum(o.done for o in outcomes) / elapsed


def server_url(given: str | None) -> str:
    """The server to use: ``--url``, or callward's own (scripts/ensure-postgres.sh)."""
    if os.path.exists(PASSFILE):
        os.environ.setdefault("PGPASSFILE", PASSFILE)
    if given:
        return given
    done = subprocess.run([str(REPO / "scripts" / "ensure-postgres.sh")], capture_output=True,
                          text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"no PostgreSQL: scripts/ensure-postgres.sh said {done.stderr.strip()}")
    return done.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def fresh_database(server: str) -> Iterator[str]:
    """A new database on ``server`` for this run (its URL), dropped at the end."""
    import psycopg  # noqa: PLC0415

    name = f"cwbench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    url = server.rsplit("/", 1)[0] + "/" + name
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(PLAIN_TABLES)
        yield url
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def server_settings(url: str) -> str:
    """The server's version and the settings that decide what a commit costs."""
    import psycopg  # noqa: PLC0415

    names = ("synchronous_commit", "fsync", "wal_sync_method", "commit_delay",
             "shared_buffers")
    with psycopg.connect(url, autocommit=True) as conn:
        found = dict(conn.execute(
            "SELECT name, current_setting(name) FROM unnest(%s::text[]) AS name",
            (["server_version", *names],)).fetchall())
    settings = ", ".join(f"{name}={found[name]}" for name in names)
    return f"PostgreSQL {found['server_version']} ({settings})"


def log_size(url: str) -> int:
    import psycopg  # noqa: PLC0415

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT seq FROM log_head").fetchone()
    return int(row[0]) if row else 0


def replica_counts(text: str) -> list[int]:
    counts = sorted({int(part) for part in text.split(",") if part.strip()})
    if not counts or counts[0] < 1 or counts[-1] > MAX_REPLICAS:
        raise argparse.ArgumentTypeError(f"replica counts are 1..{MAX_REPLICAS}, e.g. 1,2,4")
    return counts


def thread_counts(text: str) -> list[int]:
    counts = sorted({int(part) for part in text.split(",") if part.strip()})
    if not counts or counts[0] < 1 or counts[-1] > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"thread counts are 1..{MAX_THREADS}, e.g. 8,32")
    return counts


def saturation(label: str, rates: dict[int, float]) -> str:
    """
    Where records/s stops rising with processes: the fewest processes within 10% of
    the most any count gave; if that is the largest count, it is still rising.
    """
    counts = sorted(rates)
    figures = ", ".join(f"{count}: {rates[count]:,.0f}/s" for count in counts)
    top = max(rates.values())
    enough = min(count for count in counts if rates[count] >= 0.9 * top)
    if enough == counts[-1] and len(counts) > 1:
        return f"{label}: still rising at {enough} processes ({figures})"
    return f"{label}: saturated at {enough} process(es), more add nothing ({figures})"


class Bench:
    """One run: the database, the scratch directory and the counts every table uses."""

    def __init__(self, args: argparse.Namespace, url: str, root: Path, warmup: int) -> None:
        self.args = args
        self.url = url
        self.root = root
        self.warmup = warmup
        principals = "\n".join(f"  replica{i}: {{roles: [analyst]}}"
                                for i in range(MAX_REPLICAS))
        (root / "policy.yaml").write_text(POLICY.format(principals=principals))

    def run(self, work: Work, backend: Backend, processes: int, *, count: int,
            threads: int = 1, warmup: int | None = None) -> list[Outcome]:
        warmup = self.warmup if warmup is None else warmup
        return run_replicas([
            Job(work, backend, i, count, threads, warmup, self.url, str(self.root))
            for i in range(processes)
        ])

    def governance(self) -> list[list[object]]:
        runs: list[tuple[str, Work, Backend, int]] = [
            ("callward, SQLite, one gateway", "governance", "sqlite", 1)]
        for processes in self.args.replicas:
            runs += [
                (f"callward, PostgreSQL, {processes} replica(s)", "governance", "postgres",
                 processes),
                (f"server floor: {COMMITS_PER_CALL} one-row commits in a row, {processes} "
                 "process(es) (no callward)", "floor", "postgres", processes),
            ]
        rows: list[list[object]] = []
        for name, work, backend, processes in runs:
            outcomes = self.run(work, backend, processes, count=self.args.calls)
            samples = [s for o in outcomes for s in o.samples_ms]
            p50, p99, mean = summarize(samples)
            cpu_ms = sum(o.cpu_seconds for o in outcomes) * 1000 / len(samples)
            rows.append([name, len(samples), p50, p99, mean, cpu_ms,
                         round(aggregate_rate(outcomes))])
        return rows

    def records(self, name: str, work: Work, backend: Backend, processes: int,
                threads: int) -> tuple[list[object], float]:
        """One configuration's row of the records table, and its records/s."""
        per_thread = max(1, self.args.records // (processes * threads))
        warmup = min(self.warmup, 40)
        in_log = (work, backend) == ("records", "postgres")
        before = log_size(self.url) if in_log else 0
        outcomes = self.run(work, backend, processes, count=per_thread, threads=threads,
                            warmup=warmup)
        done = sum(o.done for o in outcomes)
        if in_log:
            written, expected = log_size(self.url) - before, done + processes * warmup
            if written != expected:
                raise SystemExit(f"the fleet log grew by {written} records, not {expected}")
        commits = [o.commits for o in outcomes]
        known = [c for c in commits if c is not None]
        per_commit = (f"{done / sum(known):.1f}"
                      if len(known) == len(commits) and sum(known) else "-")
        rate = aggregate_rate(outcomes)
        cpu_us = sum(o.cpu_seconds for o in outcomes) * 1e6 / done
        return [name, f"{processes} x {threads}", done, round(rate), per_commit,
                round(cpu_us)], rate

    def records_table(self) -> tuple[list[list[object]], list[str]]:
        replicas = self.args.replicas
        configurations: list[tuple[str, Work, Backend, list[int], int]] = [
            ("plain INSERT, one commit, 1 connection (no callward)", "plain", "postgres", [1],
             1)]
        for threads in self.args.threads:
            configurations += [
                ("plain INSERT, one commit each (no callward)", "plain", "postgres", replicas,
                 threads),
                ("plain INSERT + one locked head row (a sequencer, no callward)", "sequenced",
                 "postgres", replicas, threads),
                ("callward SQLiteAuditStore (one process)", "records", "sqlite", [1], threads),
                ("callward PostgresAuditStore", "records", "postgres", replicas, threads),
            ]
        rows: list[list[object]] = []
        rates: dict[str, dict[int, float]] = {}
        for name, work, backend, counts, threads in configurations:
            for processes in counts:
                row, rate = self.records(name, work, backend, processes, threads)
                rows.append(row)
                if len(counts) > 1:
                    rates.setdefault(f"{name}, {threads} threads each", {})[processes] = rate
        return rows, [saturation(name, by_count) for name, by_count in rates.items()]


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000,
                        help="governed calls per replica process")
    parser.add_argument("--records", type=int, default=16000,
                        help="records per configuration, shared by its processes and threads")
    parser.add_argument("--threads", type=thread_counts, default=[8],
                        help="appending threads per process, e.g. 8 or 8,32")
    parser.add_argument("--replicas", type=replica_counts, default=[1, 2, 4],
                        help="replica process counts, e.g. 1,2,4")
    parser.add_argument("--url", help="a PostgreSQL server (default: callward's own, "
                        "scripts/ensure-postgres.sh); the bench makes and drops a database")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    args = parser.parse_args()
    warmup = 200
    if args.quick:
        args.calls, args.records, warmup = min(args.calls, 50), min(args.records, 400), 10
    server = server_url(args.url)
    print(f"CPU: {cpu_summary()}")
    print(f"Server: {server_settings(server)}")
    print(f"Load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    with tempfile.TemporaryDirectory() as directory, fresh_database(server) as url:
        bench = Bench(args, url, Path(directory), warmup)
        governance_rows = bench.governance()
        records_rows, saturations = bench.records_table()

    print_table(
        f"Governance per call: parse + policy (rate-limit state) + 2 durable signed records "
        f"(NullRunner; {args.calls} calls per process, one after the other)",
        ["path", "calls", "p50 ms", "p99 ms", "mean ms", "process CPU ms/call",
         "calls/s (all processes)"],
        governance_rows,
    )
    print_table(
        f"Durable records per second, aggregate ({args.records} per configuration; "
        f"processes x threads; every append/INSERT returns once committed)",
        ["what", "processes x threads", "records", "records/s", "records per commit",
         "CPU us/record"],
        records_rows,
    )
    print()
    for line in saturations:
        print(line)
    print(f"Load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
