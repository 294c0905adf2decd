"""
The Docker Engine backend: hardened containers, each used for one call or one session.

Invariants:

- Every container is created from the sandbox image's id (the digest the audit
  log records) with ``container_options`` and nothing else, and carries the
  ``callward`` label and the owning process id.
- Every container is removed (``force=True``) when its call ends, whatever
  happened (a session's when a call in it hits a host-side limit or its runner is
  gone, when the session ends, or on ``close``); a failed removal is logged, and
  ``remove_leftovers()`` removes what a dead process left behind (``_leftovers.py``).
- A runner that hit a limit is killed: its container is removed the moment
  ``Sandbox`` finishes it with ``limit``; which cgroup limit fired is read from the
  kernel (``_cgroups.py``).
- Engine failures leave as ``SandboxUnavailable`` (``map_docker_errors``); a
  tool that breaks, hangs or floods ends as an ``Execution`` with its kind.
- Constructing a ``DockerSandbox`` does no I/O; the client, the image lookup
  and the container all happen on first use.
- A call granted egress runs in a container on the internal egress network with a
  lease on the egress proxy for exactly its allowlist, taken before any request
  reaches it: a warm one kept for that very allowlist (never one of another list or
  of none), else a cold one; on gVisor, registered with ``--network=none``, egress
  is refused (``SandboxUnavailable``) rather than silently dropped.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from typing import Final

import docker
import structlog

from callward.core import ResourceLimits, Runtime, SandboxUnavailable, Sha256Hex
from callward.sandbox._attach import attach
from callward.sandbox._cgroups import (
    GVISOR_HOST_TASKS_MIN,
    default_gvisor_host_tasks,
    ensure_task_budget,
)
from callward.sandbox._channels import CallChannel, Live, Session, SessionChannel
from callward.sandbox._egress import EgressNetwork
from callward.sandbox._engine import (
    API_VERSION,
    ClientFactory,
    client_from_env,
    map_docker_errors,
    remove_container,
)
from callward.sandbox._image import SandboxImage, find_image
from callward.sandbox._leftovers import own_pid_namespace, remove_leftovers
from callward.sandbox._limits import container_options
from callward.sandbox._pool import PoolConfig, WarmPool
from callward.sandbox._sandbox import Sandbox
from callward.sandbox._secrets import SecretSource
from callward.sandbox.base import RunnerChannel

log = structlog.get_logger()

DEFAULT_BASE_URL: Final = "unix:///var/run/docker.sock"
#: How long to wait for a container whose output has ended to report its exit.
_EXIT_WAIT_SECONDS: Final = 10

_SessionKey = tuple[str, ResourceLimits, tuple[str, ...]]


class DockerSandbox(Sandbox):
    """
    A ``Sandbox`` on the Docker Engine; runs tools in hardened, single-use containers.

    Args:
        base_url: The engine's address, e.g. ``unix:///var/run/docker.sock``.
        runtime: ``runc``, or ``runsc`` (gVisor) where the engine has it registered;
            a call placed on the other runs on a backend of its own on the same engine.
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
        gvisor_host_tasks: int | None = None,
    ) -> None:
        if base_url is not None and client_factory is not None:
            raise ValueError("give base_url or client_factory, not both")
        backend = DockerBackend(
            client_factory=client_factory or functools.partial(
                docker.DockerClient, base_url=base_url or DEFAULT_BASE_URL, version=API_VERSION
            ),
            runtime=runtime, image=image, pool=pool, clock=clock,
            gvisor_host_tasks=gvisor_host_tasks,
        )
        super().__init__(backend, runtime=runtime, backend_for=backend.on_runtime,
                         secrets=secrets, clock=clock)
        self._docker_backend = backend

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

    @property
    def backend(self) -> DockerBackend:
        return self._docker_backend

    def warm(self, limits: ResourceLimits, egress: tuple[str, ...] = ()) -> None:
        """
        Start keeping warm containers under ``limits`` now, ahead of the first call;
        with ``egress``, on the egress network with a lease for that allowlist.
        """
        self._docker_backend.warm(limits, egress)

    def wait_warm(self, limits: ResourceLimits, count: int, timeout_seconds: float = 30,
                  egress: tuple[str, ...] = ()) -> bool:
        """Block until ``count`` warm containers under ``limits`` are ready; whether they are."""
        return self._docker_backend.wait_warm(limits, count, timeout_seconds, egress)

    def remove_leftovers(self) -> tuple[str, ...]:
        """
        Remove the containers and egress networks a dead process left (see
        ``_leftovers.py``); call it at start, before this process runs anything.

        Returns:
            The ids of the containers removed.

        Raises:
            SandboxUnavailable: The engine could not be reached.
        """
        return self._docker_backend.remove_leftovers()


