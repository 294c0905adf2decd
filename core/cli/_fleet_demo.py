"""
``callward demo --fleet``: three gateway replicas, each its own process with its own
signing key, share one PostgreSQL; a few hundred MCP calls are driven across them at
once, one replica is killed with SIGKILL while a call is in flight, and the one log
they all wrote is verified with the three public keys.

What it checks, each on a line of its report, then ``verdict: OK`` or ``FAILED``:

- **One log.** ``callward audit verify --store URL`` with the replicas' public keys.
- **A shared rate limit.** ``add`` is limited to 40 calls for the whole fleet: more
  are sent, spread over the replicas; exactly 40 ran, the rest were refused.
- **A single-use approval.** A ``deploy`` is proposed, approved with ``callward policy
  approve``, then sent to two replicas at the same moment: exactly one runs it.
- **Nothing lost with a replica.** The replica killed mid-call left a call authorized
  but not completed; after its lease another replica closes it (``call.interrupted``),
  and every authorized call in the log is closed exactly once.

It always stops what it started, on error and on Ctrl-C too: the replicas, their
sandbox containers (found by their owner's pid label) and, unless ``--keep``, the
run's database and the replicas' homes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

from callward.core._postgres import StoreUrl, connect, store_errors
from callward.core.errors import AuditUnavailable, CallwardError
from callward.core.gateway._config import Home, example_config_path

if TYPE_CHECKING:
    from mcp import Client
    from mcp_types import CallToolResult

DEFAULT_STORE_URL: Final = "postgresql://callward@127.0.0.1:54329/callward"
DEFAULT_PASSFILE: Final = Path("/var/lib/callward-postgres/callward.pgpass")
REPLICAS: Final = ("replica-1", "replica-2", "replica-3")
AGENTS: Final = ("alice", "bob", "carol")
APPROVER: Final = "lena"
LIMITED_TOOL: Final = "add"
LIMIT_ID: Final = "fleet-adds"
LEASE_SECONDS: Final = 3.0
HEARTBEAT_SECONDS: Final = 1.0
#: The load before the kill, per replica and agent: squares, and every fourth an add
#: (7 each, 63 in all: past the fleet's limit of 40).
CALLS_PER_AGENT: Final = 27
ADD_EVERY: Final = 4
#: Calls each agent still makes on a surviving replica once the other one is killed.
CALLS_AFTER_KILL: Final = 10
#: The slow call the killed replica is running when it dies.
PAUSE_SECONDS: Final = 6.0
DEPLOY: Final = {"service": "billing", "version": "2.4.1"}
START_SECONDS: Final = 120.0
APP: Final = "callward-fleet-demo"
#: The exit code of a run stopped by Ctrl-C or SIGTERM (128 + SIGINT, as shells use).
EXIT_INTERRUPTED: Final = 130


@dataclass
class _Replica:
    """One ``callward mcp serve`` process of the fleet."""

    name: str
    home: Home
    port: int
    process: subprocess.Popen[bytes] | None = None
    key_id: str = ""
    exit_code: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def log_path(self) -> Path:
        return self.home.root / "serve.log"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class _Tally:
    """What the clients saw: calls sent, and answers by kind (the rest got none)."""

    sent: Counter[str] = field(default_factory=Counter)
    kinds: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # replica, tool, kind

    def answered(self, replica: str) -> int:
        return sum(n for (name, _, _), n in self.kinds.items() if name == replica)

    def lost(self, replica: str) -> int:
        """Calls sent to ``replica`` that got no answer (it was killed under them)."""
        return self.sent[replica] - self.answered(replica)


@dataclass
class _Report:
    """The demo's checks; any failure makes the verdict FAILED."""

    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, line: str) -> None:
        print(f"  [{'ok' if ok else 'FAILED'}] {line}", flush=True)
        if not ok:
            self.failures.append(line)


def resolve_store(given: str | None) -> StoreUrl:
    """
    The server to create the run's database on: ``given``, else ``CALLWARD_STORE_URL``,
    else callward's own (``scripts/ensure-postgres.sh``), signing in with ``PGPASSFILE``
    or that server's password file.
    """
    text = given or os.environ.get("CALLWARD_STORE_URL") or DEFAULT_STORE_URL
    passfile = os.environ.get("PGPASSFILE") or (
        str(DEFAULT_PASSFILE) if DEFAULT_PASSFILE.is_file() else None)
    return StoreUrl.parse(text, password_file=passfile)


