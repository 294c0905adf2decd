"""
A call in a session cannot reach the session's runner, on runc and on gVisor (runsc).

In ``isolation: session`` every call runs in a process forked from the session's
PID 1 runner, as the same user. Each tool below really attacks that runner: it
ptraces it, opens its memory, reads and writes it with ``process_vm_readv`` /
``writev``, signals it, and writes forged result lines to every descriptor it
inherited. Each attack must fail, and the session must go on answering the next
call with its own, correct result, in the same container.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from callward.core import Execution, Placement, ResourceLimits, ToolCall, ToolSpec
from callward.sandbox import DockerSandbox, Runtime, SandboxImage

pytestmark = pytest.mark.docker

MIB = 1 << 20
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
    for runtime, memory, wall_seconds in (("runc", 96, 5.0), ("runsc", 192, 8.0))
}

MakeSpec = Callable[[Callable[..., object]], ToolSpec]


# -- tools: their source runs in the sandbox ------------------------------------------


def square(x):
    return x * x


def ptrace_the_runner():
    import ctypes
    import errno

    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    outcomes = {}
    for name, request in (("seize", 0x4206), ("attach", 16)):
        ctypes.set_errno(0)
        answer = libc.ptrace(ctypes.c_long(request), ctypes.c_long(1), None, None)
        outcomes[name] = "ok" if answer == 0 else errno.errorcode.get(ctypes.get_errno(), "?")
    return outcomes


def open_the_runners_memory():
    import errno

    outcomes = {}
    for name, mode in (("mem_write", "r+b"), ("mem_read", "rb"), ("environ", "rb")):
        path = "/proc/1/mem" if name.startswith("mem") else "/proc/1/environ"
        try:
            with open(path, mode) as handle:
                read = handle.read(4096) if name == "environ" else b""
            names = sorted(item.split(b"=")[0].decode() for item in read.split(b"\0") if item)
            outcomes[name] = ["ok", *names]
        except OSError as exc:
            outcomes[name] = errno.errorcode.get(exc.errno, "?")
    return outcomes


def copy_the_runners_memory():
    import ctypes
    import errno

    class Iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.process_vm_readv.restype = ctypes.c_ssize_t
    libc.process_vm_writev.restype = ctypes.c_ssize_t
    buffer = ctypes.create_string_buffer(64)
    local = Iovec(ctypes.cast(buffer, ctypes.c_void_p), 64)
    # Any address of PID 1's will do: the permission is checked before the address.
    remote = Iovec(ctypes.c_void_p(0x400000), 64)
    outcomes = {}
    for name in ("process_vm_readv", "process_vm_writev"):
        ctypes.set_errno(0)
        answer = getattr(libc, name)(1, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        outcomes[name] = "ok" if answer >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
    return outcomes


def signal_the_runner():
    import os
    import signal

    sent = []
    for number in (signal.SIGSTOP, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                   signal.SIGQUIT, signal.SIGUSR1, signal.SIGABRT, signal.SIGKILL):
        try:
            os.kill(1, number)
            sent.append(number.name)
        except OSError:
            pass
    return sent


def forge_results():
    import contextlib
    import os

    forged = b'{"ok":true,"value":"forged"}\n'
    inherited = []
    for fd in range(3, 256):
        try:
            os.fstat(fd)
        except OSError:
            continue
        inherited.append(fd)
        with contextlib.suppress(OSError):
            os.write(fd, forged)
    return inherited


def count_descriptors():
    return sum(1 for fd in range(3, 256) if _is_open(fd))


def _is_open(fd):
    import os

    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def who_am_i():
    import os

    with open("/proc/self/status") as handle:
        status = dict(line.split(":", 1) for line in handle if ":" in line)
    return {
        "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()],
        # gVisor shows no CapAmb line: a call there has no ambient set to show.
        "capabilities": [status.get(name, "0" * 16).strip()
                         for name in ("CapPrm", "CapEff", "CapAmb")],
    }


def hide_in_tmp():
    import os

    os.makedirs("/tmp/private/deeper", mode=0o700)  # noqa: S108 - the sandbox's own tmpfs
    with open("/tmp/private/deeper/note", "w") as handle:  # noqa: S108
        handle.write("left for the next call")
    os.chmod("/tmp/private", 0o000)  # noqa: S108
    return sorted(os.listdir("/tmp"))  # noqa: S108


def list_tmp():
    import os

    return sorted(os.listdir("/tmp"))  # noqa: S108 - the sandbox's own tmpfs


def look_at_own_proc():
    import os

    return [os.path.exists("/proc/self/fd"), len(os.listdir("/proc/self/fd")) >= 3]


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(name="runtime", params=["runc", "runsc"])
def _runtime(request: pytest.FixtureRequest) -> Runtime:
    runtime: Runtime = request.param
    return runtime


@pytest.fixture(name="session_sandbox")
def _session_sandbox(sandbox_image: SandboxImage, runtime: Runtime) -> Iterator[DockerSandbox]:
    with DockerSandbox(image=sandbox_image, runtime=runtime) as sandbox:
        yield sandbox


def in_session(sandbox: DockerSandbox, spec: ToolSpec, runtime: Runtime,
               **arguments: int) -> Execution:
    call = ToolCall.create(id="call-1", name=spec.name, arguments=arguments, dialect="api")
    return sandbox.run_placed(spec, call, LIMITS[runtime],
                              Placement(isolation="session", principal="alice",
                                        session_id="session-1"))


def attack_then_square(sandbox: DockerSandbox, runtime: Runtime, make_spec: MakeSpec,
                       attack: Callable[..., object]) -> tuple[Execution, Execution, bool]:
    """The attack, then square(7) in the same session: the attack, the square, same container."""
    before = in_session(sandbox, make_spec(square), runtime, x=2)
    attacked = in_session(sandbox, make_spec(attack), runtime)
    after = in_session(sandbox, make_spec(square), runtime, x=7)
    return attacked, after, before.usage.container_id == after.usage.container_id


# -- tests ---------------------------------------------------------------------------------


class TestSessionRunnerIsUnreachable:
    def test_ptrace_of_the_runner_is_refused(
        self, session_sandbox: DockerSandbox, runtime: Runtime, make_spec: MakeSpec
    ) -> None:
        """PTRACE_SEIZE and PTRACE_ATTACH on PID 1 fail with EPERM; the session goes on."""
        attacked, after, same = attack_then_square(session_sandbox, runtime, make_spec,
                                                   ptrace_the_runner)

        expected = ({"seize": "EPERM", "attach": "EPERM"}, ("ok", 49), True)
        assert expected == (attacked.value, (after.kind, after.value), same)

    def test_the_runners_memory_cannot_be_opened(
        self, session_sandbox: DockerSandbox, runtime: Runtime, make_spec: MakeSpec
    ) -> None:
        """
        /proc/1/mem, for writing and for reading, is refused, and so is /proc/1/environ
        on runc. gVisor lets any process read another's environ: there it shows only
        the container's own variables, never a request's (secrets live in the call's
        process alone).
        """
        attacked, after, same = attack_then_square(session_sandbox, runtime, make_spec,
                                                   open_the_runners_memory)

        environ: object = "EACCES"
        if runtime == "runsc":
            environ = ["ok", "CALLWARD_CALL_USER", "CALLWARD_TASK_LIMIT", "CALLWARD_TMP_INODES",
                       "HOME", "HOSTNAME",
                       "LANG", "PATH", "PYTHONDONTWRITEBYTECODE"]
        expected = (
            {"mem_write": "EACCES", "mem_read": "EACCES", "environ": environ},
            ("ok", 49), True,
        )
        assert expected == (attacked.value, (after.kind, after.value), same)

    def test_process_vm_readv_and_writev_are_refused(
        self, session_sandbox: DockerSandbox, runtime: Runtime, make_spec: MakeSpec
    ) -> None:
        """
        Copying the runner's memory out or in fails: EPERM on runc; gVisor implements
        neither call (ENOSYS).
        """
        attacked, after, same = attack_then_square(session_sandbox, runtime, make_spec,
                                                   copy_the_runners_memory)

        refused = "ENOSYS" if runtime == "runsc" else "EPERM"
        expected = ({"process_vm_readv": refused, "process_vm_writev": refused},
                    ("ok", 49), True)
        assert expected == (attacked.value, (after.kind, after.value), same)

    def test_signals_to_the_runner_change_nothing(
        self, session_sandbox: DockerSandbox, runtime: Runtime, make_spec: MakeSpec
    ) -> None:
        """
        SIGSTOP, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGABRT and SIGKILL sent to
        PID 1 neither stop nor end it: the call itself and the next one answer, in the
        same container, well within their time.
        """
        attacked, after, same = attack_then_square(session_sandbox, runtime, make_spec,
                                                   signal_the_runner)

        expected = ("ok", ("ok", 49), True)
        assert expected == (attacked.kind, (after.kind, after.value), same)

    def test_a_call_inherits_no_descriptor_of_the_runner(
        self, session_sandbox: DockerSandbox, runtime: Runtime, make_spec: MakeSpec
    ) -> None:
        """A call's process holds one descriptor past stdio: its own result pipe."""
        source_spec = make_spec(count_descriptors)
        spec = ToolSpec(
            name=source_spec.name, version=source_spec.version, description="",
            source=source_spec.source + "\n\n" + _source_of(_is_open),
            entrypoint=source_spec.entrypoint, parameters_json=source_spec.parameters_json,
            digest=source_spec.digest,
        )

        execution = in_session(session_sandbox, spec, runtime)

        expected = ("ok", 1)
        assert expected == (execution.kind, execution.value)

    def test_forged_result_lines_reach_no_later_call(
        self, session_sandbox: DockerSandbox, runtime: Runtime, make_spec: MakeSpec
    ) -> None:
        """
        A tool that writes a forged result line to every descriptor it holds forges
        nothing: the next call gets its own result, never the forged one.
        """
        attacked, after, same = attack_then_square(session_sandbox, runtime, make_spec,
                                                   forge_results)

        expected = (False, ("ok", 49), True)
        assert expected == (attacked.value == "forged", (after.kind, after.value), same)

    def test_a_call_runs_as_nobody_without_capabilities(
        self, session_sandbox: DockerSandbox, runtime: Runtime, make_spec: MakeSpec
    ) -> None:
        """The call's process is 65534:65534, with no group and not one capability."""
        execution = in_session(session_sandbox, make_spec(who_am_i), runtime)

        none = "0000000000000000"
        expected = ("ok", {"ids": [65534, 65534, 65534, 65534, []],
                           "capabilities": [none, none, none]})
        assert expected == (execution.kind, execution.value)

    def test_a_directory_the_call_made_private_is_wiped(
        self, session_sandbox: DockerSandbox, runtime: Runtime, make_spec: MakeSpec
    ) -> None:
        """A tree in /tmp that its owner locked (mode 000) is gone for the next call."""
        hidden = in_session(session_sandbox, make_spec(hide_in_tmp), runtime)
        seen = in_session(session_sandbox, make_spec(list_tmp), runtime)

        expected = (["private"], [], hidden.usage.container_id)
        assert expected == (hidden.value, seen.value, seen.usage.container_id)

    def test_a_call_still_sees_its_own_proc_entries(
        self, session_sandbox: DockerSandbox, runtime: Runtime, make_spec: MakeSpec
    ) -> None:
        """The call's own process is dumpable again: /proc/self/fd is its to read."""
        execution = in_session(session_sandbox, make_spec(look_at_own_proc), runtime)

        expected = ("ok", [True, True])
        assert expected == (execution.kind, execution.value)


def _source_of(function: Callable[..., object]) -> str:
    import inspect
    import textwrap

    return textwrap.dedent(inspect.getsource(function))

