"""
The one translation of ``ResourceLimits`` into a hardened container.

Invariants, whatever the limits say:

- no network (``network_mode="none"``) unless the call was granted egress, and
  then only an internal network whose one way out is the egress proxy
  (``_egress.py``); no host mounts, no IPC namespace
  shared or mounted (``ipc_mode="none"``: no ``/dev/shm``);
- a read-only root; ``/tmp`` is the only writable path, a ``noexec`` tmpfs of
  ``tmp_bytes`` and of ``tmp_inodes(tmp_bytes)`` files;
- every capability dropped, ``no-new-privileges``, the tool always runs as the
  user ``nobody`` (65534:65534), never root. A session's container is the one
  exception for its runner alone: PID 1 starts as root holding only
  ``CAP_SETUID``, ``CAP_SETGID`` and ``CAP_KILL``, and each call's forked process
  drops to ``nobody`` (and so to no capability) before the tool runs
  (``CALLWARD_CALL_USER``). A call then cannot signal, ptrace or read the runner
  that serves every later call of the session: the kernel's own user boundary
  keeps them apart, on runc and on gVisor alike (gVisor delivers SIGKILL and
  SIGSTOP to a PID 1 of the same user);
- memory without swap, a pids limit, a CPU share and an open-files limit, all
  finite because ``ResourceLimits`` refuses anything else;
- on gVisor (``runsc``) the pids limit is kept by gVisor's own kernel: see
  ``gvisor_task_limits``;
- no log driver, so a tool that floods its output fills no host disk (the
  host reads the output through ``attach`` and caps it).

Nothing is passed through: callers get exactly these keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, TypedDict

from callward.core import ResourceLimits, Runtime
from callward.sandbox._cgroups import GVISOR_CGROUP_PARENT

NOBODY: Final = "65534:65534"
#: A session runner's user: root, with only the capabilities it needs to start each
#: call as ``NOBODY`` and to end what the call left (see the module's docstring).
SESSION_RUNNER_USER: Final = "0:0"
SESSION_RUNNER_CAPABILITIES: Final = ("SETUID", "SETGID", "KILL")
#: Tells a session runner the user each call runs as; it refuses to serve without it.
CALL_USER_ENV: Final = "CALLWARD_CALL_USER"
OWNER_LABEL: Final = "callward"
OWNER_PID_LABEL: Final = "callward.pid"
#: The owner's PID namespace (``pid:[inode]``): a pid means nothing outside it.
OWNER_PIDNS_LABEL: Final = "callward.pidns"
#: The container's own tmpfs, the only writable path; not the host's /tmp.
CONTAINER_TMP: Final = "/tmp"  # noqa: S108 - inside the container
_BYTES_PER_TMP_INODE: Final = 4096
_MIN_TMP_INODES: Final = 256
_MAX_TMP_INODES: Final = 65536
#: The host side kills the container at the deadline; this only makes the
#: kernel choose the sandbox first if the host itself runs out of memory.
_OOM_SCORE_ADJ: Final = 1000
#: Tells the runner, on gVisor only, the tasks (processes and threads, itself included)
#: the call may run, so that it can report a tool that went past them (see runner.py).
TASK_LIMIT_ENV: Final = "CALLWARD_TASK_LIMIT"
#: On gVisor, whose tmpfs has no inode bound: the files /tmp may hold (see runner.py).
TMP_INODES_ENV: Final = "CALLWARD_TMP_INODES"
#: On gVisor: the runner's watcher thread, and one task more, so that going past
#: ``pids`` is seen by the watcher instead of only refused.
_GVISOR_EXTRA_TASKS: Final = 2
#: The host threads gVisor's sentry may need, as a floor and per guest task. Its
#: ptrace platform keeps a host stub per guest address space and sentry thread: an
#: idle sandbox holds 38; under a fork bomb 16 / 64 / 128 guest tasks held up to
#: 515 / 1,750 / 2,012 host tasks (this machine, runsc 20221219).
_GVISOR_HOST_PIDS_FLOOR: Final = 64
_GVISOR_HOST_PIDS_PER_TASK: Final = 48
#: The host pids limit of one gVisor container never goes above this (the host's
#: pid_max is often 32,768); a larger ``pids`` is then not reached inside.
GVISOR_HOST_PIDS_MAX: Final = 8192


class Ulimit(TypedDict):
    name: str
    soft: int
    hard: int


class LogConfig(TypedDict):
    type: str


class ContainerOptions(TypedDict):
    """Keyword arguments for docker-py's ``containers.create``; nothing else is passed."""

    image: str
    network_mode: str
    ipc_mode: Literal["none"]
    read_only: Literal[True]
    tmpfs: dict[str, str]
    cap_drop: list[str]
    cap_add: list[str]
    cgroup_parent: str
    security_opt: list[str]
    privileged: Literal[False]
    user: str
    mem_limit: int
    memswap_limit: int
    pids_limit: int
    nano_cpus: int
    ulimits: list[Ulimit]
    oom_score_adj: int
    environment: dict[str, str]
    working_dir: str
    hostname: str
    labels: dict[str, str]
    stdin_open: Literal[True]
    tty: Literal[False]
    log_config: LogConfig
    runtime: Runtime
    command: list[str]