class DockerBackend:
    """
    The ``SandboxBackend`` on one Docker Engine, for one runtime.

    Args:
        client_factory: Makes the Docker client, on first use.
        runtime: ``runc``, or ``runsc`` (gVisor).
        image: The sandbox image; by default looked up on first use.
        pool: The warm pool's size and limits.
        clock: Monotonic seconds, injected for tests.
    """

    def __init__(
        self,
        *,
        client_factory: ClientFactory,
        runtime: Runtime = "runc",
        image: SandboxImage | None = None,
        pool: PoolConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        gvisor_host_tasks: int | None = None,
    ) -> None:
        if gvisor_host_tasks is not None and gvisor_host_tasks < GVISOR_HOST_TASKS_MIN:
            raise ValueError(f"gvisor_host_tasks is at least {GVISOR_HOST_TASKS_MIN}")
        self._client_factory = client_factory
        self._gvisor_host_tasks = gvisor_host_tasks
        self._task_budget_set = False
        self._runtime: Runtime = runtime
        self._image = image
        self._clock = clock
        self._client: docker.DockerClient | None = None
        self._pool_config = pool if pool is not None else PoolConfig()
        self._pool: WarmPool[Live] | None = None
        self._sessions: dict[_SessionKey, Session] = {}
        self._egress: EgressNetwork | None = None
        self._lock = threading.Lock()

    def on_runtime(self, runtime: Runtime) -> DockerBackend:
        """A backend on the same engine, image and pool settings, for ``runtime``."""
        return DockerBackend(client_factory=self._client_factory, runtime=runtime,
                             image=self._image, pool=self._pool_config, clock=self._clock,
                             gvisor_host_tasks=self._gvisor_host_tasks)

    @property
    def image_digest(self) -> Sha256Hex:
        """
        Raises:
            SandboxUnavailable: The engine cannot be reached or lacks the image.
        """
        return self._sandbox_image().digest

    def open(
        self,
        limits: ResourceLimits,
        *,
        session: str = "",
        egress: tuple[str, ...] = (),
        warm: bool = True,
    ) -> RunnerChannel:
        if egress and self._runtime == "runsc":
            raise SandboxUnavailable(
                "a call granted egress would have no network at all: gVisor (runsc) is "
                "registered with --network=none here",
                remediation="run tools granted egress on runc (policy runtime: runc), "
                "or grant no egress",
            )
        if session:
            return self._open_in_session(session, limits, egress)
        pool = self._warm_pool()
        # A call granted egress takes a warm container started on the egress network
        # with a lease for exactly its allowlist; any other, one with no network.
        live = pool.take(limits, egress) if pool is not None and warm else None
        release = self._discard if pool is None else pool.retire
        if live is not None:
            return CallChannel(live, head_start_seconds=0.0, warm=True, release=release,
                               discard=self._discard, exit_of=self._exit_of)
        live = self._start_container(limits, egress=egress)
        return CallChannel(live, head_start_seconds=self._clock() - live.started, warm=False,
                           release=release, discard=self._discard, exit_of=self._exit_of)

    def end_session(self, session: str) -> None:
        with self._lock:
            ended = [self._sessions.pop(k) for k in list(self._sessions) if k[0] == session]
        for each in ended:
            self._discard(each.live)

    def warm(self, limits: ResourceLimits, egress: tuple[str, ...] = ()) -> None:
        """Keep warm containers under ``limits`` (and ``egress``) from now on."""
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
        Raises:
            SandboxUnavailable: The engine could not be reached.
        """
        return remove_leftovers(self._docker())

    def close(self) -> None:
        """
        Remove every warm and session container and the egress network, then close the
        connection to the engine; the backend reconnects on its next use.
        """
        with self._lock:
            pool, self._pool = self._pool, None
            sessions = list(self._sessions.values())
            self._sessions.clear()
        if pool is not None:
            pool.close()
        for each in sessions:
            self._discard(each.live)
        with self._lock:
            egress, self._egress = self._egress, None
        if egress is not None:
            egress.close()
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with map_docker_errors("close the Docker client"):
                client.close()

    # -- containers ---------------------------------------------------------------------

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

    def _warm_pool(self) -> WarmPool[Live] | None:
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

    def _ensure_task_budget(self) -> None:
        """
        Bound the host tasks of every gVisor container on this host together, once per
        backend, before its first gVisor container: gVisor's sentry runs hundreds of host
        threads under a fork bomb, and nothing else bounds them across containers.

        Raises:
            SandboxUnavailable: The bound cannot be set here; no gVisor call runs unbounded.
        """
        if self._task_budget_set:
            return
        budget = self._gvisor_host_tasks or default_gvisor_host_tasks()
        try:
            written = ensure_task_budget(budget)
        except OSError as exc:
            raise SandboxUnavailable(
                f"cannot bound the host tasks of gVisor containers ({type(exc).__name__})",
                remediation="run the gateway as root on a host whose cgroup pids controller "
                "is writable (cgroupfs driver), or use runtime runc",
            ) from exc
        log.info("gvisor_task_budget_set", max_tasks=budget, path=str(written))
        self._task_budget_set = True

    def _start_warm(self, limits: ResourceLimits, egress: tuple[str, ...]) -> Live:
        """One container for the warm pool (call isolation)."""
        return self._start_container(limits, egress=egress)

    def _start_container(
        self, limits: ResourceLimits, *, session: bool = False, egress: tuple[str, ...] = ()
    ) -> Live:
        """
        Create, attach to and start one hardened container; its runner waits on stdin.

        With ``egress`` it joins the egress network, and its address holds a lease
        for exactly that allowlist before the caller can send it a request.
        """
        client = self._docker()
        if self._runtime == "runsc":
            self._ensure_task_budget()
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
            stream = attach(client, container_id, end_input=not session)
        except BaseException:
            remove_container(client, container_id)
            raise
        live = Live(container_id, stream, 0.0)
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

    def _discard(self, live: Live) -> None:
        """Close the attach connection and kill and remove the container; never raises."""
        live.stream.close()
        remove_container(self._docker(), live.container_id)
        # Only once the container is gone can its address not be the one leased.
        if live.network is not None and live.lease is not None:
            live.network.release(live.lease)

    def _exit_of(self, container_id: str) -> tuple[int, bool]:
        """
        The exit code of a container whose output has ended, and whether the engine
        saw the OOM killer in it.

        Raises:
            SandboxUnavailable: The engine could not say (the container is gone).
        """
        client = self._docker()
        with map_docker_errors("wait for the sandbox container"):
            status = client.api.wait(container_id, timeout=_EXIT_WAIT_SECONDS)
            state = client.api.inspect_container(container_id)["State"]
        return int(status["StatusCode"]), bool(state.get("OOMKilled"))

    # -- sessions ------------------------------------------------------------------------

    def _open_in_session(
        self, key: str, limits: ResourceLimits, egress: tuple[str, ...]
    ) -> SessionChannel:
        session = self._session(key, limits, egress)
        session.lock.acquire()
        try:
            return SessionChannel(
                session, exit_of=self._exit_of, clock=self._clock,
                end=functools.partial(self._end_session_container, (key, limits, egress), session),
            )
        except BaseException:
            session.lock.release()
            raise

    def _session(self, key: str, limits: ResourceLimits, egress: tuple[str, ...]) -> Session:
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
        session = Session(live, threading.Lock(), now)
        with self._lock:
            other = self._sessions.setdefault((key, limits, egress), session)
        if other is not session:
            self._discard(live)
        return other

    def _end_session_container(self, key: _SessionKey, session: Session) -> None:
        """Remove a session's container after a call that must not be followed by another."""
        with self._lock:
            if self._sessions.get(key) is session:
                del self._sessions[key]
        self._discard(session.live)


