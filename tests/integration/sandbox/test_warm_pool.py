"""
The warm pool and session isolation against a real engine, on runc and on gVisor (runsc).

Every attack runs in a warm container (call isolation) or in a session's
container, then the next call on the same sandbox shows that nothing of it
survived: no process, no file in /tmp. After each test the conftest asserts
that no container labelled callward is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator

import docker
import pytest

from callward.core import Execution, Isolation, ResourceLimits, ToolCall, ToolSpec
from callward.sandbox import DockerSandbox, PoolConfig, Runtime, SandboxImage

pytestmark = pytest.mark.docker

MIB = 1 << 20
# The same pids on both runtimes: on gVisor its own kernel keeps that limit. gVisor's
# sentry holds memory for every guest process, and it counts: a fork bomb held up to
# 83 MiB there (nproc 18), so gVisor gets more memory, or memory would stop it first.
# gVisor forks slowly: a fork bomb took 0.3-1.8 s to reach its limit there, so gVisor
# gets more time, or a loaded machine would end it as a timeout first.
LIMITS: dict[Runtime, ResourceLimits] = {
    runtime: ResourceLimits(
        wall_seconds=wall_seconds,
        memory_bytes=memory * MIB,
        pids=16,
        cpus=1.0,
        output_bytes=64 * 1024,
        tmp_bytes=4 * MIB,
        open_files=64,
    )
    for runtime, memory, wall_seconds in (("runc", 96, 3.0), ("runsc", 192, 6.0))
}

MakeSpec = Callable[[Callable[..., object]], ToolSpec]


# -- tools: their source runs in the sandbox ------------------------------------------


def square(x):
    return x * x


def leave_traces():
    import os
    import subprocess

    with open("/tmp/trace", "w") as handle:  # noqa: S108 - the sandbox's own tmpfs
        handle.write("left behind")
    # A child in its own session that would outlive the tool if anything let it.
    subprocess.Popen(["sleep", "300"], start_new_session=True)
    return os.getpid()


def traces():
    import os

    processes = sorted(int(name) for name in os.listdir("/proc") if name.isdigit())
    return [os.path.exists("/tmp/trace"), len(processes)]  # noqa: S108


def ignore_sigterm():
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(0.1)


def slow_writer():
    import sys
    import time

    while True:
        sys.stderr.write(".")
        sys.stderr.flush()
        time.sleep(0.05)


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
        chunks.append(b"\x01" * (1 << 20))


def output_flood():
    while True:
        print("x" * 1000)


def fill_tmp():
    with open("/tmp/fill", "wb") as handle:  # noqa: S108 - the sandbox's own tmpfs
        while True:
            handle.write(b"\0" * 65536)


def open_files():
    handles = []
    while True:
        handles.append(open("/dev/null"))  # noqa: SIM115 - exhausting descriptors


def remember():
    import os

    mark = "/tmp/mark"  # noqa: S108 - the sandbox's own tmpfs
    seen = os.path.exists(mark)
    with open(mark, "w") as handle:
        handle.write("x")
    return seen


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(name="runtime", params=["runc", "runsc"])
def _runtime(request: pytest.FixtureRequest) -> Runtime:
    runtime: Runtime = request.param
    return runtime


@pytest.fixture(name="pooled")
def _pooled(sandbox_image: SandboxImage, runtime: Runtime) -> Iterator[DockerSandbox]:
    """A sandbox whose pool keeps two warm containers, already warm under LIMITS."""
    with DockerSandbox(
        image=sandbox_image, runtime=runtime, pool=PoolConfig(size=2)
    ) as sandbox:
        assert sandbox.wait_warm(LIMITS[runtime], 2, timeout_seconds=60)
        yield sandbox


def run(sandbox: DockerSandbox, spec: ToolSpec, limits: ResourceLimits, **arguments: int):
    call = ToolCall.create(id="call-1", name=spec.name, arguments=arguments, dialect="api")
    return sandbox.run(spec, call, limits)


def warm_run(
    sandbox: DockerSandbox,
    spec: ToolSpec,
    runtime: Runtime,
    isolation: Isolation = "call",
    **arguments: int,
) -> Execution:
    """Run once a warm container is ready, so the call really takes one (or in a session)."""
    if isolation == "session":
        call = ToolCall.create(id="call-1", name=spec.name, arguments=arguments, dialect="api")
        return sandbox.run(spec, call, LIMITS[runtime], isolation="session",
                           principal="alice", session_id="session-1")
    assert sandbox.wait_warm(LIMITS[runtime], 1, timeout_seconds=60)
    return run(sandbox, spec, LIMITS[runtime], **arguments)


@pytest.fixture(name="isolation", params=["call", "session"])
def _isolation(request: pytest.FixtureRequest) -> Isolation:
    isolation: Isolation = request.param
    return isolation


def processes_between_calls(isolation: Isolation) -> int:
    """What `traces` counts: its own runner, plus the session's runner in session mode."""
    return 2 if isolation == "session" else 1


