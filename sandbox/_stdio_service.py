"""
A long-lived stdio service (an upstream MCP server) inside one hardened container.

The container gets exactly the options of ``container_options`` (no network,
read-only root, ``noexec`` tmpfs at ``/tmp``, every capability dropped,
``no-new-privileges``, the user ``nobody``, finite memory, pids, CPU and open
files), with the service's command instead of the runner. It lives as long as
the service, not one call; the caller bounds each request's time.

The service's files and the Python distributions it imports are baked into an
image built offline from the sandbox's base image (``callward/service:<tag>``,
the tag a digest of everything copied in), so nothing is mounted from the host
and the image id names exactly what ran.

The service's stdin and stdout are reached through the Engine API: ``attach()``
attaches, then starts the container, and gives the connected socket, which
``AttachedStdio`` (``_attached_stdio.py``) reads and writes on an event loop.
``stdio_command()`` gives the same as a host command (``docker start --attach
--interactive``), for a client that can only run a subprocess.

A service granted ``egress`` (``host:port`` targets) joins an internal network
of its own whose one way out is the egress proxy (``_egress.py``), told to it
in ``HTTP_PROXY``/``HTTPS_PROXY``; every other service keeps no network. gVisor,
registered here with ``--network=none``, cannot give egress: that fails closed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import re
import socket
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Final

import docker
import docker.errors
import structlog

from callward.core import ResourceLimits, Runtime, SandboxUnavailable, Sha256Hex
from callward.sandbox._attach import ATTACH_PARAMS, close_attached, socket_of
from callward.sandbox._egress import EgressNetwork
from callward.sandbox._engine import ClientFactory, client_from_env, map_docker_errors
from callward.sandbox._image import BASE_IMAGE
from callward.sandbox._limits import container_options

log = structlog.get_logger()

SERVICE_REPOSITORY: Final = "callward/service"
SERVICE_ROOT: Final = "/opt/callward/service"
SITE_IN_IMAGE: Final = "/opt/callward/site"
_TAG_HEX_DIGITS: Final = 16
_STOP_SECONDS: Final = 2
_REQUIREMENT_NAME: Final = re.compile(r"\A\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def distribution_closure(roots: Iterable[str]) -> tuple[importlib.metadata.Distribution, ...]:
    """
    The installed distributions ``roots`` need, without extras, sorted by name.

    Requirements guarded by an environment marker that names an extra are left
    out; one that is not installed here is skipped (it is for another Python).
    """
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found[key] = dist
        for requirement in dist.requires or ():
            if "extra ==" in requirement:
                continue
            match = _REQUIREMENT_NAME.match(requirement)
            if match:
                todo.append(match.group(1))
    return tuple(found[key] for key in sorted(found))


def _site_files(dists: Sequence[importlib.metadata.Distribution]) -> dict[str, Path]:
    """Each distribution's installed files, by their path under site-packages."""
    files: dict[str, Path] = {}
    for dist in dists:
        for entry in dist.files or ():
            relative = PurePosixPath(str(entry))
            if relative.is_absolute() or ".." in relative.parts or "__pycache__" in relative.parts:
                continue
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                files[str(relative)] = path
    return files


@dataclass(frozen=True, slots=True)
class ServiceImageSpec:
    """
    What a service image holds.

    Attributes:
        files: Files of the service, by their path under ``SERVICE_ROOT``.
        distributions: Installed Python distributions it imports (with their
            dependencies), copied from this interpreter's environment.
    """

    files: Mapping[str, Path] = field(default_factory=dict)
    distributions: tuple[str, ...] = ()

    def contents(self) -> dict[str, Path]:
        """Every file of the image's top layer, by its absolute path in the image."""
        contents: dict[str, Path] = {}
        for relative, path in _site_files(distribution_closure(self.distributions)).items():
            contents[f"{SITE_IN_IMAGE}/{relative}"] = path
        for relative, path in self.files.items():
            clean = PurePosixPath(relative)
            if clean.is_absolute() or ".." in clean.parts:
                raise ValueError("a service file's path is relative, inside the service root")
            contents[f"{SERVICE_ROOT}/{clean}"] = path
        return contents


def _context(contents: Mapping[str, Path], base_id: str) -> tuple[bytes, str]:
    """The build context (a tar with the Dockerfile) and the tag naming its content."""
    digest = hashlib.sha256(base_id.encode())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for target in sorted(contents):
            data = contents[target].read_bytes()
            digest.update(target.encode() + b"\0" + hashlib.sha256(data).digest())
            info = tarfile.TarInfo("root" + target)
            info.size = len(data)
            info.mode = 0o444
            tar.addfile(info, io.BytesIO(data))
        dockerfile = (
            f"FROM {base_id}\n"
            "COPY root/ /\n"
            f"ENV PYTHONPATH={SITE_IN_IMAGE} PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8 \\\n"
            "    PATH=/usr/local/bin:/usr/bin:/bin\n"
            "USER 65534:65534\n"
            "WORKDIR /tmp\n"
        ).encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
    return buffer.getvalue(), digest.hexdigest()[:_TAG_HEX_DIGITS]


