"""
The in-container runner: run one tool function and report how it ended.

It is the sandbox image's entrypoint (``/opt/callward/runner.py``) and uses
the standard library only. The protocol, one request and one result per
container:

- stdin carries ONE JSON object, ``{"source": str, "entrypoint": str,
  "arguments": {...}}`` (the host sends it as RFC 8785 bytes, then closes stdin),
  optionally with ``"secrets": {NAME: value}`` and ``"egress_proxy": url``, which
  become environment variables of the tool's process only (never of the container);
- stdout carries exactly one JSON line, written by this process and no other:
  ``{"ok": true, "value": ...}`` or ``{"ok": false, "kind": ..., "error_type": ...,
  "message": ...}`` where ``kind`` is ``tool_error``, ``memory_limit``,
  ``pids_limit`` or ``disk_limit`` (the host adds ``timeout`` and ``output_limit``).

Invariants:

- The tool never writes to the result stream by accident: file descriptor 1
  (and ``sys.stdout``) is pointed at stderr before the tool's source is even
  compiled; the result goes to a private duplicate of the original stdout.
  The host still takes the LAST stdout line as the result.
- Only the runner's own process writes a result. A process the tool forked
  that comes back into the runner leaves with ``os._exit`` and writes nothing.
- The runner leaves with ``os._exit`` right after the result, so threads the
  tool left running cannot delay or change it; as the container's PID 1 its
  exit also ends every process the tool started.
- Messages are truncated to ``MAX_MESSAGE_CHARS``; the host bounds them again.

On gVisor the host sets ``CALLWARD_TASK_LIMIT`` (the tasks, processes and threads,
the call may run, the runner included) and gVisor's kernel refuses a fork or clone
past that plus two. The runner watches the count (a thread in call mode, its wait
loop in session mode, every ``TASK_WATCH_SECONDS``) and, once the call holds more
than its limit, kills it and reports ``pids_limit``: a tool that catches every
refusal and keeps forking is reported as one, as the pids controller does under runc.

Session mode (``runner.py --session``, one container per agent session): stdin
carries one request per line (RFC 8785 bytes hold no raw newline), each with a
``wall_seconds`` soft limit. Every request runs in a freshly forked process of
its own session; the runner waits for it at most ``wall_seconds`` (the host,
which measured that wait, reports ``timeout``). Before it writes the result
line it kills every other process in the container (as PID 1; elsewhere, the
child's process group) and wipes ``/tmp``, so nothing of one call is there for
the next. The container stays
single-tenant: the host keys it by principal and session.

A call cannot reach the session's runner (PID 1), which holds the session's
stdin and result stream and serves every later call. In the container the runner
starts as root with only ``CAP_SETUID``, ``CAP_SETGID`` and ``CAP_KILL``, and
``CALLWARD_CALL_USER`` names the user every call runs as: each call's forked
process closes the runner's descriptors (so it can neither read the next request
nor write a result line of its own), gets back the default signal dispositions
and drops to that user, and with it every capability, before the tool runs. The
kernel's user boundary then refuses the call a ptrace of the runner, its
``/proc/1/mem`` and ``environ``, ``process_vm_readv``/``writev`` and every
signal to it. The runner is also non-dumpable and ignores every signal it may
ignore, for a runner started without a call user (on the host, in tests). If it
cannot protect itself it refuses to serve (exit 3) and the host reports the
session as unavailable. Between calls a process of the call user wipes ``/tmp``
(the runner holds no right over files the tool made private).

A session request that carries secrets is never decoded by PID 1: it reads each
line into a buffer of its own, takes ``wall_seconds`` from the line's end (RFC
8785 sorts it last), forks, and zeroes the buffer; only the child parses and
compiles it. So a secret of one call is not in the memory the next call's
process is forked from. Requests without secrets keep the compile-once path.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import os
import re
import select
import shutil
import signal
import sys
import time
from _thread import allocate_lock as _allocate_lock
from _thread import start_new_thread as _start_new_thread
from types import CodeType
from typing import TYPE_CHECKING, Final, NoReturn

if TYPE_CHECKING:
    import ctypes

MAX_MESSAGE_CHARS: Final = 500
#: How many exceptions of a ``__cause__``/``__context__`` chain are examined.
_MAX_CHAIN: Final = 16
_DISK_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
_EXIT_BAD_REQUEST: Final = 2
_EXIT_UNPROTECTED: Final = 3
_TMP: Final = "/tmp"  # noqa: S108 - the container's own tmpfs
_MAX_RESULT_BYTES: Final = 1 << 26
TASK_LIMIT_ENV: Final = "CALLWARD_TASK_LIMIT"
TMP_INODES_ENV: Final = "CALLWARD_TMP_INODES"
#: The size a tmpfs directory reports per entry (Linux and gVisor alike).
_TMPFS_DIRENT_BYTES: Final = 20
TASK_WATCH_SECONDS: Final = 0.02
_PROC: Final = "/proc"


def _truncate(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return text[: MAX_MESSAGE_CHARS - 3] + "..."


def _limit_kind(exc: BaseException) -> str | None:
    """The limit one exception shows was hit, if any."""
    if isinstance(exc, MemoryError):
        return "memory_limit"
    if isinstance(exc, BlockingIOError) or (isinstance(exc, OSError) and exc.errno == errno.EAGAIN):
        # fork() and clone() fail with EAGAIN when the pids controller says no.
        return "pids_limit"
    if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
        return "pids_limit"
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return "disk_limit"
    return None


def classify(exc: BaseException) -> str:
    """
    The failure kind of an exception that left the tool.

    A limit found anywhere in the exception's chain wins, so a tool that wraps
    ``MemoryError`` in its own exception still reports ``memory_limit``.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < _MAX_CHAIN:
        seen.add(id(current))
        kind = _limit_kind(current)
        if kind is not None:
            return kind
        current = current.__cause__ or current.__context__
    return "tool_error"


