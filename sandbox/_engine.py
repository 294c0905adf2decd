"""
Reaching the Docker Engine, and the one place its errors become callward's.

docker-py raises its own ``DockerException`` tree and also leaks ``requests``
errors (docker/docker-py#1966); both stop here. No ``docker.*`` or
``requests.*`` exception type leaves ``callward.sandbox``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Final

import docker
import docker.errors
import requests
import structlog

from callward.core import SandboxUnavailable

log = structlog.get_logger()

#: Pinned so that building a client never asks the engine for its version (no I/O).
API_VERSION: Final = "1.41"
BUILD_IMAGE_REMEDIATION: Final = "run `callward sandbox build-image`"
_MAX_EXPLANATION_CHARS: Final = 300

ClientFactory = Callable[[], docker.DockerClient]


def client_from_env() -> docker.DockerClient:
    """A client configured by ``DOCKER_HOST``, ``DOCKER_TLS_VERIFY`` and ``DOCKER_CERT_PATH``."""
    return docker.DockerClient.from_env(version=API_VERSION)


@contextlib.contextmanager
def map_docker_errors(action: str) -> Iterator[None]:
    """
    Turn every Docker Engine failure inside the block into ``SandboxUnavailable``.

    Args:
        action: What callward was doing, for the message ("create the container").

    Raises:
        SandboxUnavailable: The engine failed, could not be reached, or lacks the image.
    """
    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise SandboxUnavailable(
            f"could not {action}: the sandbox image is not in the Docker Engine",
            remediation=BUILD_IMAGE_REMEDIATION,
        ) from exc
    except (
        docker.errors.DockerException,
        docker.errors.StreamParseError,
        requests.RequestException,
    ) as exc:
        raise SandboxUnavailable(
            f"could not {action}: the Docker Engine failed ({_describe(exc)})"
        ) from exc


def _describe(exc: Exception) -> str:
    """
    The error's type and the engine's own explanation, short.

    Engine and connection errors name containers, images and sockets, never a
    tool's arguments, so they may be shown to operators.
    """
    explanation = getattr(exc, "explanation", None) or str(exc)
    text = f"{type(exc).__name__}: {explanation}"
    return (
        text if len(text) <= _MAX_EXPLANATION_CHARS else text[: _MAX_EXPLANATION_CHARS - 3] + "..."
    )


def remove_container(client: docker.DockerClient, container_id: str) -> None:
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