# -- tests ---------------------------------------------------------------------------------


class TestWarmPool:
    def test_warm_call_runs_in_a_container_started_ahead(
        self, pooled: DockerSandbox, runtime: Runtime, make_spec: MakeSpec,
        engine: docker.DockerClient,
    ) -> None:
        """A call with the pool warm returns its value from a container started before it."""
        ready_before = {
            c.id for c in engine.containers.list(filters={"label": f"callward.pid={os.getpid()}"})
        }

        execution = warm_run(pooled, make_spec(square), runtime, x=12)

        expected = ("ok", 144, True)
        assert expected == (
            execution.kind, execution.value, execution.usage.container_id in ready_before
        )

    def test_no_state_survives_between_warm_calls(
        self, pooled: DockerSandbox, runtime: Runtime, make_spec: MakeSpec
    ) -> None:
        """In call mode a file written by one call is never seen by the next, five times over."""
        spec = make_spec(remember)

        seen = [warm_run(pooled, spec, runtime).value for _ in range(5)]

        expected = [False] * 5
        assert expected == seen

    def test_each_call_gets_its_own_container(
        self, pooled: DockerSandbox, runtime: Runtime, make_spec: MakeSpec
    ) -> None:
        """Four calls run in four different containers: none is reused."""
        spec = make_spec(square)

        ids = {warm_run(pooled, spec, runtime, x=2).usage.container_id for _ in range(4)}

        expected = 4
        assert expected == len(ids)

    def test_close_removes_the_warm_containers(
        self, sandbox_image: SandboxImage, own_leftover_containers: Callable[[], list[str]],
        engine: docker.DockerClient,
    ) -> None:
        """Closing the sandbox removes every warm container it kept."""
        sandbox = DockerSandbox(image=sandbox_image, pool=PoolConfig(size=3))
        assert sandbox.wait_warm(LIMITS["runc"], 3, timeout_seconds=60)
        mine = {"label": f"callward.pid={os.getpid()}"}
        warm = len(engine.containers.list(all=True, filters=mine))

        sandbox.close()

        expected = (3, [])
        assert expected == (warm, engine.containers.list(all=True, filters=mine))


class TestLimitsUnderAttack:
    @pytest.mark.parametrize(
        ("tool", "kind"),
        [
            (ignore_sigterm, "timeout"),
            (slow_writer, "timeout"),
            (memory_bomb, "memory_limit"),
            (output_flood, "output_limit"),
            (fill_tmp, "disk_limit"),
            (open_files, "tool_error"),
            (fork_bomb, "pids_limit"),
            (stubborn_fork_bomb, "pids_limit"),
            (thread_bomb, "pids_limit"),
        ],
    )
    def test_attack_ends_in_its_kind_and_leaves_nothing(
        self,
        pooled: DockerSandbox,
        runtime: Runtime,
        isolation: Isolation,
        make_spec: MakeSpec,
        tool: Callable[..., object],
        kind: str,
    ) -> None:
        """
        Each attack, in a warm container or in a session's container, ends in its own
        kind, and the next call sees neither a process nor a file of it.
        """
        attack = warm_run(pooled, make_spec(tool), runtime, isolation)
        after = warm_run(pooled, make_spec(traces), runtime, isolation)

        expected = (kind, [False, processes_between_calls(isolation)])
        assert expected == (attack.kind, after.value)

    def test_children_and_files_do_not_outlive_the_call(
        self, pooled: DockerSandbox, runtime: Runtime, isolation: Isolation,
        make_spec: MakeSpec,
    ) -> None:
        """A child in its own session and a file in /tmp are gone by the next call."""
        warm_run(pooled, make_spec(leave_traces), runtime, isolation)

        after = warm_run(pooled, make_spec(traces), runtime, isolation)

        expected = [False, processes_between_calls(isolation)]
        assert expected == after.value