def failure(kind: str, error_type: str, message: str) -> dict[str, object]:
    return {
        "ok": False,
        "kind": kind,
        "error_type": _truncate(error_type),
        "message": _truncate(message),
    }


def failure_from(exc: BaseException) -> dict[str, object]:
    return failure(classify(exc), type(exc).__name__, str(exc))


def task_limit(environ: dict[str, str] | os._Environ[str] = os.environ) -> int | None:
    """The tasks the call may run (gVisor only), or None where the runner need not watch."""
    value = environ.get(TASK_LIMIT_ENV, "")
    return int(value) if value.isdigit() and 0 < int(value) <= 1 << 20 else None


def count_tasks(proc: str = _PROC, threads_of: int = 1) -> int:
    """
    A lower bound of the tasks (processes and threads) that ``proc`` shows: under
    gVisor, the sandbox's own. Every process counts once, and ``threads_of``, the
    process the tool runs in, counts each of its threads.

    Only two directories are read: under a fork bomb every system call waits for a
    share of a CPU that many tasks spin on, so a read of every process's task list
    would take seconds. A bound from below never reports a call that stayed within
    its limit.
    """
    processes = 0
    with contextlib.suppress(OSError):
        processes = sum(1 for name in os.listdir(proc) if name.isdigit())
    threads = 1
    with contextlib.suppress(OSError):
        threads = max(1, len(os.listdir(f"{proc}/{threads_of}/task")))
    return processes + threads - 1


def tmp_inode_limit(environ: dict[str, str] | os._Environ[str] = os.environ) -> int | None:
    """The files ``/tmp`` may hold (gVisor only), or None where the kernel keeps the bound."""
    value = environ.get(TMP_INODES_ENV, "")
    return int(value) if value.isdigit() and 0 < int(value) <= 1 << 24 else None


def count_entries(directory: str, stop_after: int) -> int:
    """
    The files and directories below ``directory``, counted up to just past
    ``stop_after``. A directory that cannot be read counts by the size tmpfs gives it
    (20 bytes an entry), once the watch has tried to open it up (its owner may).
    """
    count = 0
    stack = [directory]
    opened: set[str] = set()
    while stack and count <= stop_after:
        path = stack.pop()
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    count += 1
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except OSError:
            if path not in opened:  # once: open it up and read it again
                opened.add(path)
                try:
                    os.chmod(path, 0o700)
                except OSError:
                    pass
                else:
                    stack.append(path)
                    continue
            with contextlib.suppress(OSError):
                count += os.stat(path).st_size // _TMPFS_DIRENT_BYTES
    return count