@dataclass(frozen=True, slots=True)
class GvisorTaskLimits:
    """
    How the pids limit of a gVisor container is kept.

    Under runc the container's pids controller counts the tool's own tasks. Under
    gVisor it counts the sentry's host threads, which grow with every guest process,
    and the sentry dies when it cannot start one (exit code 2, no result, and the
    cgroup gone before its counters can be read). So gVisor's kernel keeps the limit
    instead, as ``RLIMIT_NPROC`` of the user nobody, which every process of the
    sandbox runs as: a fork or clone past it fails with EAGAIN inside the sandbox,
    as under runc. The host's pids limit stays, sized for the sentry, as a backstop.

    Attributes:
        guest_nproc: ``RLIMIT_NPROC`` (soft and hard) inside the sandbox: ``pids``
            plus the runner's watcher thread and one task for the watcher to see.
        host_pids: The container's pids limit on the host.
    """

    guest_nproc: int
    host_pids: int


def gvisor_task_limits(pids: int) -> GvisorTaskLimits:
    """The guest and host task limits of a gVisor container whose tool may run ``pids``."""
    guest_nproc = pids + _GVISOR_EXTRA_TASKS
    host_pids = min(
        GVISOR_HOST_PIDS_MAX, _GVISOR_HOST_PIDS_FLOOR + _GVISOR_HOST_PIDS_PER_TASK * guest_nproc
    )
    return GvisorTaskLimits(guest_nproc=guest_nproc, host_pids=host_pids)


def tmp_inodes(tmp_bytes: int) -> int:
    """
    The inodes ``/tmp`` may hold: one per 4 KiB of its size, within [256, 65536]. A
    tmpfs bounded in bytes only lets empty files fill the container's memory instead;
    bounded in inodes too, the next file is refused with ENOSPC (``disk_limit``).
    """
    return max(_MIN_TMP_INODES, min(_MAX_TMP_INODES, tmp_bytes // _BYTES_PER_TMP_INODE))


def container_options(
    limits: ResourceLimits,
    *,
    image: str,
    runtime: Runtime,
    owner_pid: int,
    owner_pidns: str = "",
    session: bool = False,
    egress_network: str = "",
) -> ContainerOptions:
    """
    The ``containers.create`` arguments of one single-use sandbox container.

    Args:
        limits: What the execution may use.
        image: The image to run, by id (``sha256:...``) so the digest in the
            audit log is the one that ran.
        runtime: ``runc``, or ``runsc`` for gVisor's user-space kernel.
        owner_pid: The host process that owns the container, written to a label
            so that leftovers of a dead process can be found and removed.
        owner_pidns: The PID namespace that ``owner_pid`` is in, so that another
            namespace sharing the engine never takes a live owner for a dead one.
        session: Start the runner in session mode (one request per stdin line,
            a forked process per request) instead of one request per container.
        egress_network: The internal egress network to join instead of none
            (only for a call granted egress; see ``_egress.py``).
    """
    ulimits = [Ulimit(name="nofile", soft=limits.open_files, hard=limits.open_files)]
    pids_limit = limits.pids
    environment = {"HOME": CONTAINER_TMP}
    if runtime == "runsc":
        tasks = gvisor_task_limits(limits.pids)
        # Per user, so only under gVisor: there the user nobody is this sandbox's alone.
        ulimits.append(Ulimit(name="nproc", soft=tasks.guest_nproc, hard=tasks.guest_nproc))
        pids_limit = tasks.host_pids
        environment[TASK_LIMIT_ENV] = str(limits.pids)
        # gVisor's tmpfs ignores nr_inodes: the runner watches the count instead.
        environment[TMP_INODES_ENV] = str(tmp_inodes(limits.tmp_bytes))
    if session:
        environment[CALL_USER_ENV] = NOBODY
    return ContainerOptions(
        image=image,
        network_mode=egress_network or "none",
        ipc_mode="none",
        read_only=True,
        tmpfs={CONTAINER_TMP: f"rw,nosuid,nodev,noexec,size={limits.tmp_bytes},"
                              f"nr_inodes={tmp_inodes(limits.tmp_bytes)},mode=1777"},
        cap_drop=["ALL"],
        cap_add=list(SESSION_RUNNER_CAPABILITIES) if session else [],
        # Every gVisor container under one parent whose pids limit bounds them all.
        cgroup_parent=GVISOR_CGROUP_PARENT if runtime == "runsc" else "",
        security_opt=["no-new-privileges"],
        privileged=False,
        user=SESSION_RUNNER_USER if session else NOBODY,
        mem_limit=limits.memory_bytes,
        memswap_limit=limits.memory_bytes,
        pids_limit=pids_limit,
        nano_cpus=round(limits.cpus * 1e9),
        ulimits=ulimits,
        oom_score_adj=_OOM_SCORE_ADJ,
        environment=environment,
        working_dir=CONTAINER_TMP,
        hostname="sandbox",
        labels={
            OWNER_LABEL: "1",
            OWNER_PID_LABEL: str(owner_pid),
            OWNER_PIDNS_LABEL: owner_pidns,
        },
        # With stdin_open and not detached, docker-py also sets StdinOnce: the
        # engine closes the runner's stdin when the host half-closes the attach socket.
        stdin_open=True,
        tty=False,
        log_config=LogConfig(type="none"),
        runtime=runtime,
        command=["--session"] if session else [],
    )