class TestSessionIsolation:
    def test_a_session_reuses_its_container_with_a_fresh_process(
        self, pooled: DockerSandbox, runtime: Runtime, make_spec: MakeSpec
    ) -> None:
        """Calls of one session run in one container, each in a new process, /tmp wiped."""
        spec = make_spec(remember)

        first = warm_run(pooled, spec, runtime, "session")
        second = warm_run(pooled, spec, runtime, "session")

        expected = (False, False, first.usage.container_id)
        assert expected == (first.value, second.value, second.usage.container_id)

    def test_sessions_never_share_a_container(
        self, pooled: DockerSandbox, runtime: Runtime, make_spec: MakeSpec
    ) -> None:
        """Another session id or another principal gets a container of its own."""
        spec = make_spec(square)
        call = ToolCall.create(id="c", name="square", arguments={"x": 2}, dialect="api")
        ids = {
            pooled.run(spec, call, LIMITS[runtime], isolation="session",
                       principal=principal,
                       session_id=session).usage.container_id
            for principal, session in (("alice", "s1"), ("alice", "s2"), ("bob", "s1"))
        }

        expected = 3
        assert expected == len(ids)

    def test_session_without_principal_is_refused(
        self, pooled: DockerSandbox, runtime: Runtime, make_spec: MakeSpec
    ) -> None:
        """Session isolation needs to know whose session it is."""
        call = ToolCall.create(id="c", name="square", arguments={"x": 2}, dialect="api")

        with pytest.raises(ValueError, match="principal"):
            pooled.run(make_spec(square), call, LIMITS[runtime], isolation="session")

    def test_end_session_removes_its_container(
        self, pooled: DockerSandbox, runtime: Runtime, make_spec: MakeSpec,
        engine: docker.DockerClient,
    ) -> None:
        """end_session() removes the session's container at once."""
        execution = warm_run(pooled, make_spec(square), runtime, "session", x=2)

        pooled.end_session("alice", "session-1")

        expected: list[object] = []
        assert expected == engine.api.containers(
            all=True, filters={"id": execution.usage.container_id}
        )


class TestKilledMidCall:
    def test_leftovers_of_a_killed_gateway_are_removed_at_restart(
        self, sandbox_image: SandboxImage, engine: docker.DockerClient,
        own_leftover_containers: Callable[[], list[str]],
    ) -> None:
        """
        A process killed (SIGKILL) mid-call leaves its warm and running containers;
        the next sandbox's remove_leftovers() removes every one of them.
        """
        script = textwrap.dedent(
            f"""
            import sys
            from callward.core import ResourceLimits, ToolCall, ToolSpec, canonical_bytes
            from callward.core import sha256_hex
            from callward.sandbox import DockerSandbox, PoolConfig, SandboxImage
            from callward.core import Sha256Hex
            image = SandboxImage(tag={sandbox_image.tag!r},
                                 digest=Sha256Hex({sandbox_image.digest!r}))
            sandbox = DockerSandbox(image=image, pool=PoolConfig(size=2))
            limits = ResourceLimits(wall_seconds=60)
            sandbox.wait_warm(limits, 2, 60)
            source = "def nap():\\n    import time\\n    time.sleep(60)\\n"
            spec = ToolSpec(name="nap", version="1", description="", source=source,
                            entrypoint="nap", parameters_json=canonical_bytes({{}}),
                            digest=sha256_hex(source.encode()))
            print("calling", flush=True)
            sandbox.run(spec, ToolCall.create(id="c", name="nap", arguments={{}},
                                              dialect="api"), limits)
            """
        )
        gateway = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
        )
        try:
            assert gateway.stdout is not None
            assert "calling\n" == gateway.stdout.readline()
            owned = {"label": f"callward.pid={gateway.pid}"}
            left = len(engine.containers.list(all=True, filters=owned))
        finally:
            gateway.send_signal(signal.SIGKILL)
            gateway.wait()
        # A create the killed process had in flight completes in the engine after its
        # death; a restart comes later than that.
        time.sleep(1)

        with DockerSandbox(image=sandbox_image, pool=PoolConfig(size=0)) as restarted:
            restarted.remove_leftovers()

        expected = (True, [], [])
        assert expected == (
            left >= 2,
            engine.containers.list(all=True, filters=owned),
            own_leftover_containers(),
        )


def fork_and_wait():
    import os

    pid = os.fork()
    if pid == 0:
        os._exit(7)
    return os.WEXITSTATUS(os.waitpid(pid, 0)[1])


def test_a_gvisor_session_with_few_pids_outlives_many_forking_calls(
    sandbox_image: SandboxImage, make_spec: MakeSpec
) -> None:
    """
    gVisor's sentry keeps host threads from every call it forked; sized for it, a
    session with pids 16 answers 150 forking calls in one container.
    """
    spec = make_spec(fork_and_wait)
    with DockerSandbox(image=sandbox_image, runtime="runsc", pool=PoolConfig(size=0)) as sandbox:
        executions = [
            sandbox.run(spec, ToolCall.create(id=f"c{n}", name=spec.name, arguments={},
                                              dialect="api"),
                        LIMITS["runsc"], isolation="session", principal="alice",
                        session_id="s1")
            for n in range(150)
        ]

    expected = ({("ok", 7)}, 1)
    assert expected == (
        {(e.kind, e.value) for e in executions},
        len({e.usage.container_id for e in executions}),
    )
