"""
The one translation of ``ResourceLimits`` into a hardened container.

Invariants, whatever the limits say:

- no network (``network_mode="none"``) unless the call was granted egress, and
  then only an internal network whose one way out is the egress proxy
  (``_egress.py``); no host mounts, no IPC namespace
  shared or mounted (``ipc_mode="none"``: no ``/dev/shm``);
- a read-only root; ``/tmp`` is the only writable path, a ``noexec`` tmpfs of
  ``tmp_bytes``;
- every capability dropped, ``no-new-privileges``, the user ``nobody``
  (65534:65534), never root;
- memory without swap, a pids limit, a CPU share and an open-files limit, all
  finite because ``ResourceLimits`` refuses anything else;
- no log driver, so a tool that floods its output fills no host disk (the
  host reads the output through ``attach`` and caps it).

Nothing is passed through: callers get exactly these keys.
"""

from __future__ import annotations

from typing import Final, Literal, TypedDict

from callward.core import ResourceLimits

Runtime = Literal["runc", "runsc"]

NOBODY: Final = "65534:65534"
OWNER_LABEL: Final = "callward"
OWNER_PID_LABEL: Final = "callward.pid"
#: The owner's PID namespace (``pid:[inode]``): a pid means nothing outside it.
OWNER_PIDNS_LABEL: Final = "callward.pidns"
#: The container's own tmpfs, the only writable path; not the host's /tmp.
CONTAINER_TMP: Final = "/tmp"  # noqa: S108 - inside the container
#: The host side kills the container at the deadline; this only makes the
#: kernel choose the sandbox first if the host itself runs out of memory.
_OOM_SCORE_ADJ: Final = 1000


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
    return ContainerOptions(
        image=image,
        network_mode=egress_network or "none",
        ipc_mode="none",
        read_only=True,
        tmpfs={CONTAINER_TMP: f"rw,nosuid,nodev,noexec,size={limits.tmp_bytes},mode=1777"},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        privileged=False,
        user=NOBODY,
        mem_limit=limits.memory_bytes,
        memswap_limit=limits.memory_bytes,
        pids_limit=limits.pids,
        nano_cpus=round(limits.cpus * 1e9),
        ulimits=[Ulimit(name="nofile", soft=limits.open_files, hard=limits.open_files)],
        oom_score_adj=_OOM_SCORE_ADJ,
        environment={"HOME": CONTAINER_TMP},
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
