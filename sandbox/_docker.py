"""
The Docker Engine backend: one hardened, single-use container per call.

Invariants:

- Every container is created from the sandbox image's id (the digest the audit
  log records) with ``container_options`` and nothing else, and carries the
  ``callward`` label and the owning process id.
- Every container is removed (``force=True``) in a ``finally``, whatever
  happened; a failed removal is logged, and ``remove_leftovers()`` removes
  what a dead process left behind.
- The container is killed the moment the tool passes ``limits.wall_seconds``
  or writes more than ``limits.output_bytes``; no more than the cap of its
  stdout is ever held in memory.
- Engine failures leave as ``SandboxUnavailable`` (``map_docker_errors``); a
  tool that breaks, hangs or floods ends as an ``Execution`` with its kind.
- Constructing a ``DockerSandbox`` does no I/O; the client, the image lookup
  and the container all happen on first use.
- Secrets are read from the ``SecretSource`` for the one execution that was
  granted them, all before any container is asked to run (a missing one is
  ``SecretUnavailable``); they reach the container only inside its request.
- A call granted egress runs in a container on the internal egress network with a
  lease on the egress proxy for exactly its allowlist, taken before any request
  reaches it: a warm one kept for that very allowlist (never one of another list or
  of none), else a cold one; on gVisor, registered with ``--network=none``, egress
  is refused (``SandboxUnavailable``) rather than silently dropped.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import docker
import docker.errors
import structlog

from callward.core import (
    Execution,
    ResourceLimits,
    SandboxUnavailable,
    Sha256Hex,
    ToolCall,
    ToolSpec,
)
from callward.sandbox._egress import NETWORK_LABEL, EgressLease, EgressNetwork
from callward.sandbox._engine import (
    API_VERSION,
    ClientFactory,
    client_from_env,
    map_docker_errors,
)
from callward.sandbox._image import SandboxImage, find_image
from callward.sandbox._limits import (
    OWNER_LABEL,
    OWNER_PID_LABEL,
    OWNER_PIDNS_LABEL,
    Runtime,
    container_options,
)
from callward.sandbox._pool import PoolConfig, WarmPool
from callward.sandbox._secrets import SecretSource, read_secrets
from callward.sandbox.base import (
    DEADLINE_GRACE_SECONDS,
    Isolation,
    RawExecution,
    Sandbox,
    has_runner_result,
    session_key,
)

log = structlog.get_logger()

DEFAULT_BASE_URL: Final = "unix:///var/run/docker.sock"
_ATTACH_PARAMS: Final = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
#: How long to wait for a container whose output has ended to report its exit.
_EXIT_WAIT_SECONDS: Final = 10
_RECV_BYTES: Final = 65536
_FRAME_HEADER: Final = struct.Struct(">BxxxL")
_STDOUT: Final = 1
#: Where the pids controller counts refused forks, for cgroup v1 and v2 (cgroupfs, systemd).
_PIDS_EVENTS: Final = (
    "/sys/fs/cgroup/pids/docker/{id}/pids.events",
    "/sys/fs/cgroup/docker/{id}/pids.events",
    "/sys/fs/cgroup/system.slice/docker-{id}.scope/pids.events",
)

#: Where the memory controller counts OOM kills (``oom_kill N``), cgroup v1 and v2.
_MEMORY_EVENTS: Final = (
    "/sys/fs/cgroup/memory/docker/{id}/memory.oom_control",
    "/sys/fs/cgroup/docker/{id}/memory.events",
    "/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.events",
)


class DockerSandbox:
    """
    Runs tools in single-use Docker containers; a ``ToolRunner`` and a ``SandboxBackend``.

    Args:
        base_url: The engine's address, e.g. ``unix:///var/run/docker.sock``.
        runtime: ``runc``, or ``runsc`` (gVisor) where the engine has it registered.
        image: The sandbox image to use; by default the one ``ensure_image()``
            built for this runner, looked up on first use.
        client_factory: Makes the Docker client instead of ``base_url`` (see ``from_env``).
        pool: How many warm containers to keep per limits profile; ``PoolConfig(size=0)``
            starts every container cold. The default keeps two.
        clock: Monotonic seconds, injected for tests.
        secrets: Where granted secrets are read from; without one, a call that
            needs a secret fails closed.

    Raises:
        ValueError: Both ``base_url`` and ``client_factory`` were given.
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        runtime: Runtime = "runc",
        image: SandboxImage | None = None,
        client_factory: ClientFactory | None = None,
        pool: PoolConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        secrets: SecretSource | None = None,
    ) -> None:
        if base_url is not None and client_factory is not None:
            raise ValueError("give base_url or client_factory, not both")
        self._client_factory: ClientFactory = client_factory or functools.partial(
            docker.DockerClient, base_url=base_url or DEFAULT_BASE_URL, version=API_VERSION
        )
        self._runtime: Runtime = runtime
        self._image = image
        self._clock = clock
        self._client: docker.DockerClient | None = None
        self._pool_config = pool if pool is not None else PoolConfig()
        self._pool: WarmPool[_Live] | None = None
        self._sessions: dict[tuple[str, ResourceLimits, tuple[str, ...]], _Session] = {}
        self._siblings: dict[Runtime, DockerSandbox] = {}
        self._secret_source = secrets
        self._egress: EgressNetwork | None = None
        self._lock = threading.Lock()
        self._sandbox = Sandbox(self, clock=clock)

    @classmethod
    def from_env(
        cls,
        *,
        runtime: Runtime = "runc",
        image: SandboxImage | None = None,
        pool: PoolConfig | None = None,
        secrets: SecretSource | None = None,
    ) -> DockerSandbox:
        """A sandbox on the engine named by ``DOCKER_HOST`` (and its TLS variables)."""
        return cls(runtime=runtime, image=image, client_factory=client_from_env, pool=pool,
                   secrets=secrets)

    def close(self) -> None:
        """
        Remove every warm container, then close the connection to the engine.

        The sandbox can be used again after: it reconnects and warms a new pool.
        """
        with self._lock:
            pool, self._pool = self._pool, None
            sessions = list(self._sessions.values())
            self._sessions.clear()
            siblings = list(self._siblings.values())
            self._siblings.clear()
        for sibling in siblings:
            sibling.close()
        if pool is not None:
            pool.close()
        for session in sessions:
            self._discard(session.live)
        with self._lock:
            egress, self._egress = self._egress, None
        if egress is not None:
            egress.close()
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with map_docker_errors("close the Docker client"):
                client.close()

    def __enter__(self) -> DockerSandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def image_digest(self) -> Sha256Hex:
        """
        The digest of the image every call runs in.

        Raises:
            SandboxUnavailable: The engine cannot be reached or lacks the image.
        """
        return self._sandbox_image().digest

    def run(
        self,
        spec: ToolSpec,
        call: ToolCall,
        limits: ResourceLimits,
        *,
        isolation: Isolation = "call",
        principal: str = "",
        session_id: str = "",
        secrets: tuple[str, ...] = (),
        egress: tuple[str, ...] = (),
    ) -> Execution:
        """
        Run ``spec`` with ``call``'s arguments under ``limits``.

        In ``call`` isolation (the default) in a fresh container; in ``session``
        isolation in the container of (``principal``, ``session_id``), started on
        its first call, a fresh process per call and /tmp wiped between calls.

        Args:
            secrets: Names of secrets to hand to this execution (already granted).
            egress: ``host:port`` targets it may reach through the egress proxy.

        Raises:
            SecretUnavailable: A secret cannot be read; nothing ran.
            SandboxUnavailable: The engine could not run the container at all,
                or egress was asked of a runtime that has no network (gVisor here).
        """
        values = read_secrets(self._secret_source, secrets)
        proxy_url = ""
        if egress:
            if self._runtime == "runsc":
                raise SandboxUnavailable(
                    f"{spec.name} is granted egress, and gVisor (runsc) is registered with "
                    "--network=none here, so it would have no network at all",
                    remediation="run tools granted egress on runc (policy runtime: runc), "
                    "or grant no egress",
                )
            proxy_url = self._egress_network().proxy_url
        return self._sandbox.run(
            spec, call, limits, isolation=isolation, principal=principal, session_id=session_id,
            secrets=values, egress=egress, egress_proxy=proxy_url,
        )

    def run_placed(
        self,
        spec: ToolSpec,
        call: ToolCall,
        limits: ResourceLimits,
        *,
        isolation: Isolation,
        runtime: Runtime | None,
        principal: str,
        session_id: str,
        secrets: tuple[str, ...] = (),
        egress: tuple[str, ...] = (),
    ) -> Execution:
        """
        Run as the policy placed the call: in ``isolation``, on ``runtime``.

        Another runtime than this sandbox's runs through a sandbox of its own on the
        same engine (with its own pool), made on first use and closed with this one.

        Raises:
            SandboxUnavailable: The engine could not run the container at all.
        """
        target = self if runtime in (None, self._runtime) else self._sibling(runtime)
        return target.run(
            spec, call, limits, isolation=isolation, principal=principal, session_id=session_id,
            secrets=secrets, egress=egress,
        )

    def _sibling(self, runtime: Runtime) -> DockerSandbox:
        with self._lock:
            sibling = self._siblings.get(runtime)
            if sibling is None:
                sibling = self._siblings[runtime] = DockerSandbox(
                    runtime=runtime, image=self._image, client_factory=self._client_factory,
                    pool=self._pool_config, clock=self._clock, secrets=self._secret_source,
                )
            return sibling

    def end_session(self, principal: str, session_id: str) -> None:
        """Remove the containers of one agent session, if it has any."""
        key = session_key(principal, session_id)
        with self._lock:
            ended = [self._sessions.pop(k) for k in list(self._sessions) if k[0] == key]
        for session in ended:
            self._discard(session.live)

    def execute(
        self,
        request_bytes: bytes,
        limits: ResourceLimits,
        session_key: str = "",
        egress: tuple[str, ...] = (),
    ) -> RawExecution:
        """
        Run the runner on ``request_bytes`` in a hardened container used only for it.

        The container is a warm one from the pool when one is ready under exactly
        ``limits``, else a new one started now; either way it is removed after.
        With a ``session_key``, the request runs in that session's container.

        Raises:
            SandboxUnavailable: The engine could not create, start or inspect the container.
        """
        if session_key:
            return self._execute_in_session(request_bytes, limits, session_key, egress)
        client = self._docker()
        pool = self._warm_pool()
        # A call granted egress takes a warm container started on the egress network
        # with a lease for exactly its allowlist; any other, one with no network.
        live = pool.take(limits, egress) if pool is not None else None
        warm = live is not None
        if live is None:
            live = self._start_container(limits, egress=egress)
        try:
            raw = self._run_on(client, live, request_bytes, limits, warm=warm)
        except SandboxUnavailable:
            self._discard(live)
            if not warm:
                raise
            # A warm container can vanish while it waits (an operator removed it, the
            # engine restarted): the call gets a cold one; a second failure is the engine's.
            log.warning("sandbox_warm_container_lost", container_id=live.container_id[:12])
            live = self._start_container(limits, egress=egress)
            try:
                raw = self._run_on(client, live, request_bytes, limits, warm=False)
            finally:
                self._discard(live)
            return raw
        except BaseException:
            self._discard(live)
            raise
        if pool is not None:
            pool.retire(live)
        else:
            self._discard(live)
        return raw

    def warm(self, limits: ResourceLimits, egress: tuple[str, ...] = ()) -> None:
        """
        Start keeping warm containers under ``limits`` now, ahead of the first call;
        with ``egress``, on the egress network with a lease for that allowlist.
        """
        pool = self._warm_pool()
        if pool is not None:
            pool.warm(limits, egress)

    def wait_warm(self, limits: ResourceLimits, count: int, timeout_seconds: float = 30,
                  egress: tuple[str, ...] = ()) -> bool:
        """Block until ``count`` warm containers under ``limits`` are ready; whether they are."""
        pool = self._warm_pool()
        if pool is None:
            return False
        pool.warm(limits, egress)
        return pool.wait_ready(limits, count, timeout_seconds, egress)

    def remove_leftovers(self) -> tuple[str, ...]:
        """
        Remove containers labelled ``callward`` whose owning process is gone.

        Only containers owned in this PID namespace are judged: a pid from another
        namespace sharing the engine (another container, another host) says nothing
        here, so those are left alone.

        A container whose owner is this very process is removed too: call this
        at start, before this process runs anything.

        Returns:
            The ids of the containers removed.

        Raises:
            SandboxUnavailable: The engine could not be reached.
        """
        client = self._docker()
        with map_docker_errors("list sandbox containers"):
            # The low-level list: one request, and no inspect that a removal could race.
            containers = client.api.containers(all=True, filters={"label": OWNER_LABEL})
        removed: list[str] = []
        for container in containers:
            if not is_leftover(container.get("Labels") or {}):
                continue
            container_id = str(container["Id"])
            with map_docker_errors("remove a leftover sandbox container"):
                try:
                    client.api.remove_container(container_id, force=True, v=True)
                except docker.errors.NotFound:
                    continue  # removed meanwhile by someone else
            removed.append(container_id)
        removed_networks = _remove_leftover_networks(client)
        log.info("sandbox_leftovers_removed", count=len(removed), networks=removed_networks)
        return tuple(removed)

    def _docker(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                with map_docker_errors("connect to the Docker Engine"):
                    self._client = self._client_factory()
            return self._client

    def _sandbox_image(self) -> SandboxImage:
        if self._image is None:
            image = find_image(self._docker())
            with self._lock:
                self._image = image
            log.info("sandbox_image_selected", tag=image.tag, digest=image.digest)
            return image
        return self._image

    def _execute_in_session(
        self, request_bytes: bytes, limits: ResourceLimits, key: str, egress: tuple[str, ...] = ()
    ) -> RawExecution:
        """
        One request in a session's container: one line in, one result line out.

        The runner stops the call at ``wall_seconds`` itself; the host kills the
        container at ``wall_seconds`` plus a grace. A call that hits a host-side
        limit, or ends without a result, ends the session's container too.
        """
        session = self._session(key, limits, egress)
        with session.lock:
            lease = session.live.lease
            forwarded_before, refused_before = _lease_counts(lease)
            container_id = session.live.container_id
            # Between two calls only the idle runner is in the container, so the
            # counters read after one call are the next call's "before".
            oom_before = session.oom_kills
            if oom_before is None:
                oom_before = _oom_kills(container_id) or 0
            pids_before = session.pids_refused
            if pids_before is None:
                pids_before = _pids_refused(container_id)
            session.demux.start_over()
            started = self._clock()
            exchange = _exchange(
                session.live.sock,
                request_bytes.replace(b"\n", b"") + b"\n",
                deadline=started + limits.wall_seconds + DEADLINE_GRACE_SECONDS,
                output_cap=limits.output_bytes,
                clock=self._clock,
                demux=session.demux,
                half_close=False,
            )
            wall_seconds = self._clock() - started
            # The runner stops the call at wall_seconds; the host, not the runner, says timeout.
            over_time = wall_seconds >= limits.wall_seconds
            oom_after = _oom_kills(container_id)
            pids_after = _pids_refused(container_id)
            pids_hit = pids_after > pids_before
            session.oom_kills, session.pids_refused = oom_after, pids_after
            session.last_used = self._clock()
            forwarded, refused = _lease_counts(lease)
        host_limit_hit = exchange.deadline_hit or exchange.output_cap_hit
        exit_code = None
        oom_killed = oom_after is not None and oom_after > oom_before
        runner_gone = not host_limit_hit and not has_runner_result(exchange.stdout)
        try:
            if runner_gone:
                # The session's runner itself is gone (on gVisor the OOM killer takes the
                # whole sandbox): the engine knows how it ended.
                client = self._docker()
                with map_docker_errors("wait for the sandbox container"):
                    exit_code = int(
                        client.api.wait(container_id, timeout=_EXIT_WAIT_SECONDS)["StatusCode"]
                    )
                    state = client.api.inspect_container(container_id)["State"]
                oom_killed = oom_killed or bool(state.get("OOMKilled"))
        finally:
            if host_limit_hit or runner_gone:
                with self._lock:
                    if self._sessions.get((key, limits, egress)) is session:
                        del self._sessions[(key, limits, egress)]
                self._discard(session.live)
        return RawExecution(
            stdout=exchange.stdout,
            output_bytes=exchange.output_bytes,
            wall_seconds=wall_seconds,
            exit_code=exit_code,
            deadline_hit=exchange.deadline_hit or over_time,
            output_cap_hit=exchange.output_cap_hit,
            oom_killed=oom_killed,
            pids_limit_hit=pids_hit,
            container_id=container_id,
            egress_allowed=forwarded - forwarded_before,
            egress_refused=refused - refused_before,
        )

    def _session(self, key: str, limits: ResourceLimits, egress: tuple[str, ...]) -> _Session:
        """The session's container under ``limits`` (and egress), started now if it has none."""
        now = self._clock()
        idle_seconds = self._pool_config.idle_seconds
        with self._lock:
            session = self._sessions.get((key, limits, egress))
            idle = [
                self._sessions.pop(k) for k, s in list(self._sessions.items())
                if s is not session and now - s.last_used > idle_seconds and not s.lock.locked()
            ]
        for ended in idle:
            self._discard(ended.live)
        if session is not None:
            return session
        live = self._start_container(limits, session=True, egress=egress)
        session = _Session(live, _Demultiplexer(limits.output_bytes), threading.Lock(), now)
        with self._lock:
            other = self._sessions.setdefault((key, limits, egress), session)
        if other is not session:
            self._discard(live)
        return other

    def _warm_pool(self) -> WarmPool[_Live] | None:
        if self._pool_config.size == 0:
            return None
        with self._lock:
            if self._pool is None:
                self._pool = WarmPool(
                    self._pool_config, start=self._start_warm, discard=self._discard,
                    clock=self._clock,
                )
            return self._pool

    def _egress_network(self) -> EgressNetwork:
        """The internal network and proxy for calls granted egress, made on first use."""
        client = self._docker()
        with self._lock:
            if self._egress is None:
                network = EgressNetwork(client)
                network.open()
                self._egress = network
            return self._egress

    def _start_warm(self, limits: ResourceLimits, egress: tuple[str, ...]) -> _Live:
        """One container for the warm pool (call isolation)."""
        return self._start_container(limits, egress=egress)

    def _start_container(
        self, limits: ResourceLimits, *, session: bool = False, egress: tuple[str, ...] = ()
    ) -> _Live:
        """
        Create, attach to and start one hardened container; its runner waits on stdin.

        With ``egress`` it joins the egress network, and its address holds a lease
        for exactly that allowlist before the caller can send it a request.
        """
        client = self._docker()
        network = self._egress_network() if egress else None
        options = container_options(
            limits,
            image=self._sandbox_image().image_id,
            runtime=self._runtime,
            owner_pid=os.getpid(),
            owner_pidns=own_pid_namespace(),
            session=session,
            egress_network=network.name if network is not None else "",
        )
        with map_docker_errors("create the sandbox container"):
            container_id = str(client.containers.create(**options).id)
        try:
            # Attached before start, so not one byte of output can be missed.
            with map_docker_errors("attach to the sandbox container"):
                attached = client.api.attach_socket(container_id, params=dict(_ATTACH_PARAMS))
            sock = _socket_of(attached)
        except BaseException:
            _remove(client, container_id)
            raise
        live = _Live(container_id, attached, sock, 0.0)
        try:
            with map_docker_errors("start the sandbox container"):
                client.api.start(container_id)
            if network is not None:
                live.network = network
                live.lease = network.lease(network.address_of(container_id), egress)
        except BaseException:
            self._discard(live)
            raise
        live.started = self._clock()
        return live

    def _discard(self, live: _Live) -> None:
        """Close the attach connection and kill and remove the container; never raises."""
        _close(live.attached, live.sock)
        _remove(self._docker(), live.container_id)
        # Only once the container is gone can its address not be the one leased.
        if live.network is not None and live.lease is not None:
            live.network.release(live.lease)

    def _run_on(
        self,
        client: docker.DockerClient,
        live: _Live,
        request_bytes: bytes,
        limits: ResourceLimits,
        *,
        warm: bool,
    ) -> RawExecution:
        # A cold container's clock runs from its start; a warm one's from the request.
        started = self._clock() if warm else live.started
        exchange = _exchange(
            live.sock,
            request_bytes,
            deadline=started + limits.wall_seconds,
            output_cap=limits.output_bytes,
            clock=self._clock,
        )
        wall_seconds = self._clock() - started
        container_id = live.container_id
        forwarded, refused = _lease_counts(live.lease)
        if exchange.deadline_hit or exchange.output_cap_hit:
            # The caller kills and removes it; the pids controller
            # still holds its counters until then.
            return RawExecution(
                stdout=exchange.stdout,
                output_bytes=exchange.output_bytes,
                wall_seconds=wall_seconds,
                exit_code=None,
                deadline_hit=exchange.deadline_hit,
                output_cap_hit=exchange.output_cap_hit,
                pids_limit_hit=_pids_limit_hit(container_id),
                container_id=container_id,
                egress_allowed=forwarded,
                egress_refused=refused,
            )
        oom_kills = _oom_kills(container_id) if has_runner_result(exchange.stdout) else None
        if oom_kills is not None:
            # The runner reported and its output ended, so it has exited; the kernel's
            # own counter says whether the OOM killer ran, without two engine round trips.
            return RawExecution(
                stdout=exchange.stdout,
                output_bytes=exchange.output_bytes,
                wall_seconds=wall_seconds,
                exit_code=None,
                oom_killed=oom_kills > 0,
                container_id=container_id,
                egress_allowed=forwarded,
                egress_refused=refused,
            )
        with map_docker_errors("wait for the sandbox container"):
            status = client.api.wait(container_id, timeout=_EXIT_WAIT_SECONDS)
            state = client.api.inspect_container(container_id)["State"]
        return RawExecution(
            stdout=exchange.stdout,
            output_bytes=exchange.output_bytes,
            wall_seconds=wall_seconds,
            exit_code=int(status["StatusCode"]),
            oom_killed=bool(state.get("OOMKilled")),
            container_id=container_id,
            egress_allowed=forwarded,
            egress_refused=refused,
        )


@dataclass(slots=True)
class _Live:
    """One started container, its runner waiting on stdin, and the host's attach socket."""

    container_id: str
    attached: object
    sock: socket.socket
    started: float
    network: EgressNetwork | None = None
    lease: EgressLease | None = None


def _lease_counts(lease: EgressLease | None) -> tuple[int, int]:
    """Connections forwarded and refused so far for a lease (0, 0 without one)."""
    return (0, 0) if lease is None else (lease.forwarded, lease.refused)


@dataclass(slots=True)
class _Session:
    """One agent session's container; one call at a time."""

    live: _Live
    demux: _Demultiplexer
    lock: threading.Lock
    last_used: float
    #: The cgroup counters after the last call (None: not read yet, or unreadable).
    oom_kills: int | None = None
    pids_refused: int | None = None


@dataclass(frozen=True, slots=True)
class _Exchange:
    stdout: bytes
    output_bytes: int
    deadline_hit: bool
    output_cap_hit: bool


class _Demultiplexer:
    """
    Splits Docker's attach stream (8-byte headers: stream, 0, 0, 0, length) as it arrives.

    Counts every payload byte of stdout and stderr, keeps at most ``cap`` bytes
    of stdout, and never waits for a whole frame, so a huge frame is counted
    (and cut off) as its bytes come in.
    """

    def __init__(self, cap: int) -> None:
        self.stdout = bytearray()
        self.output_bytes = 0
        self._cap = cap
        self._header = bytearray()
        self._stream = 0
        self._left = 0

    def start_over(self) -> None:
        """Forget what was kept and counted (a session's next call), not where a frame is."""
        self.stdout = bytearray()
        self.output_bytes = 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._left == 0:
                need = _FRAME_HEADER.size - len(self._header)
                self._header += view[:need]
                view = view[need:]
                if len(self._header) == _FRAME_HEADER.size:
                    self._stream, self._left = _FRAME_HEADER.unpack(self._header)
                    self._header.clear()
                continue
            part = view[: self._left]
            view = view[len(part) :]
            self._left -= len(part)
            self.output_bytes += len(part)
            room = self._cap - len(self.stdout)
            if self._stream == _STDOUT and room > 0:
                self.stdout += part[:room]


def _exchange(
    sock: socket.socket,
    request_bytes: bytes,
    *,
    deadline: float,
    output_cap: int,
    clock: Callable[[], float],
    demux: _Demultiplexer | None = None,
    half_close: bool = True,
) -> _Exchange:
    """
    Send the request, half-close, and read the output until the result line, its end,
    the deadline or the cap. A session's call keeps its stdin open and its demux.
    """
    demux = demux if demux is not None else _Demultiplexer(output_cap)

    def ended(*, deadline_hit: bool = False, output_cap_hit: bool = False) -> _Exchange:
        return _Exchange(bytes(demux.stdout), demux.output_bytes, deadline_hit, output_cap_hit)

    try:
        sock.settimeout(max(deadline - clock(), 0.001))
        sock.sendall(request_bytes)
        if half_close:
            sock.shutdown(socket.SHUT_WR)  # the runner reads stdin to its end
    except TimeoutError:
        return ended(deadline_hit=True)
    except OSError as exc:
        # The runner is gone before it read its request; its output and exit say why.
        log.warning("sandbox_request_not_delivered", error=type(exc).__name__)
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            return ended(deadline_hit=True)
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(_RECV_BYTES)
        except TimeoutError:
            return ended(deadline_hit=True)
        except OSError as exc:
            log.warning("sandbox_output_stream_broken", error=type(exc).__name__)
            return ended()
        demux.feed(chunk)
        if demux.output_bytes > output_cap:
            return ended(output_cap_hit=True)
        # The runner writes one line to stdout, its result, and then exits: waiting
        # for the stream's end would only wait for the engine to notice the exit.
        if not chunk or b"\n" in demux.stdout:
            return ended()


def _socket_of(attached: object) -> socket.socket:
    """The socket under docker-py's attach object (a ``SocketIO`` on plain connections)."""
    sock = getattr(attached, "_sock", attached)
    if not isinstance(sock, socket.socket):
        raise SandboxUnavailable(
            f"the Docker Engine's attach stream is a {type(sock).__name__}, not a socket"
        )
    return sock


def _close(attached: object, sock: socket.socket) -> None:
    """
    Close the attach connection for real.

    docker-py's ``SocketIO`` holds a reference that keeps ``sock.close()`` from
    closing the descriptor; a connection left open stops the engine's copy of
    the output, and with it the kill and removal of a flooding container.
    """
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    close = getattr(attached, "close", None)
    if callable(close):
        close()
    sock.close()


def _pids_limit_hit(container_id: str) -> bool:
    """Whether the container's pids controller refused a fork or clone (host-local engines)."""
    return _pids_refused(container_id) > 0


def _pids_refused(container_id: str) -> int:
    """How many forks or clones the container's pids controller refused (0 if unknown)."""
    return _cgroup_counter(_PIDS_EVENTS, container_id, "max") or 0


def _oom_kills(container_id: str) -> int | None:
    """
    How often the kernel's OOM killer ran in the container's memory cgroup.

    None where the cgroup cannot be read (a remote engine, another layout):
    the caller then asks the engine.
    """
    return _cgroup_counter(_MEMORY_EVENTS, container_id, "oom_kill")


def _cgroup_counter(templates: Sequence[str], container_id: str, counter: str) -> int | None:
    """
    A counter from the first readable ``*.events`` file of the container's cgroup.

    None when no such file can be read or it has no such counter.
    """
    for template in templates:
        try:
            events = Path(template.format(id=container_id)).read_text(encoding="ascii")
        except OSError:
            continue
        for line in events.splitlines():
            name, _, count = line.partition(" ")
            if name == counter and count.strip().isdigit():
                return int(count)
        return None
    return None


def _remove(client: docker.DockerClient, container_id: str) -> None:
    """Kill and remove one container; a failure is logged, never raised."""
    try:
        with map_docker_errors("remove the sandbox container"):
            client.api.remove_container(container_id, force=True, v=True)
    except SandboxUnavailable as exc:
        log.exception(
            "sandbox_container_remove_failed",
            container_id=container_id[:12],
            error=type(exc.__cause__).__name__,
        )


def _remove_leftover_networks(client: docker.DockerClient) -> int:
    """
    Remove egress networks whose owning process is gone; how many were removed.

    Their firewall rules name a bridge that no longer exists and match nothing.
    """
    with map_docker_errors("list egress networks"):
        networks = client.api.networks(filters={"label": NETWORK_LABEL})
    removed = 0
    for network in networks:
        if not is_leftover(network.get("Labels") or {}):
            continue
        try:
            with map_docker_errors("remove a leftover egress network"):
                client.api.remove_network(str(network["Id"]))
        except SandboxUnavailable:  # gone meanwhile, or still in use: the next sweep retries
            log.warning("egress_network_not_removed", network=str(network.get("Name", "")))
            continue
        removed += 1
    return removed


@functools.cache
def own_pid_namespace() -> str:
    """This process's PID namespace, as ``pid:[inode]``; empty where it cannot be read."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def is_leftover(labels: dict[str, str]) -> bool:
    """
    Whether a callward container's owner is gone (or is this very process).

    A container owned in another PID namespace is never a leftover here: its pid
    names some process over there, alive or not.
    """
    pidns = labels.get(OWNER_PIDNS_LABEL, "")
    if pidns and pidns != own_pid_namespace():
        return False
    return not _owner_alive(labels.get(OWNER_PID_LABEL, ""))


def _owner_alive(pid_label: str) -> bool:
    """Whether the process named by a ``callward.pid`` label still runs (and is not this one)."""
    if not pid_label.isdigit():
        return False
    pid = int(pid_label)
    if pid in (0, os.getpid()):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True