def over_inode_limit_failure(limit: int) -> dict[str, object]:
    return failure("disk_limit", "InodeLimit", f"the tool made more than {limit} files in /tmp")


def over_task_limit_failure(limit: int) -> dict[str, object]:
    return failure("pids_limit", "TaskLimit",
                   f"the tool ran more than {limit} processes or threads")


def parse_request(data: bytes) -> tuple[str, str, dict[str, object]]:
    """
    Read the request object.

    Raises:
        ValueError: The bytes are not JSON.
        TypeError: The JSON is not a request object.
    """
    return _request_fields(json.loads(data.decode("utf-8")))


def load_request(data: bytes | bytearray) -> dict[str, object]:
    """
    The request object.

    Raises:
        ValueError: The bytes are not JSON.
        TypeError: The JSON is not an object.
    """
    request = json.loads(data.decode("utf-8"))
    if not isinstance(request, dict):
        raise TypeError("the request is not a JSON object")
    return request


def request_environment(request: dict[str, object]) -> dict[str, str]:
    """
    The variables the tool's process gets: its secrets, and the egress proxy if any.

    Raises:
        TypeError: ``secrets`` is not an object of strings, or ``egress_proxy`` not a string.
    """
    environment: dict[str, str] = {}
    secrets = request.get("secrets", {})
    if not isinstance(secrets, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in secrets.items()
    ):
        raise TypeError("the request's secrets are not an object of strings")
    environment.update(secrets)
    proxy = request.get("egress_proxy")
    if proxy is not None:
        if not isinstance(proxy, str):
            raise TypeError("the request's egress_proxy is not a string")
        for variable in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            environment[variable] = proxy
    return environment


def _request_fields(request: object) -> tuple[str, str, dict[str, object]]:
    if not isinstance(request, dict):
        raise TypeError("the request is not a JSON object")
    source = request.get("source")
    entrypoint = request.get("entrypoint")
    arguments = request.get("arguments")
    if not isinstance(source, str) or not isinstance(entrypoint, str):
        raise TypeError("the request needs string source and entrypoint")
    if not isinstance(arguments, dict):
        raise TypeError("the request's arguments are not an object")
    return source, entrypoint, arguments


def run_tool(source: str, entrypoint: str, arguments: dict[str, object]) -> dict[str, object]:
    """
    Execute ``source`` in a fresh namespace and call ``entrypoint(**arguments)``.

    Returns the result object; never raises for anything the tool does.
    """
    try:
        code = compile(source, "<tool>", "exec")
    except BaseException as exc:  # noqa: BLE001 - the tool boundary: every exception becomes a kind
        return failure_from(exc)
    return run_code(code, entrypoint, arguments)


def run_code(code: CodeType, entrypoint: str, arguments: dict[str, object]) -> dict[str, object]:
    """``run_tool`` with the source already compiled: the module runs in a fresh namespace."""
    try:
        namespace: dict[str, object] = {"__name__": "callward_tool", "__builtins__": builtins}
        exec(code, namespace)  # noqa: S102 - running the tool is the job
        function = namespace.get(entrypoint)
        if not callable(function):
            return failure("tool_error", "NameError", "the entrypoint is not a function")
        value = function(**arguments)
    except BaseException as exc:  # noqa: BLE001 - the tool boundary: every exception becomes a kind
        return failure_from(exc)
    return {"ok": True, "value": value}


