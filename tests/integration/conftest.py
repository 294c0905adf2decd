"""Integration fixtures: a real Docker Engine, the real image, real files and keys."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from callward.sandbox import ensure_image
from callward.sandbox._leftovers import is_leftover

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.docker)


@pytest.fixture(scope="session", name="engine")
def _engine() -> Iterator[docker.DockerClient]:
    """The local Docker Engine (make test starts one) with the sandbox image built."""
    client = docker.from_env(version="1.41")
    try:
        client.ping()
    except docker.errors.DockerException as exc:  # pragma: no cover - the setup starts one
        pytest.fail(f"no Docker Engine answers; run scripts/ensure-engine.sh ({exc})")
    ensure_image()
    yield client
    client.close()


@pytest.fixture(name="leftover_containers")
def _leftover_containers(engine: docker.DockerClient) -> Callable[[], list[str]]:
    """
    Ids of containers labelled callward, created since the test began, whose owner
    is gone (a CLI process that exited) or is this process: what the test left
    behind. Containers of other live processes sharing the engine are not counted.
    """
    since = int(time.time()) - 1  # the engine's Created is in whole seconds

    def leftovers() -> list[str]:
        return [str(c["Id"]) for c in engine.api.containers(all=True, filters={"label": "callward"})
                if int(c["Created"]) >= since and is_leftover(c.get("Labels") or {})]

    return leftovers


@pytest.fixture(name="cli")
def _cli(home: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the callward command as a user would, with its state in a fresh home."""

    def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None):
        return subprocess.run(
            [sys.executable, "-m", "callward.core.cli", "--home", str(home), *args],
            capture_output=True,
            text=True,
            input=stdin,
            env={**os.environ, **(env or {})},
            timeout=120,
            check=False,
        )

    return run
