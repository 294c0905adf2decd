"""
Floods that must end as their own kind, on runc and on gVisor, in call and session mode:
a tool that creates empty files until /tmp holds no more ends as disk_limit (the bytes
of a tmpfs bound nothing for empty files), and the next call in the session is served.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from callward.core import Execution, Isolation, ResourceLimits, Runtime, ToolCall, ToolSpec
from callward.sandbox import DockerSandbox, SandboxImage

pytestmark = pytest.mark.docker

MIB = 1 << 20
LIMITS: dict[Runtime, ResourceLimits] = {
    runtime: ResourceLimits(wall_seconds=wall_seconds, memory_bytes=memory * MIB, pids=16,
                            cpus=1.0, output_bytes=64 * 1024, tmp_bytes=4 * MIB,
                            open_files=64)
    for runtime, memory, wall_seconds in (("runc", 96, 20.0), ("runsc", 192, 20.0))
}
MakeSpec = Callable[[Callable[..., object]], ToolSpec]


def empty_files():
    n = 0
    while True:
        open(f"/tmp/f{n}", "w").close()  # noqa: S108 - the sandbox's own tmpfs
        n += 1


def empty_files_in_locked_directories():
    import os

    d = 0
    while True:
        top = f"/tmp/d{d}"  # noqa: S108 - the sandbox's own tmpfs
        os.makedirs(f"{top}/inner")
        for n in range(40):
            open(f"{top}/inner/f{n}", "w").close()
        os.chmod(f"{top}/inner", 0)  # hidden from a watch that only lists what it can read
        d += 1


def square(x):
    return x * x


@pytest.fixture(name="runtime", params=["runc", "runsc"])
def _runtime(request: pytest.FixtureRequest) -> Runtime:
    runtime: Runtime = request.param
    return runtime


@pytest.fixture(name="isolation", params=["call", "session"])
def _isolation(request: pytest.FixtureRequest) -> Isolation:
    isolation: Isolation = request.param
    return isolation


@pytest.fixture(name="flood_sandbox")
def _flood_sandbox(sandbox_image: SandboxImage, runtime: Runtime) -> Iterator[DockerSandbox]:
    with DockerSandbox(image=sandbox_image, runtime=runtime) as sandbox:
        yield sandbox


def run(sandbox: DockerSandbox, spec: ToolSpec, runtime: Runtime, isolation: Isolation,
        **arguments: int) -> Execution:
    call = ToolCall.create(id="call-1", name=spec.name, arguments=arguments, dialect="api")
    return sandbox.run(spec, call, LIMITS[runtime], isolation=isolation, principal="alice",
                       session_id="s1")


class TestInodeFlood:
    @pytest.mark.parametrize("flood", [empty_files, empty_files_in_locked_directories])
    def test_empty_files_end_as_disk_limit(self, flood_sandbox, runtime, isolation, make_spec,
                                           flood):
        """Creating files until none fits ends as disk_limit, and the next call is served."""
        flooded = run(flood_sandbox, make_spec(flood), runtime, isolation)
        after = run(flood_sandbox, make_spec(square), runtime, isolation, x=5)

        expected = ("disk_limit", ("ok", 25))
        assert expected == (flooded.kind, (after.kind, after.value))