def _in_database(server: StoreUrl, name: str) -> StoreUrl:
    parts = urllib.parse.urlsplit(server.url)
    return StoreUrl.parse(parts._replace(path="/" + name).geturl(),
                          password_file=server.password_file)


@contextlib.contextmanager
def _fresh_database(server: StoreUrl, *, keep: bool) -> Iterator[StoreUrl]:
    """A new, empty database for this run (so the log starts at seq 1); dropped unless kept."""
    from psycopg import sql  # noqa: PLC0415 - the CLI edge loads the driver on use

    name = f"callward_fleet_demo_{time.strftime('%Y%m%d_%H%M%S')}_{secrets.token_hex(2)}"
    with store_errors(AuditUnavailable, "create the demo's database", url=server), connect(
            server, application_name=APP, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _in_database(server, name)
    try:
        yield url
    finally:
        if keep:
            print(f"  database kept: {url}", flush=True)
        else:
            with store_errors(AuditUnavailable, "drop the demo's database", url=server), \
                    connect(server, application_name=APP, autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)))
            print(f"  database dropped: {url}", flush=True)


def _write_config(directory: Path, store: StoreUrl, tokens: Mapping[str, str]) -> Path:
    """The fleet's ``callward.yaml``: the demo tools and policy, the store, the clients."""
    import yaml  # noqa: PLC0415

    from callward.core.mcp._auth import token_sha256  # noqa: PLC0415

    examples = example_config_path().parent
    section: dict[str, Any] = {"url": store.url, "lease_seconds": LEASE_SECONDS,
                               "heartbeat_seconds": HEARTBEAT_SECONDS}
    if store.password_file is not None:
        section["password_file"] = store.password_file
    config = {
        "tools": [str(examples / "fleet_tools.py")],
        "policy": str(examples / "policy-fleet.yaml"),
        "sandbox": {"runtime": "runc"},
        "store": section,
        "mcp": {"clients": [{"principal": principal, "token_sha256": token_sha256(token)}
                            for principal, token in tokens.items()]},
    }
    path = directory / "callward.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _shared_limit(policy: Path) -> int:
    """The demo policy's fleet-wide limit on ``add``, so the check and the policy agree."""
    import yaml  # noqa: PLC0415

    document = yaml.safe_load(policy.read_text(encoding="utf-8"))
    for limit in document.get("rate_limits", []):
        if limit.get("id") == LIMIT_ID:
            return int(limit["limit"])
    raise ValueError(f"{policy} has no rate limit {LIMIT_ID}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "callward.core.cli", *args]


def _child_env(store: StoreUrl, **extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    if store.password_file is not None:
        env["PGPASSFILE"] = store.password_file
    return env


class _Fleet:
    """The replicas: started together, awaited, stopped; their containers removed."""

    def __init__(self, root: Path, config: Path, store: StoreUrl, tokens: Mapping[str, str],
                 *, skip_probes: bool) -> None:
        self.config = config
        self.store = store
        self.tokens = tokens
        self.replicas = [_Replica(name, Home(root / name), _free_port()) for name in REPLICAS]
        self._skip_probes = skip_probes

    def start(self) -> None:
        for replica in self.replicas:
            replica.home.create()
            args = ["--home", str(replica.home.root), "mcp", "serve", "--config",
                    str(self.config), "--transport", "http", "--port", str(replica.port)]
            if self._skip_probes:
                args.append("--unsafe-skip-probes")
            with replica.log_path.open("wb") as log_file:
                # Its own session: only this demo signals it, in the order it chooses.
                replica.process = subprocess.Popen(  # noqa: S603 - our own CLI, argument list
                    _cli(*args), stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                    env=_child_env(self.store, CALLWARD_REPLICA_ID=replica.name),
                    start_new_session=True)

    def wait_ready(self) -> None:
        """Wait until every replica accepts connections and has its key."""
        from callward.audit import key_id_of, load_public_key  # noqa: PLC0415

        deadline = time.monotonic() + START_SECONDS
        waiting = list(self.replicas)
        while waiting:
            for replica in list(waiting):
                if not replica.running():
                    raise _DemoFailed(f"{replica.name} exited while starting:\n"
                                      f"{replica.log_tail()}")
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", replica.port)) == 0:
                        replica.key_id = key_id_of(load_public_key(replica.home.public_key))
                        waiting.remove(replica)
            if waiting and time.monotonic() > deadline:
                raise _DemoFailed(f"{', '.join(r.name for r in waiting)} did not answer "
                                  f"within {START_SECONDS:.0f} s")
            time.sleep(0.1)

    def stop(self, replica: _Replica, *, seconds: float = 30.0) -> int | None:
        """SIGINT (the server closes its log in order), SIGKILL if it takes too long."""
        process = replica.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=seconds)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        replica.exit_code = process.returncode
        return replica.exit_code

    def close(self) -> int:
        """Stop every replica still running and remove every container they owned."""
        for replica in self.replicas:
            self.stop(replica, seconds=20.0)
        return self.remove_containers()

    def remove_containers(self) -> int:
        """Remove the sandbox containers of the replicas (all stopped); how many."""
        import docker  # noqa: PLC0415 - only the demo's clean-up needs the engine here

        pids = [r.process.pid for r in self.replicas if r.process is not None]
        client = docker.from_env(version="1.41")
        removed = 0
        try:
            for pid in pids:
                for container in client.api.containers(
                        all=True, filters={"label": f"callward.pid={pid}"}):
                    with contextlib.suppress(docker.errors.NotFound):
                        client.api.remove_container(container["Id"], force=True, v=True)
                        removed += 1
        finally:
            client.close()
        return removed

    def containers_left(self) -> int:
        import docker  # noqa: PLC0415

        pids = {str(r.process.pid) for r in self.replicas if r.process is not None}
        client = docker.from_env(version="1.41")
        try:
            found = client.api.containers(all=True, filters={"label": "callward"})
        finally:
            client.close()
        return sum(1 for c in found if (c.get("Labels") or {}).get("callward.pid") in pids)


class _DemoFailed(Exception):
    """The demo could not go on (a replica did not start); the verdict is FAILED."""


class _Log:
    """Reads the fleet's one log straight from its table, for the report."""

    def __init__(self, store: StoreUrl) -> None:
        self._store = store

    def records(self, after: int = 0, kind: str | None = None
                ) -> list[tuple[int, str, str, dict[str, Any]]]:
        """(seq, kind, key id, body) of each record after ``after``, in order."""
        query = "SELECT seq, kind, key_id, body FROM records WHERE seq > %s"
        params: list[object] = [after]
        if kind is not None:
            query += " AND kind = %s"
            params.append(kind)
        with store_errors(AuditUnavailable, "read the fleet's log", url=self._store), \
                connect(self._store, application_name=APP) as conn:
            rows = conn.execute(query + " ORDER BY seq", params).fetchall()
        return [(int(str(seq)), str(k), str(key), json.loads(str(body)))
                for seq, k, key, body in rows]

    def wait_for(self, found: Callable[[list[tuple[int, str, str, dict[str, Any]]]], int | None],
                 *, kind: str, seconds: float) -> int | None:
        """Poll the records of ``kind`` until ``found`` names a seq; None at the deadline."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            seq = found(self.records(kind=kind))
            if seq is not None:
                return seq
            time.sleep(0.05)
        return None


# -- the MCP clients ------------------------------------------------------------------


def _kind(result: CallToolResult) -> str:
    content = result.structured_content
    if isinstance(content, dict) and isinstance(content.get("kind"), str):
        return str(content["kind"])
    return "error" if result.is_error else "ok"


@contextlib.asynccontextmanager
async def _client(replica: _Replica, token: str) -> AsyncIterator[Client]:
    import httpx2  # noqa: PLC0415
    from mcp import Client  # noqa: PLC0415
    from mcp.client.streamable_http import streamable_http_client  # noqa: PLC0415

    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                  timeout=60) as http, Client(
            streamable_http_client(replica.url, http_client=http),
            read_timeout_seconds=60) as client:
        yield client


async def _call(client: Client, replica: _Replica, tool: str, arguments: dict[str, Any],
                tally: _Tally) -> CallToolResult | None:
    tally.sent[replica.name] += 1
    try:
        result = await client.call_tool(tool, arguments)
    except Exception:  # noqa: BLE001 - a killed replica answers nothing: the call is lost
        return None
    tally.kinds[(replica.name, tool, _kind(result))] += 1
    return result


async def _agent_load(replica: _Replica, principal: str, token: str, tally: _Tally,
                      seed: int) -> None:
    """One agent's session on one replica: squares, with adds among them."""
    async with _client(replica, token) as client:
        for number in range(CALLS_PER_AGENT):
            if number % ADD_EVERY == 1:
                await _call(client, replica, LIMITED_TOOL, {"a": seed, "b": number}, tally)
            else:
                await _call(client, replica, "square", {"x": seed * 100 + number}, tally)


async def _load(fleet: _Fleet, tokens: Mapping[str, str], tally: _Tally) -> None:
    import anyio  # noqa: PLC0415

    async with anyio.create_task_group() as group:
        for index, replica in enumerate(fleet.replicas):
            for offset, principal in enumerate(AGENTS):
                group.start_soon(_agent_load, replica, principal, tokens[principal], tally,
                                 10 * index + offset)


def _proposal_of(result: CallToolResult | None) -> str | None:
    content = None if result is None else result.structured_content
    decision = content.get("decision") if isinstance(content, dict) else None
    reasons = decision.get("reasons") if isinstance(decision, dict) else None
    for reason in reasons if isinstance(reasons, list) else []:
        if isinstance(reason, str) and reason.startswith("proposal."):
            return reason.removeprefix("proposal.")
    return None


@dataclass
class _Race:
    """The approval: its proposal, the approving command's run, each racer's kind and why."""

    proposal: str | None = None
    approved: subprocess.CompletedProcess[str] | None = None
    outcomes: list[tuple[str, str]] = field(default_factory=lambda: [("none", "")] * 2)


def _message(result: CallToolResult) -> str:
    content = result.structured_content
    inner = content.get("content") if isinstance(content, dict) else None
    message = inner.get("message") if isinstance(inner, dict) else None
    return message if isinstance(message, str) else ""


async def _approval_race(fleet: _Fleet, token: str, tally: _Tally) -> _Race:
    """
    Propose a deploy on replica-1, approve it with ``callward policy approve``, then send
    it to replica-1 and replica-2 at the same moment.
    """
    import anyio  # noqa: PLC0415

    first, second = fleet.replicas[0], fleet.replicas[1]
    race = _Race()
    async with _client(first, token) as one, _client(second, token) as two:
        race.proposal = _proposal_of(await _call(one, first, "deploy", DEPLOY, tally))
        if race.proposal is None:
            return race
        race.approved = await anyio.to_thread.run_sync(_approve, fleet, race.proposal)
        if race.approved.returncode != 0:
            return race

        async def fire(slot: int, client: Client, replica: _Replica) -> None:
            result = await _call(client, replica, "deploy", DEPLOY, tally)
            race.outcomes[slot] = (("lost", "") if result is None
                                   else (_kind(result), _message(result)))

        async with anyio.create_task_group() as group:
            group.start_soon(fire, 0, one, first)
            group.start_soon(fire, 1, two, second)
    return race


def _approve(fleet: _Fleet, proposal: str) -> subprocess.CompletedProcess[str]:
    home = fleet.replicas[0].home.root
    return subprocess.run(  # noqa: S603 - our own CLI, argument list
        _cli("--home", str(home), "policy", "approve", proposal, "--by", APPROVER,
             "--config", str(fleet.config)),
        capture_output=True, text=True, env=_child_env(fleet.store), timeout=60, check=False)


@dataclass
class _Kill:
    """The SIGKILL of the last replica: the call it was running, and when."""

    authorized_seq: int | None = None
    at: float | None = None


async def _kill_phase(fleet: _Fleet, log: _Log, tokens: Mapping[str, str], tally: _Tally
                      ) -> _Kill:
    """
    The survivors serve their agents while the last replica runs a slow call; once that
    call's ``call.authorized`` is in the log, the replica is killed with SIGKILL, and the
    survivors' agents go on for a few more calls each.
    """
    import anyio  # noqa: PLC0415

    *survivors, doomed = fleet.replicas
    kill = _Kill()
    killed = anyio.Event()

    def pause_authorized(records: list[tuple[int, str, str, dict[str, Any]]]) -> int | None:
        for seq, _, key_id, body in records:
            if key_id == doomed.key_id and (body.get("call") or {}).get("name") == "pause":
                return seq
        return None

    async def killer() -> None:
        seq = await anyio.to_thread.run_sync(
            lambda: log.wait_for(pause_authorized, kind="call.authorized", seconds=30))
        if seq is not None and doomed.process is not None:
            doomed.process.send_signal(signal.SIGKILL)
            kill.authorized_seq, kill.at = seq, time.monotonic()
        killed.set()

    async def slow_call(principal: str) -> None:
        with contextlib.suppress(Exception):  # the replica dies under it, by design
            async with _client(doomed, tokens[principal]) as client:
                await _call(client, doomed, "pause", {"seconds": PAUSE_SECONDS}, tally)

    async def queued_calls(principal: str) -> None:
        with contextlib.suppress(Exception):
            async with _client(doomed, tokens[principal]) as client:
                for number in range(CALLS_AFTER_KILL):
                    if await _call(client, doomed, "square", {"x": number}, tally) is None:
                        return

    async def survivor(replica: _Replica, principal: str) -> None:
        async with _client(replica, tokens[principal]) as client:
            number = 0
            while not killed.is_set():
                await _call(client, replica, "square", {"x": number}, tally)
                number += 1
            for more in range(CALLS_AFTER_KILL):
                await _call(client, replica, "square", {"x": number + more}, tally)

    async with anyio.create_task_group() as group:
        group.start_soon(killer)
        group.start_soon(slow_call, "carol")
        for replica in survivors:
            for principal in AGENTS[:2]:
                group.start_soon(survivor, replica, principal)
        await anyio.sleep(0.3)  # the slow call first, then calls that queue behind it
        group.start_soon(queued_calls, "alice")
    return kill


# -- the report -------------------------------------------------------------------------


def _verify(fleet: _Fleet) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    keys = [arg for r in fleet.replicas for arg in ("--public-key", str(r.home.public_key))]
    done = subprocess.run(  # noqa: S603 - our own CLI, argument list
        _cli("audit", "verify", "--store", fleet.store.url, *keys),
        capture_output=True, text=True, env=_child_env(fleet.store), timeout=120, check=False)
    try:
        verdict = json.loads(done.stdout)
    except ValueError:
        verdict = {}
    return done, verdict if isinstance(verdict, dict) else {}


def _report(fleet: _Fleet, log: _Log, tally: _Tally, report: _Report, *, limit: int,
            race: _Race,
            kill: _Kill, interrupted_after: float | None) -> tuple[int, str] | None:
    """Print what the log and the clients say, and check it; the verified head or None."""
    records = log.records()
    names = {r.key_id: r.name for r in fleet.replicas}
    by_kind: Counter[tuple[str, str]] = Counter()  # (kind, replica)
    tools: dict[int, str] = {}
    for seq, kind, key_id, body in records:
        by_kind[(kind, names.get(key_id, key_id))] += 1
        if kind == "call.authorized":
            tools[seq] = str((body.get("call") or {}).get("name"))

    print("\nCalls per replica (from the log; sent/answered/lost as the clients saw them):")
    for replica in fleet.replicas:
        ran = by_kind[("call.authorized", replica.name)]
        denied = by_kind[("call.denied", replica.name)]
        print(f"  {replica.name}: {ran + denied} decided ({ran} authorized, {denied} denied); "
              f"clients sent {tally.sent[replica.name]}, answered "
              f"{tally.answered(replica.name)}, lost {tally.lost(replica.name)}"
              f"{'  (killed with SIGKILL)' if replica is fleet.replicas[-1] else ''}")
    started = sorted(str(body.get("replica")) for _, kind, _, body in records
                     if kind == "gateway.started")
    report.check(started == sorted(REPLICAS),
                 f"gateway.started names each replica once: {', '.join(started)}")

    print(f"\nShared rate limit {LIMIT_ID}: {limit} {LIMITED_TOOL} calls per window, "
          "for the whole fleet")
    refused = Counter(names.get(key, key) for _, kind, key, body in records
                      if kind == "call.denied" and (body.get("call") or {}).get("name")
                      == LIMITED_TOOL and (body.get("decision") or {}).get("kind")
                      == "rate_limit")
    ran_limited = sum(1 for name in tools.values() if name == LIMITED_TOOL)
    sent_limited = sum(n for (_, tool, _), n in tally.kinds.items() if tool == LIMITED_TOOL)
    print(f"  sent {sent_limited}; ran {ran_limited}; refused {sum(refused.values())} ("
          + ", ".join(f"{name} {refused[name]}" for name in REPLICAS) + ")")
    report.check(sent_limited > limit and ran_limited == limit
                 and ran_limited + sum(refused.values()) == sent_limited,
                 f"total allowed on {LIMITED_TOOL} == the limit ({ran_limited} == {limit})")

    print(f"\nApproval: proposal {race.proposal or '(none)'} approved by {APPROVER}; the "
          "approved call sent to replica-1 and replica-2 at the same moment:")
    for name, (kind, message) in zip(REPLICAS, race.outcomes, strict=False):
        print(f"  {name}: {kind}{f' ({message})' if message and kind != 'ok' else ''}")
    if race.approved is not None and race.approved.returncode != 0:
        print(f"  callward policy approve exited {race.approved.returncode}: "
              f"{(race.approved.stdout + race.approved.stderr).strip()[-600:]}")
    deploys = [seq for seq, name in tools.items() if name == "deploy"]
    deploys_ok = sum(1 for _, kind, _, body in records if kind == "call.completed"
                     and body.get("authorized_seq") in deploys and body.get("outcome") == "ok")
    granted = sum(n for (kind, _), n in by_kind.items() if kind == "approval.granted")
    racers = sorted(kind for kind, _ in race.outcomes)
    report.check(racers == ["approval_required", "ok"] and len(deploys) == 1
                 and deploys_ok == 1 and granted == 1,
                 f"the approval ran exactly once (authorized at seq "
                 f"{', '.join(map(str, deploys)) or '-'}; approval.granted {granted})")

    closed: Counter[int] = Counter()
    interrupted = []
    for seq, kind, key_id, body in records:
        if kind in ("call.completed", "call.interrupted"):
            closed[int(body.get("authorized_seq") or 0)] += 1
        if kind == "call.interrupted":
            interrupted.append((seq, int(body.get("authorized_seq") or 0),
                                names.get(key_id, key_id)))
    print(f"\nReplica killed: {fleet.replicas[-1].name} (SIGKILL while running the call "
          f"authorized at seq {kill.authorized_seq}); lease {LEASE_SECONDS:g} s")
    for seq, authorized, writer in interrupted:
        print(f"  call.interrupted seq {seq} closes seq {authorized} "
              f"({tools.get(authorized, '?')}), written by {writer}")
    if interrupted_after is not None:
        print(f"  closed {interrupted_after:.1f} s after the kill")
    writers = {writer for _, _, writer in interrupted}
    report.check(bool(interrupted) and kill.authorized_seq in {a for _, a, _ in interrupted}
                 and fleet.replicas[-1].name not in writers,
                 f"call.interrupted records: {len(interrupted)} (seqs "
                 f"{', '.join(str(s) for s, _, _ in interrupted) or '-'}), by a survivor")
    unclosed = [seq for seq in tools if closed[seq] != 1]
    report.check(not unclosed, f"every call.authorized closed exactly once ({len(tools)} calls"
                 + (f"; not: {unclosed[:10]}" if unclosed else "") + ")")

    print("\nStopping and verifying:")
    for replica in fleet.replicas[:-1]:
        report.check(replica.exit_code == 0,
                     f"{replica.name} stopped on SIGINT, exit {replica.exit_code}")
    done, verdict = _verify(fleet)
    head_seq, head = int(verdict.get("records") or 0), str(verdict.get("head") or "")
    report.check(done.returncode == 0 and verdict.get("verdict") == "OK"
                 and head_seq == (records[-1][0] if records else 0),
                 f"callward audit verify --store {fleet.store.url} with the 3 replicas' keys: "
                 + (f"{head_seq} records, {verdict.get('checkpoints')} checkpoints"
                    if done.returncode == 0 else
                    f"exit {done.returncode}: {(done.stdout + done.stderr).strip()[-600:]}"))
    return (head_seq, head) if done.returncode == 0 else None


def run_fleet_demo(*, store: str | None = None, keep: bool = False,
                   unsafe_skip_probes: bool = False) -> int:
    """
    Run the fleet demo; 0 when every check held, else 1 (also when the server cannot
    be reached or a replica does not start).

    Raises:
        ConfigurationError: The store URL is not a PostgreSQL URL or holds a password.
    """
    began = time.monotonic()
    server = resolve_store(store)
    policy = example_config_path().parent / "policy-fleet.yaml"
    limit = _shared_limit(policy)
    report = _Report()
    tally = _Tally()
    print(f"callward demo --fleet\n  server: {server}", flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    root = Path(tempfile.mkdtemp(prefix="callward-fleet-"))
    try:
        with contextlib.ExitStack() as stack:
            if not keep:
                stack.callback(shutil.rmtree, root, ignore_errors=True)
            url = stack.enter_context(_fresh_database(server, keep=keep))
            tokens = {principal: secrets.token_urlsafe(24) for principal in AGENTS}
            config = _write_config(root, url, tokens)
            fleet = _Fleet(root, config, url, tokens, skip_probes=unsafe_skip_probes)
            print(f"  store:  {url} (a fresh database for this run)\n  config: {config}\n"
                  f"  policy: {policy}", flush=True)
            stack.callback(_clean_up, fleet)
            head = _run(fleet, report, tally, limit=limit)
            if keep:
                print(f"  homes kept: {root}")
    except (_DemoFailed, CallwardError) as exc:  # the demo cannot go on: FAILED, not a crash
        message = exc.message if isinstance(exc, CallwardError) else str(exc)
        report.failures.append(message)
        print(f"  {message}", flush=True)
        head = None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, after the clean-up above ran
        print("verdict: FAILED (interrupted; the replicas, their containers and the run's "
              "database are gone)", flush=True)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"  wall time {time.monotonic() - began:.1f} s")
    if report.failures or head is None:
        print(f"verdict: FAILED ({len(report.failures)} check(s): "
              f"{'; '.join(f.splitlines()[0] for f in report.failures)})")
        return 1
    print(f"verdict: OK (log head seq {head[0]}, hash {head[1]})")
    return 0


def _run(fleet: _Fleet, report: _Report, tally: _Tally, *, limit: int) -> tuple[int, str] | None:
    import anyio  # noqa: PLC0415

    log = _Log(fleet.store)
    started = time.monotonic()
    fleet.start()
    fleet.wait_ready()
    print(f"\nStarted {len(fleet.replicas)} replicas in {time.monotonic() - started:.1f} s: "
          + ", ".join(f"{r.name} (pid {r.process.pid if r.process else '-'}, :{r.port}, "
                      f"key {r.key_id})" for r in fleet.replicas), flush=True)
    tokens = fleet.tokens

    started = time.monotonic()
    anyio.run(_load, fleet, tokens, tally)
    print(f"Load: {sum(tally.sent.values())} calls from {len(AGENTS)} agents on every replica "
          f"at once in {time.monotonic() - started:.1f} s", flush=True)
    race = anyio.run(_approval_race, fleet, tokens["alice"], tally)
    print(f"Approval: proposed, approved, raced (proposal {race.proposal})", flush=True)

    sent_before = sum(tally.sent.values())
    kill = anyio.run(_kill_phase, fleet, log, tokens, tally)
    print(f"Kill: {fleet.replicas[-1].name} killed with SIGKILL mid-call; "
          f"{sum(tally.sent.values()) - sent_before} more calls; waiting for its lease",
          flush=True)
    doomed = fleet.replicas[-1]
    if doomed.process is not None:
        doomed.process.wait(timeout=30)
        doomed.exit_code = doomed.process.returncode
    closed = None if kill.authorized_seq is None else log.wait_for(
        lambda records: next((s for s, _, _, b in records
                              if b.get("authorized_seq") == kill.authorized_seq), None),
        kind="call.interrupted", seconds=LEASE_SECONDS * 4 + 10)
    interrupted_after = (None if closed is None or kill.at is None
                         else time.monotonic() - kill.at)
    for replica in fleet.replicas[:-1]:
        fleet.stop(replica)
    removed = fleet.remove_containers()
    print(f"Calls driven in all: {sum(tally.sent.values())}; replicas stopped; removed "
          f"{removed} sandbox container(s) the killed replica left", flush=True)
    head = _report(fleet, log, tally, report, limit=limit, race=race, kill=kill,
                   interrupted_after=interrupted_after)
    left = fleet.containers_left()
    report.check(left == 0, f"sandbox containers of the fleet left: {left}")
    return head


def _clean_up(fleet: _Fleet) -> None:
    """Whatever happened: no replica left running, no container of theirs left."""
    removed = fleet.close()
    if removed:
        print(f"  removed {removed} sandbox container(s) the replicas left", flush=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """
    SIGTERM stops the demo as Ctrl-C does, so that its clean-up runs: as SIGINT, which
    an event loop running the clients turns into a cancellation first (unless SIGINT is
    ignored, as in a background job: then at once).
    """
    if callable(signal.getsignal(signal.SIGINT)):
        signal.raise_signal(signal.SIGINT)
        return
    raise KeyboardInterrupt
