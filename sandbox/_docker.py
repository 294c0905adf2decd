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
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
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
from callward.sandbox._engine import (
    API_VERSION,
    ClientFactory,
    client_from_env,
    map_docker_errors,
)
from callward.sandbox._image import SandboxImage, find_image
from callward.sandbox._limits import OWNER_LABEL, OWNER_PID_LABEL, Runtime, container_options
from callward.sandbox.base import RawExecution, Sandbox

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


class DockerSandbox:
    """
    Runs tools in single-use Docker containers; a ``ToolRunner`` and a ``SandboxBackend``.

    Args:
        base_url: The engine's address, e.g. ``unix:///var/run/docker.sock``.
        runtime: ``runc``, or ``runsc`` (gVisor) where the engine has it registered.
        image: The sandbox image to use; by default the one ``ensure_image()``
            built for this runner, looked up on first use.
        client_factory: Makes the Docker client instead of ``base_url`` (see ``from_env``).
        clock: Monotonic seconds, injected for tests.

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
        clock: Callable[[], float] = time.monotonic,
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
        self._lock = threading.Lock()
        self._sandbox = Sandbox(self, clock=clock)

    @classmethod
    def from_env(
        cls, *, runtime: Runtime = "runc", image: SandboxImage | None = None
    ) -> DockerSandbox:
        """A sandbox on the engine named by ``DOCKER_HOST`` (and its TLS variables)."""
        return cls(runtime=runtime, image=image, client_factory=client_from_env)

    def close(self) -> None:
        """Close the connection to the engine, if one was opened; the sandbox can reopen it."""
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

    def run(self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
        """
        Run ``spec`` with ``call``'s arguments under ``limits`` in a fresh container.

        Raises:
            SandboxUnavailable: The engine could not run the container at all.
        """
        return self._sandbox.run(spec, call, limits)

    def execute(self, request_bytes: bytes, limits: ResourceLimits) -> RawExecution:
        """
        Run the runner on ``request_bytes`` in a new hardened container, then remove it.

        Raises:
            SandboxUnavailable: The engine could not create, start or inspect the container.
        """
        client = self._docker()
        options = container_options(
            limits,
            image=self._sandbox_image().image_id,
            runtime=self._runtime,
            owner_pid=os.getpid(),
        )
        with map_docker_errors("create the sandbox container"):
            container_id = str(client.containers.create(**options).id)
        try:
            return self._attach_and_run(client, container_id, request_bytes, limits)
        finally:
            _remove(client, container_id)

    def remove_leftovers(self) -> tuple[str, ...]:
        """
        Remove containers labelled ``callward`` whose owning process is gone.

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
            if _owner_alive((container.get("Labels") or {}).get(OWNER_PID_LABEL, "")):
                continue
            container_id = str(container["Id"])
            with map_docker_errors("remove a leftover sandbox container"):
                try:
                    client.api.remove_container(container_id, force=True, v=True)
                except docker.errors.NotFound:
                    continue  # removed meanwhile by someone else
            removed.append(container_id)
        log.info("sandbox_leftovers_removed", count=len(removed))
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

    def _attach_and_run(
        self,
        client: docker.DockerClient,
        container_id: str,
        request_bytes: bytes,
        limits: ResourceLimits,
    ) -> RawExecution:
        # Attached before start, so not one byte of output can be missed.
        with map_docker_errors("attach to the sandbox container"):
            attached = client.api.attach_socket(container_id, params=dict(_ATTACH_PARAMS))
        sock = _socket_of(attached)
        try:
            with map_docker_errors("start the sandbox container"):
                client.api.start(container_id)
            started = self._clock()
            exchange = _exchange(
                sock,
                request_bytes,
                deadline=started + limits.wall_seconds,
                output_cap=limits.output_bytes,
                clock=self._clock,
            )
            wall_seconds = self._clock() - started
        finally:
            _close(attached, sock)
        if exchange.deadline_hit or exchange.output_cap_hit:
            # The caller's `finally` kills and removes it; the pids controller
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
        )


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
) -> _Exchange:
    """Send the request, half-close, and read the output until it ends, the deadline or the cap."""
    demux = _Demultiplexer(output_cap)

    def ended(*, deadline_hit: bool = False, output_cap_hit: bool = False) -> _Exchange:
        return _Exchange(bytes(demux.stdout), demux.output_bytes, deadline_hit, output_cap_hit)

    try:
        sock.settimeout(max(deadline - clock(), 0.001))
        sock.sendall(request_bytes)
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
        if not chunk:
            return ended()
        demux.feed(chunk)
        if demux.output_bytes > output_cap:
            return ended(output_cap_hit=True)


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
    for template in _PIDS_EVENTS:
        try:
            events = Path(template.format(id=container_id)).read_text(encoding="ascii")
        except OSError:
            continue
        for line in events.splitlines():
            name, _, count = line.partition(" ")
            if name == "max" and count.strip().isdigit() and int(count) > 0:
                return True
        return False
    return False


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
