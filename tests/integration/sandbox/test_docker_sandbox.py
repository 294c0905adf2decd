"""
DockerSandbox against a real Docker Engine and the real image.

The tools below really attack: they fork, allocate, spin, flood, connect out
and write where they must not. Each test asserts the exact kind; after each,
the conftest asserts that no container labelled callward is left.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import docker
import pytest

from callward.core import (
    Execution,
    ResourceLimits,
    SandboxUnavailable,
    Sha256Hex,
    ToolCall,
    ToolSpec,
)
from callward.sandbox import DockerSandbox, SandboxImage

pytestmark = pytest.mark.docker

MIB = 1 << 20
LIMITS = ResourceLimits(
    wall_seconds=2.0,
    memory_bytes=64 * MIB,
    pids=16,
    cpus=1.0,
    output_bytes=64 * 1024,
    tmp_bytes=4 * MIB,
    open_files=64,
)

MakeSpec = Callable[[Callable[..., object]], ToolSpec]


# -- tools: their source runs in the sandbox ------------------------------------------


def square(x):
    return x * x


def whoami():
    import os

    return [os.getuid(), os.getgid()]


def fork_bomb():
    import os

    while True:
        os.fork()


def stubborn_fork_bomb():
    import contextlib
    import os

    while True:
        with contextlib.suppress(OSError):  # keeps forking past every refusal
            os.fork()


def thread_bomb():
    import threading
    import time

    while True:
        threading.Thread(target=time.sleep, args=(30,)).start()


def memory_bomb():
    chunks = []
    while True:
        chunks.append(b"\x01" * (1 << 20))  # written, so every page is really touched


def busy_loop():
    while True:
        pass


def sleeper():
    import time

    time.sleep(30)


def output_flood():
    while True:
        print("x" * 1000)


def connect_out():
    import socket

    try:
        socket.create_connection(("1.1.1.1", 80), timeout=1).close()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "connected"


def write_root():
    import errno

    try:
        with open("/owned", "w") as handle:
            handle.write("x")
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "written"


def fill_tmp():
    with open("/tmp/fill", "wb") as handle:  # noqa: S108 - the sandbox's own tmpfs
        while True:
            handle.write(b"\0" * 65536)


def remember():
    import os

    mark = "/tmp/mark"  # noqa: S108 - the sandbox's own tmpfs
    seen = os.path.exists(mark)
    with open(mark, "w") as handle:
        handle.write("x")
    return seen


def run(
    sandbox: DockerSandbox, spec: ToolSpec, limits: ResourceLimits = LIMITS, **arguments: int
) -> Execution:
    call = ToolCall.create(id="call-1", name=spec.name, arguments=arguments, dialect="api")
    return sandbox.run(spec, call, limits)


# -- tests --------------------------------------------------------------------------------


class TestDockerSandboxRun:
    def test_ok_call_returns_the_value(self, sandbox: DockerSandbox, make_spec: MakeSpec) -> None:
        """
        square(3) runs in a container and returns 9; the host takes the runner's result
        line without waiting for the engine to report the exit, so no exit code is claimed.
        """
        execution = run(sandbox, make_spec(square), x=3)

        expected = ("ok", 9, None)
        assert expected == (execution.kind, execution.value, execution.usage.exit_code)

    def test_tool_runs_as_nobody(self, sandbox: DockerSandbox, make_spec: MakeSpec) -> None:
        """The tool runs as uid and gid 65534, never as root."""
        execution = run(sandbox, make_spec(whoami))

        expected = [65534, 65534]
        assert expected == execution.value

    def test_no_state_survives_from_one_call_to_the_next(
        self, sandbox: DockerSandbox, make_spec: MakeSpec
    ) -> None:
        """A file one call writes to /tmp is gone in the next: each container is single use."""
        spec = make_spec(remember)

        first, second = run(sandbox, spec), run(sandbox, spec)

        expected = (False, False)
        assert expected == (first.value, second.value)

    def test_image_digest_is_the_images_id(self, sandbox_image: SandboxImage) -> None:
        """Without an explicit image, the sandbox finds the built one; its digest is the id."""
        with DockerSandbox() as sandbox:
            digest = sandbox.image_digest

        expected = sandbox_image.digest
        assert expected == digest

    def test_gvisor_runtime_runs_the_same_call(
        self, sandbox_image: SandboxImage, make_spec: MakeSpec
    ) -> None:
        """With runtime runsc (gVisor) the call runs too, under the same pids limit."""
        limits = ResourceLimits(wall_seconds=10.0, memory_bytes=128 * MIB, pids=16)
        with DockerSandbox(image=sandbox_image, runtime="runsc") as sandbox:
            execution = run(sandbox, make_spec(square), limits, x=7)

        expected = ("ok", 49)
        assert expected == (execution.kind, execution.value)


class TestDockerSandboxLimits:
    @pytest.mark.parametrize("tool", [fork_bomb, thread_bomb, stubborn_fork_bomb])
    def test_process_bombs_end_in_pids_limit(
        self,
        sandbox: DockerSandbox,
        make_spec: MakeSpec,
        tool: Callable[..., object],
    ) -> None:
        """Forking or threading past the pids limit is pids_limit, even if refusals are caught."""
        execution = run(sandbox, make_spec(tool))

        expected = ("pids_limit", None)
        assert expected == (execution.kind, execution.value_json)

    def test_memory_bomb_ends_in_memory_limit(
        self, sandbox: DockerSandbox, make_spec: MakeSpec
    ) -> None:
        """Touching memory past the limit gets the tool OOM-killed: memory_limit."""
        execution = run(sandbox, make_spec(memory_bomb))

        expected = "memory_limit"
        assert expected == execution.kind

    @pytest.mark.parametrize("tool", [busy_loop, sleeper])
    def test_running_past_the_deadline_ends_in_timeout(
        self,
        sandbox: DockerSandbox,
        make_spec: MakeSpec,
        tool: Callable[..., object],
    ) -> None:
        """A busy loop or a long sleep is killed at wall_seconds: timeout."""
        execution = run(sandbox, make_spec(tool))

        expected = ("timeout", None)
        assert expected == (execution.kind, execution.usage.exit_code)
        assert execution.usage.wall_ms < (LIMITS.wall_seconds + 1) * 1000

    def test_output_flood_ends_in_output_limit(
        self, sandbox: DockerSandbox, make_spec: MakeSpec
    ) -> None:
        """Printing without end is cut at output_bytes: output_limit, little read past the cap."""
        execution = run(sandbox, make_spec(output_flood))

        expected = "output_limit"
        assert expected == execution.kind
        assert execution.usage.output_bytes < LIMITS.output_bytes + 64 * 1024

    def test_filling_tmp_ends_in_disk_limit(
        self, sandbox: DockerSandbox, make_spec: MakeSpec
    ) -> None:
        """Writing past tmp_bytes in /tmp fails with ENOSPC: disk_limit."""
        execution = run(sandbox, make_spec(fill_tmp))

        expected = "disk_limit"
        assert expected == execution.kind


class TestDockerSandboxIsolation:
    def test_network_is_unreachable(self, sandbox: DockerSandbox, make_spec: MakeSpec) -> None:
        """A TCP connection to 1.1.1.1:80 fails inside the tool: there is no network."""
        execution = run(sandbox, make_spec(connect_out))

        expected = ("ok", "OSError: [Errno 101] Network is unreachable")
        assert expected == (execution.kind, execution.value)

    def test_root_filesystem_is_read_only(
        self, sandbox: DockerSandbox, make_spec: MakeSpec
    ) -> None:
        """Creating a file in / fails with EROFS: the root filesystem is read-only."""
        execution = run(sandbox, make_spec(write_root))

        expected = ("ok", "EROFS")
        assert expected == (execution.kind, execution.value)


class TestDockerSandboxUnavailable:
    def test_unreachable_engine_is_sandbox_unavailable(self, make_spec: MakeSpec) -> None:
        """A run on an engine that does not answer raises SandboxUnavailable."""
        sandbox = DockerSandbox(base_url="unix:///nonexistent.sock")

        with pytest.raises(SandboxUnavailable) as raised:
            run(sandbox, make_spec(square), x=3)

        expected = "sandbox_unavailable"
        assert expected == raised.value.kind

    def test_unreachable_engine_has_no_image_digest(self) -> None:
        """Asking for the image digest of an unreachable engine raises SandboxUnavailable."""
        sandbox = DockerSandbox(base_url="unix:///nonexistent.sock")

        with pytest.raises(SandboxUnavailable, match="Docker Engine"):
            _ = sandbox.image_digest

    def test_missing_image_is_sandbox_unavailable_with_build_remediation(
        self, engine: docker.DockerClient, make_spec: MakeSpec
    ) -> None:
        """An image the engine does not have raises SandboxUnavailable saying to build it."""
        missing = SandboxImage(tag="callward/sandbox:0000000000000000", digest=Sha256Hex("0" * 64))
        sandbox = DockerSandbox(image=missing)

        with pytest.raises(SandboxUnavailable) as raised:
            run(sandbox, make_spec(square), x=3)

        expected = ("sandbox_unavailable", "run `callward sandbox build-image`")
        assert expected == (raised.value.kind, raised.value.remediation)


class TestRemoveLeftovers:
    def test_containers_of_dead_owners_are_removed_and_live_ones_kept(
        self, sandbox: DockerSandbox, sandbox_image: SandboxImage, engine: docker.DockerClient
    ) -> None:
        """remove_leftovers() removes callward containers whose owner died, keeps the others."""
        finished = subprocess.Popen(["true"])
        finished.wait()
        living = subprocess.Popen(["sleep", "60"])
        try:
            dead_id = engine.containers.create(
                sandbox_image.image_id, labels={"callward": "1", "callward.pid": str(finished.pid)}
            ).id
            live_id = engine.containers.create(
                sandbox_image.image_id, labels={"callward": "1", "callward.pid": str(living.pid)}
            ).id

            removed = sandbox.remove_leftovers()

            # The engine is shared: only the two containers made here are this test's.
            remaining = [
                container.id
                for container in engine.containers.list(all=True, filters={"label": "callward"})
                if container.id in (dead_id, live_id)
            ]
            expected = ((dead_id,), [live_id])
            assert expected == (tuple(i for i in removed if i == dead_id), remaining)
        finally:
            living.kill()
            living.wait()
            for container in engine.containers.list(all=True, filters={"label": "callward"}):
                if container.labels.get("callward.pid") in (str(finished.pid), str(living.pid)):
                    container.remove(force=True)