def encode_result(result: dict[str, object]) -> bytes:
    """One JSON line; a value JSON cannot hold becomes a ``tool_error``."""
    try:
        text = json.dumps(result, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        text = json.dumps(
            failure("tool_error", type(exc).__name__, "the return value is not JSON"),
            separators=(",", ":"),
        )
    return text.encode("ascii") + b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def main() -> None:
    """Run one request from stdin and write its result; never returns."""
    runner_pid = os.getpid()
    result_fd = os.dup(1)  # not inherited across exec (PEP 446)
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        data = sys.stdin.buffer.read()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        request = load_request(data)
        source, entrypoint, arguments = _request_fields(request)
        os.environ.update(request_environment(request))
        del data, request
    except (OSError, ValueError, TypeError) as exc:
        _write_all(result_fd, encode_result(failure("tool_error", "BadRequest", str(exc))))
        os._exit(_EXIT_BAD_REQUEST)

    report = _ResultLine(result_fd)
    limit, inodes = task_limit(), tmp_inode_limit()
    if limit is not None or inodes is not None:
        _start_task_watch(limit, inodes, report)
    result = run_tool(source, entrypoint, arguments)
    if os.getpid() != runner_pid:
        os._exit(0)  # a process the tool forked: only the runner reports
    report.write_and_exit(result)


class _ResultLine:
    """Call mode's one result line: the first to write it (the tool's end or the watch) exits."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._claimed = _allocate_lock()

    def write_and_exit(self, result: dict[str, object]) -> NoReturn:
        self._claimed.acquire()  # never released: this process exits holding it
        line = encode_result(result)
        with contextlib.suppress(OSError, ValueError):  # a broken stderr cannot change the result
            sys.stderr.flush()
        _write_all(self._fd, line)
        os._exit(0)


def _start_task_watch(limit: int | None, inodes: int | None, report: _ResultLine) -> None:
    """
    Report ``pids_limit`` and end the call once it holds more than ``limit`` tasks, and
    ``disk_limit`` once ``/tmp`` holds more than ``inodes`` files.
    """

    runner_pid = os.getpid()

    def watch() -> None:
        while True:
            time.sleep(TASK_WATCH_SECONDS)
            # The watch's own thread is not the call's.
            if limit is not None and count_tasks(threads_of=runner_pid) - 1 > limit:
                report.write_and_exit(over_task_limit_failure(limit))
            if inodes is not None and count_entries(_TMP, inodes) > inodes:
                report.write_and_exit(over_inode_limit_failure(inodes))

    _start_new_thread(watch, ())


# -- session mode ------------------------------------------------------------------------


_WALL_SECONDS_AT_END: Final = re.compile(rb'"wall_seconds":([0-9][0-9.eE+-]{0,30})}\s*\Z')
_SECRETS_KEY: Final = b'"secrets":'
_LINE_BUFFER_BYTES: Final = 1 << 16


def session_wall_seconds(data: bytes | bytearray) -> float:
    """
    The soft limit a session request carries (5 s if it carries none that is valid).

    Read from the end of the line without decoding the rest: the host sends
    RFC 8785 bytes, whose sorted keys put ``wall_seconds`` last.
    """
    match = _WALL_SECONDS_AT_END.search(data)
    try:
        value = float(match.group(1)) if match else 5.0
    except ValueError:
        return 5.0
    return value if 0 < value <= 3600 else 5.0


def zero(buffer: bytearray) -> None:
    """Overwrite ``buffer`` in place, so what it held is not left in freed memory."""
    buffer[:] = bytes(len(buffer))


class LineReader:
    """
    Reads stdin lines into a buffer of its own, which the caller zeroes after use.

    No line passes through an immutable ``bytes`` object in this process, and a
    buffer that grows is zeroed before it is dropped.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray(_LINE_BUFFER_BYTES)
        self._filled = 0
        self._eof = False

    def next_line(self) -> bytearray | None:
        """The next line (without its newline), or None at the end of stdin."""
        while True:
            end = self._buffer.find(b"\n", 0, self._filled)
            if end >= 0:
                line = self._buffer[:end]  # a bytearray: one copy, zeroed by the caller
                rest = self._filled - end - 1
                with memoryview(self._buffer) as view:  # moved in place, no copy left behind
                    view[:rest] = view[end + 1 : self._filled]
                self._buffer[rest : self._filled] = bytes(self._filled - rest)
                self._filled = rest
                return line
            if self._eof:
                if not self._filled:
                    return None
                line = self._buffer[: self._filled]
                self._buffer[: self._filled] = bytes(self._filled)
                self._filled = 0
                return line
            if self._filled == len(self._buffer):
                grown = bytearray(2 * len(self._buffer))
                grown[: self._filled] = self._buffer
                zero(self._buffer)
                self._buffer = grown
            with memoryview(self._buffer) as view:
                count = os.readv(self._fd, [view[self._filled :]])
            if count == 0:
                self._eof = True
            self._filled += count


def _wall_seconds(request: object) -> float:
    value = request.get("wall_seconds") if isinstance(request, dict) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 3600:
        return float(value)
    return 5.0


# A session runs the same few tools again and again: each source is compiled once, in
# the session's own process, and every call's fresh child runs the code object.
_COMPILED: dict[str, CodeType] = {}
_MAX_COMPILED: Final = 64


def _compiled(source: str) -> CodeType:
    """
    The code of ``source``, compiled on its first call in this session.

    Raises:
        BaseException: Whatever ``compile`` raises (a ``SyntaxError``, a ``MemoryError``).
    """
    code = _COMPILED.get(source)
    if code is None:
        code = compile(source, "<tool>", "exec")
        if len(_COMPILED) >= _MAX_COMPILED:
            _COMPILED.clear()
        _COMPILED[source] = code
    return code


_PR_SET_DUMPABLE: Final = 4
#: Signals a process may send that the runner ignores. SIGKILL and SIGSTOP cannot be
#: ignored (as PID 1 the kernel drops them from inside the container); SIGCHLD stays
#: as it is, or the kernel would reap the call's process before the runner waits for
#: it; faults a process raises on itself (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP,
#: SIGSYS) stay as they are, so a bug in the runner still ends it.
_KEPT_SIGNALS: Final = frozenset({
    signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGSEGV, signal.SIGBUS,
    signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS,
})
#: The dispositions the runner replaced, given back to each call's process.
_CALL_DISPOSITIONS: dict[signal.Signals, object] = {}
#: The runner's own descriptors (stdin's requests, the result stream): closed in a call.
_RUNNER_FDS: set[int] = set()
CALL_USER_ENV: Final = "CALLWARD_CALL_USER"
#: The (uid, gid) every call runs as, when the runner was given one (see serve_session).
_CALL_USER: list[tuple[int, int]] = []


def call_user(environ: dict[str, str] | os._Environ[str] = os.environ) -> tuple[int, int] | None:
    """
    The ``uid:gid`` in ``CALLWARD_CALL_USER``, or None if it is not set.

    Raises:
        ValueError: It is set but is not two non-root ids.
    """
    value = environ.get(CALL_USER_ENV)
    if value is None:
        return None
    uid_text, _, gid_text = value.partition(":")
    if not (uid_text.isdigit() and gid_text.isdigit()) or int(uid_text) == 0 or int(gid_text) == 0:
        raise ValueError(f"{CALL_USER_ENV} must be two non-root ids, uid:gid")
    return int(uid_text), int(gid_text)


def become(user: tuple[int, int]) -> None:
    """
    Drop this process to ``user``: no supplementary groups, and so no capability.

    Raises:
        OSError: The process lacks the right to change its ids.
    """
    uid, gid = user
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise OSError(errno.EPERM, "the ids did not change")


#: The C library, loaded once by the runner (its forked calls inherit the handle).
_LIBC: list[ctypes.CDLL] = []


def set_dumpable(dumpable: bool) -> None:
    """
    Set this process's dumpable attribute with ``prctl(PR_SET_DUMPABLE)``.

    Raises:
        OSError: The kernel (or the sandbox kernel) refused.
    """
    import ctypes  # noqa: PLC0415 - only session mode needs it

    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    if _LIBC[0].prctl(_PR_SET_DUMPABLE, int(dumpable), 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def protect_runner() -> None:
    """
    Make this process unreachable from the calls it forks: no ptrace, no
    ``/proc/<pid>/mem``, no ``process_vm_readv``/``writev``, no signals.

    Raises:
        OSError: The process could not be made non-dumpable.
    """
    set_dumpable(False)
    for number in signal.valid_signals():
        if number in _KEPT_SIGNALS:
            continue
        with contextlib.suppress(OSError, ValueError):  # e.g. the C library's own signals
            previous = signal.signal(number, signal.SIG_IGN)
            _CALL_DISPOSITIONS[signal.Signals(number)] = (
                signal.SIG_DFL if previous is None else previous
            )


def enter_call() -> None:
    """
    In a call's forked process, first: drop the runner's descriptors, protections and
    user. A process that cannot drop to the call user never runs the tool: it exits
    without a result.
    """
    for fd in _RUNNER_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    for number, disposition in _CALL_DISPOSITIONS.items():
        with contextlib.suppress(OSError, ValueError):
            signal.signal(number, disposition)  # type: ignore[arg-type]
    if _CALL_USER:
        try:
            become(_CALL_USER[0])
        except OSError:
            os._exit(_EXIT_UNPROTECTED)
    with contextlib.suppress(OSError):
        set_dumpable(True)  # the call's own process: /proc/self as usual


def _child(code: CodeType, entrypoint: str, arguments: dict[str, object], result_w: int,
           environment: dict[str, str]) -> None:
    """In the forked process: run one request, write its result to the pipe, exit."""
    enter_call()
    os.setsid()
    child_pid = os.getpid()
    os.environ.update(environment)
    _report_and_exit(child_pid, run_code(code, entrypoint, arguments), result_w)


def _secret_child(data: bytearray, result_w: int) -> None:
    """In the forked process: parse and run a request with secrets (PID 1 never decodes it)."""
    enter_call()
    os.setsid()
    child_pid = os.getpid()
    try:
        request = load_request(data)
        source, entrypoint, arguments = _request_fields(request)
        os.environ.update(request_environment(request))
        del request
    except (ValueError, TypeError) as exc:
        result = failure("tool_error", "BadRequest", str(exc))
    else:
        result = run_tool(source, entrypoint, arguments)
    _report_and_exit(child_pid, result, result_w)


def _report_and_exit(child_pid: int, result: dict[str, object], result_w: int) -> None:
    """Write the call's result to the pipe and exit; a process the tool forked only exits."""
    if os.getpid() == child_pid:  # only the call's own process reports
        with contextlib.suppress(OSError):
            _write_all(result_w, encode_result(result))
    os._exit(0)


class _OverLimit(Exception):
    """The call held more tasks, or made more files, than it may (seen by the wait loop)."""

    def __init__(self, result: dict[str, object]) -> None:
        super().__init__(result.get("error_type"))
        self.result = result


def _read_result(result_r: int, pid: int, deadline: float, limit: int | None = None, *,
                 inodes: int | None = None, tmp: str = _TMP) -> tuple[bytes, int | None]:
    """
    The child's result bytes and wait status; status None if it ran past the deadline.

    Raises:
        _OverLimit: ``limit`` is set and the container held more tasks than that, or
            ``inodes`` is set and ``tmp`` holds more files than that.
    """
    data = bytearray()
    watched = limit is not None or inodes is not None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return bytes(data), None
        wait = min(remaining, TASK_WATCH_SECONDS) if watched else remaining
        ready, _, _ = select.select([result_r], [], [], wait)
        if not ready:
            if limit is not None and count_tasks(threads_of=pid) > limit:
                raise _OverLimit(over_task_limit_failure(limit))
            if inodes is not None and count_entries(tmp, inodes) > inodes:
                raise _OverLimit(over_inode_limit_failure(inodes))
            continue
        chunk = os.read(result_r, 65536)
        if not chunk or len(data) > _MAX_RESULT_BYTES:
            break
        data += chunk
    # The pipe closed: the child is exiting; give it until the deadline.
    return bytes(data), _exit_status(pid, deadline)


def _exit_status(pid: int, deadline: float) -> int | None:
    """The child's wait status once it exits, or None if it is still there at the deadline."""
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        return status
    try:
        pidfd: int | None = os.pidfd_open(pid)  # readable once the child has exited
    except (AttributeError, OSError):
        pidfd = None  # an older kernel (or sandbox kernel): poll
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if pidfd is not None:
                select.select([pidfd], [], [], remaining)
            else:
                time.sleep(min(0.001, remaining))
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _kill_all_but_me(child_pid: int) -> None:
    """
    Kill every process of the call. As PID 1 that is every other process in the
    container, wherever it moved (setsid, double fork); elsewhere the child's group.
    """
    me = os.getpid()
    for _ in range(100):
        if me == 1:
            others = [int(n) for n in os.listdir("/proc") if n.isdigit() and int(n) != me]
        else:
            others = [child_pid]
            with contextlib.suppress(OSError):
                os.killpg(child_pid, signal.SIGKILL)
        for pid in others:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        reaped = False
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                reaped = True
        if me != 1 or (not others and not reaped):
            return
        time.sleep(0.001)


def wipe(directory: str) -> None:
    """
    Remove everything in ``directory``, leaving the directory itself.

    A directory the tool locked (mode 000, say) is opened up first: its owner, the
    process that wipes, may always change its mode.
    """
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    _open_up(entry.path)
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)


def _open_up(top: str) -> None:
    """Give the owner every right on ``top`` and the directories below it (no symlink)."""
    with contextlib.suppress(OSError):
        os.chmod(top, 0o700)
    for parent, dirs, _ in os.walk(top):
        for name in dirs:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                with contextlib.suppress(OSError):
                    os.chmod(path, 0o700)


def _take_call_user() -> None:
    """
    Remember the call user, if the container names one.

    Raises:
        ValueError: The name is not two non-root ids.
        OSError: A call user is named but this runner, not being root, cannot become it.
    """
    user = call_user()
    if user is None:
        return
    if os.getuid() != 0:
        raise OSError(errno.EPERM, f"{CALL_USER_ENV} is set but the runner is not root")
    _CALL_USER.append(user)


def wipe_as_call_user(directory: str) -> None:
    """
    ``wipe(directory)``, in a process of the call user when there is one: the runner
    has no right over a directory the tool made private, its owner does.
    """
    if not _CALL_USER:
        wipe(directory)
        return
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        if next(entries, None) is None:
            return  # nothing left behind: no process to fork (most calls)
    pid = os.fork()
    if pid == 0:
        try:
            become(_CALL_USER[0])
            wipe(directory)
        finally:
            os._exit(0)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def run_session_call(data: bytearray, tmp: str = _TMP) -> dict[str, object]:
    """
    Run one session request in a forked process; afterwards nothing of it is left.

    The request is read and its source compiled here, once, so the child only runs
    the tool: a request that is not one, or source that does not compile, is answered
    without a child, as the child would have answered it. A request with secrets is
    not decoded here at all: the child parses it, and ``data`` is zeroed once the
    child has its copy.
    """
    if _SECRETS_KEY in data:
        wall_seconds = session_wall_seconds(data)
        result_r, result_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(result_r)
            _secret_child(data, result_w)
        zero(data)
    else:
        try:
            request = load_request(data)
            source, entrypoint, arguments = _request_fields(request)
            environment = request_environment(request)
        except (ValueError, TypeError) as exc:
            return failure("tool_error", "BadRequest", str(exc))
        wall_seconds = _wall_seconds(request)
        try:
            code = _compiled(source)
        except BaseException as exc:  # noqa: BLE001 - the tool boundary: every exception becomes a kind
            return failure_from(exc)
        result_r, result_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(result_r)
            _child(code, entrypoint, arguments, result_w, environment)
    os.close(result_w)
    try:
        raw, status = _read_result(result_r, pid, time.monotonic() + wall_seconds,
                                   task_limit(), inodes=tmp_inode_limit(), tmp=tmp)
    except _OverLimit as over:
        return over.result
    finally:
        os.close(result_r)
        _kill_all_but_me(pid)
        wipe_as_call_user(tmp)
    return _session_result(raw, status, wall_seconds)


def _session_result(raw: bytes, status: int | None, wall_seconds: float) -> dict[str, object]:
    """What a session call's child left: its result line, or how it ended without one."""
    if status is None:
        # Only the host may say timeout; it measures the call past wall_seconds itself.
        return failure("tool_error", "Timeout", f"the tool ran longer than {wall_seconds} s")
    try:
        result = json.loads(raw.decode("utf-8"))
    except ValueError:
        result = None
    if isinstance(result, dict) and isinstance(result.get("ok"), bool):
        return result
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return failure("memory_limit", "Killed", "the tool was killed, most likely out of memory")
    return failure("tool_error", "NoResult", "the tool's process ended without a result")


def serve_session() -> None:
    """Answer one request per stdin line until stdin ends; never returns."""
    try:
        _take_call_user()
        protect_runner()
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"callward runner: cannot protect the session's runner: {exc}\n")
        os._exit(_EXIT_UNPROTECTED)
    result_fd = os.dup(1)
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    request_fd = os.dup(0)
    _RUNNER_FDS.update({result_fd, request_fd})
    requests = LineReader(request_fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the tool never reads the next request
    os.close(devnull)
    while (line := requests.next_line()) is not None:
        result = run_session_call(line)
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        _write_all(result_fd, encode_result(result))
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[1:] == ["--session"]:
        serve_session()
    main()