def ensure_service_image(
    spec: ServiceImageSpec, *, client_factory: ClientFactory = client_from_env
) -> Sha256Hex:
    """
    The id of the service image for ``spec``, built offline when not cached.

    Raises:
        SandboxUnavailable: The engine failed, or the base image is missing.
    """
    client = client_factory()
    try:
        with map_docker_errors("find the sandbox base image"):
            base_id = str(client.images.get(BASE_IMAGE).id)
        context, tag = _context(spec.contents(), base_id)
        name = f"{SERVICE_REPOSITORY}:{tag}"
        try:
            with map_docker_errors("find the service image"):
                return Sha256Hex(str(client.images.get(name).id))
        except SandboxUnavailable:
            log.info("service_image_building", tag=name)
        with map_docker_errors("build the service image"):
            image, _logs = client.images.build(
                fileobj=io.BytesIO(context), custom_context=True, tag=name,
                network_mode="none", pull=False, rm=True, forcerm=True,
            )
        log.info("service_image_built", tag=name, image_id=str(image.id))
        return Sha256Hex(str(image.id))
    finally:
        client.close()


class StdioService:
    """
    One hardened container running a stdio service, created by ``start()``.

    Args:
        image_id: The service image, by id.
        command: The service's argument list inside the container (never a shell string).
        limits: What the container may use; ``wall_seconds`` does not apply (the
            caller bounds each request).
        egress: ``host:port`` targets the service may reach through the egress
            proxy; none (the default) means no network at all.

    Raises:
        ValueError: An empty command, or egress on gVisor (``runsc``).
    """

    def __init__(
        self,
        *,
        image_id: str,
        command: Sequence[str],
        limits: ResourceLimits,
        runtime: Runtime = "runc",
        client_factory: ClientFactory = client_from_env,
        egress: tuple[str, ...] = (),
    ) -> None:
        if not command or not all(isinstance(part, str) and part for part in command):
            raise ValueError("a service command is a non-empty list of non-empty strings")
        if egress and runtime == "runsc":
            raise ValueError("gVisor (runsc) is registered with --network=none here: "
                             "a service granted egress runs on runc")
        self._egress = tuple(egress)
        self._network: EgressNetwork | None = None
        self.image_id = image_id
        self._command = list(command)
        self._limits = limits
        self._runtime: Runtime = runtime
        self._client_factory = client_factory
        self._client: docker.DockerClient | None = None
        self._attached: tuple[object, socket.socket] | None = None
        self.container_id = ""

    def start(self) -> None:
        """
        Create the container (not yet running: ``attach()`` or ``stdio_command()`` starts it).

        Raises:
            SandboxUnavailable: The engine failed.
        """
        with map_docker_errors("connect to the Docker Engine"):
            self._client = self._client_factory()
        hardened = container_options(self._limits, image=self.image_id, runtime=self._runtime,
                                     owner_pid=os.getpid())
        if self._egress:
            self._network = EgressNetwork(self._client)
            self._network.open()
            hardened = container_options(self._limits, image=self.image_id,
                                         runtime=self._runtime, owner_pid=os.getpid(),
                                         egress_network=self._network.name)
            proxy = self._network.proxy_url
            hardened["environment"] = {**hardened["environment"], "HTTP_PROXY": proxy,
                                       "HTTPS_PROXY": proxy, "http_proxy": proxy,
                                       "https_proxy": proxy}
        # The hardened options, with the service's command in place of the runner's.
        options: dict[str, object] = {**hardened, "command": self._command}
        with map_docker_errors("create the service container"):
            container = self._client.containers.create(**options)
        self.container_id = str(container.id)
        if self._network is not None:
            self._network.lease_container(self.container_id, self._egress)
        log.info("service_container_created", container_id=self.container_id[:12],
                 image_id=self.image_id)

    def stdio_command(self) -> tuple[str, ...]:
        """The host command whose stdin and stdout are the service's."""
        if not self.container_id:
            raise ValueError("start() the service first")
        return ("docker", "start", "--attach", "--interactive", self.container_id)

    def attach(self) -> socket.socket:
        """
        Attach to the container's stdin, stdout and stderr, then start it (attached
        first, so not one byte of output is missed); the connected socket carries the
        Engine's multiplexed stream. ``close()`` closes it.

        Raises:
            ValueError: ``start()`` was not called, or the service is attached already.
            SandboxUnavailable: The engine failed.
        """
        if self._client is None or not self.container_id:
            raise ValueError("start() the service first")
        if self._attached is not None:
            raise ValueError("the service is attached already")
        with map_docker_errors("attach to the service container"):
            attached = self._client.api.attach_socket(self.container_id,
                                                      params=dict(ATTACH_PARAMS))
        self._attached = (attached, socket_of(attached))
        with map_docker_errors("start the service container"):
            self._client.api.start(self.container_id)
        return self._attached[1]

    def close(self) -> None:
        """Kill and remove the container and its egress network; never raises (logged)."""
        if self._client is None:
            return
        if self._attached is not None:
            close_attached(*self._attached)
            self._attached = None
        if self.container_id:
            try:
                self._client.containers.get(self.container_id).remove(force=True)
            except docker.errors.NotFound:
                pass
            except Exception:  # noqa: BLE001 - cleanup boundary: logged, the sweeper retries
                log.warning("service_container_not_removed",
                            container_id=self.container_id[:12])
        if self._network is not None:
            self._network.close()
            self._network = None
        self._client.close()
        self._client = None

    def __enter__(self) -> StdioService:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
