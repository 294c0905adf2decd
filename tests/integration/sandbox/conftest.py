"""
Fixtures of the sandbox integration tests: the real image and a DockerSandbox on it.

The engine itself comes from tests/integration/conftest.py; every test here is
followed by the check that no container labelled callward that this process owns
is left.
"""

from __future__ import annotations

import inspect
import os
import textwrap
from collections.abc import Callable, Iterator

import docker
import pytest

from callward.core import ToolSpec, canonical_bytes, sha256_hex
from callward.sandbox import DockerSandbox, SandboxImage, ensure_image
from callward.sandbox._limits import OWNER_LABEL, OWNER_PID_LABEL


@pytest.fixture(name="own_leftover_containers")
def _own_leftover_containers(engine: docker.DockerClient) -> Callable[[], list[str]]:
    """
    Ids of containers labelled callward that this very process owns.

    The engine is shared: other processes (other gateways, other test runs, the
    killed process a test leaves to ``remove_leftovers()``) come and go with their
    own sandboxes meanwhile; a test that spawns one checks that one's containers.
    """

    def leftovers() -> list[str]:
        # The low-level list: one request, no inspect that another's removal could race.
        mine = {"label": [OWNER_LABEL, f"{OWNER_PID_LABEL}={os.getpid()}"]}
        return [str(c["Id"]) for c in engine.api.containers(all=True, filters=mine)]

    return leftovers


@pytest.fixture(autouse=True, name="no_leftover_containers")
def _no_leftover_containers(own_leftover_containers: Callable[[], list[str]]) -> Iterator[None]:
    """After each test, not one container labelled callward that this process owns is left."""
    yield
    expected: list[str] = []
    assert expected == own_leftover_containers()


@pytest.fixture(scope="session", name="sandbox_image")
def _sandbox_image(engine: docker.DockerClient) -> SandboxImage:
    """The sandbox image, built once per session (quick when it exists)."""
    return ensure_image()


@pytest.fixture(name="sandbox")
def _sandbox(sandbox_image: SandboxImage) -> Iterator[DockerSandbox]:
    """A DockerSandbox on the local engine, running the session's image."""
    with DockerSandbox(image=sandbox_image) as sandbox:
        yield sandbox


@pytest.fixture(name="make_spec")
def _make_spec() -> Callable[[Callable[..., object]], ToolSpec]:
    """Turns a module-level function of a test into the ToolSpec of a tool with its source."""

    def make_spec(function: Callable[..., object]) -> ToolSpec:
        source = textwrap.dedent(inspect.getsource(function))
        return ToolSpec(
            name=function.__name__,
            version="1.0.0",
            description="",
            source=source,
            entrypoint=function.__name__,
            parameters_json=canonical_bytes({"type": "object"}),
            digest=sha256_hex(source.encode()),
        )

    return make_spec
