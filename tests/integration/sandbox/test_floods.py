"""
Floods that must end as their own kind, on runc and on gVisor, in call and session mode:
a tool that creates empty files until /tmp holds no more ends as disk_limit (the bytes
of a tmpfs bound nothing for empty files), and the next call in the session is served.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from callward.core import (
    CallwardError,
    Execution,
    Isolation,
    ResourceLimits,
    Runtime,
    ToolCall,
    ToolSpec,
)
from callward.sandbox import DockerSandbox, PoolConfig, SandboxImage

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


def stubborn_fork_bomb():
    import contextlib
    import os

    while True:
        with contextlib.suppress(OSError):  # keeps forking past every refusal
            os.fork()


class TestGvisorHostTasks:
    def test_concurrent_bombs_stay_within_the_hosts_budget_and_runc_is_served(
        self, sandbox_image, make_spec
    ):
        """
        Six gVisor fork bombs at once (six held up to ~1,400 host tasks together here)
        never hold more than a budget of 600 host tasks together, none ends ok (a bomb
        past the budget fails as its sentry cannot grow), and a plain runc call started
        meanwhile is served.
        """
        import threading
        import time

        from callward.sandbox._cgroups import (
            default_gvisor_host_tasks,
            ensure_task_budget,
            tasks_in_budget,
        )

        budget = 600
        seen: list[int] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                count = tasks_in_budget()
                if count is not None:
                    seen.append(count)
                time.sleep(0.02)

        limits = LIMITS["runsc"]
        # No warm pool: a refill started while the bombs hold the whole budget would find
        # no task for its sentry and hang in the engine (a limit of the budget, see
        # docs/sandbox.md); only the six bombs' own containers are created.
        with DockerSandbox(image=sandbox_image, runtime="runsc", pool=PoolConfig(size=0),
                           gvisor_host_tasks=budget) as gvisor, \
                DockerSandbox(image=sandbox_image, runtime="runc") as runc:
            watcher = threading.Thread(target=watch)
            watcher.start()
            bomb = make_spec(stubborn_fork_bomb)
            kinds: list[str] = []

            def one_bomb(index: int) -> None:
                call = ToolCall.create(id=f"bomb-{index}", name=bomb.name, arguments={},
                                       dialect="api")
                try:
                    kinds.append(gvisor.run(bomb, call, limits).kind)
                except CallwardError as exc:  # a sentry that could not start at all
                    kinds.append(exc.kind)

            bombs = [threading.Thread(target=one_bomb, args=(i,)) for i in range(6)]
            for thread in bombs:
                thread.start()
            time.sleep(1.0)
            plain = runc.run(make_spec(square),
                             ToolCall.create(id="plain", name="square", arguments={"x": 6},
                                             dialect="api"), LIMITS["runc"])
            for thread in bombs:
                thread.join()
            stop.set()
            watcher.join()
        ensure_task_budget(default_gvisor_host_tasks())  # the host's own budget again

        expected = (("ok", 36), True, True, 6, [])
        assert expected == ((plain.kind, plain.value), bool(seen), max(seen) <= budget,
                            len(kinds), [kind for kind in kinds if kind == "ok"])
