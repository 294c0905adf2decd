"""
Which cgroup limit fired in a container, and what memory it holds, read from the host.

The kernel keeps counters the engine does not report in time: the pids controller
counts the forks and clones it refused, the memory controller the runs of its OOM
killer. Read straight from the container's cgroup files (cgroup v1 and v2, with the
cgroupfs and systemd drivers), they tell a tool that hit a limit from one that merely
failed, without a round trip to the engine.

Every reader returns None (or 0 where the caller only compares) when the files cannot
be read here, as with a remote engine or another layout; callers then ask the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final

#: The parent cgroup of every gVisor container (cgroupfs driver): its pids limit bounds
#: the host tasks of all of them together (see ``ensure_task_budget``).
GVISOR_CGROUP_PARENT: Final = "/callward-gvisor"
_PARENT: Final = GVISOR_CGROUP_PARENT.strip("/")

#: Where the pids controller counts refused forks, for cgroup v1 and v2 (cgroupfs, systemd).
_PIDS_EVENTS: Final = (
    "/sys/fs/cgroup/pids/docker/{id}/pids.events",
    "/sys/fs/cgroup/docker/{id}/pids.events",
    "/sys/fs/cgroup/system.slice/docker-{id}.scope/pids.events",
    f"/sys/fs/cgroup/pids/{_PARENT}/{{id}}/pids.events",
    f"/sys/fs/cgroup/{_PARENT}/{{id}}/pids.events",
)

#: Where the memory controller counts OOM kills (``oom_kill N``), cgroup v1 and v2.
_MEMORY_EVENTS: Final = (
    "/sys/fs/cgroup/memory/docker/{id}/memory.oom_control",
    "/sys/fs/cgroup/docker/{id}/memory.events",
    "/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.events",
    f"/sys/fs/cgroup/memory/{_PARENT}/{{id}}/memory.oom_control",
    f"/sys/fs/cgroup/{_PARENT}/{{id}}/memory.events",
)

#: The cgroup v1 and v2 files of a container's memory use and its page-cache share.
_MEMORY_USAGE: Final = (
    ("/sys/fs/cgroup/memory/docker/{id}/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/docker/{id}/memory.stat", "total_inactive_file"),
    ("/sys/fs/cgroup/docker/{id}/memory.current",
     "/sys/fs/cgroup/docker/{id}/memory.stat", "inactive_file"),
    ("/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.current",
     "/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.stat", "inactive_file"),
    (f"/sys/fs/cgroup/memory/{_PARENT}/{{id}}/memory.usage_in_bytes",
     f"/sys/fs/cgroup/memory/{_PARENT}/{{id}}/memory.stat", "total_inactive_file"),
    (f"/sys/fs/cgroup/{_PARENT}/{{id}}/memory.current",
     f"/sys/fs/cgroup/{_PARENT}/{{id}}/memory.stat", "inactive_file"),
)

#: The pids limit files of the gVisor parent cgroup: cgroup v1, then v2.
_BUDGET_DIRS: Final = (f"/sys/fs/cgroup/pids/{_PARENT}", f"/sys/fs/cgroup/{_PARENT}")


#: The least budget a gateway may set: one gVisor sandbox at rest holds ~40 host tasks.
GVISOR_HOST_TASKS_MIN: Final = 256
_GVISOR_HOST_TASKS_MAX: Final = 16384


def default_gvisor_host_tasks(pid_max_path: str = "/proc/sys/kernel/pid_max") -> int:
    """Half the host's ``pid_max``, at most 16,384: the rest stays for the host itself."""
    try:
        pid_max = int(Path(pid_max_path).read_text(encoding="ascii"))
    except (OSError, ValueError):
        pid_max = 32768
    return max(GVISOR_HOST_TASKS_MIN, min(_GVISOR_HOST_TASKS_MAX, pid_max // 2))


def ensure_task_budget(max_tasks: int) -> Path:
    """
    Create the gVisor parent cgroup if needed and set its pids limit to ``max_tasks``:
    the host tasks (gVisor's sentry threads and stubs) of all gVisor containers
    together, across every process that starts them on this host.

    Returns:
        The ``pids.max`` file written.

    Raises:
        OSError: Neither cgroup v1's pids controller nor cgroup v2 can be written here
            (not root, a read-only cgroupfs, a remote engine's host).
    """
    failure: OSError | None = None
    for directory in map(Path, _BUDGET_DIRS):
        if not directory.parent.is_dir() or (
                directory.parent == Path("/sys/fs/cgroup")
                and not (directory.parent / "cgroup.controllers").exists()):
            continue
        try:
            if directory.parent == Path("/sys/fs/cgroup"):  # v2: pids for the children
                (directory.parent / "cgroup.subtree_control").write_text("+pids")
            directory.mkdir(exist_ok=True)
            limit = directory / "pids.max"
            limit.write_text(str(max_tasks))
        except OSError as exc:
            failure = exc
            continue
        return limit
    raise failure or OSError("no pids cgroup controller on this host")


def tasks_in_budget() -> int | None:
    """The host tasks in the gVisor parent cgroup now (None where it cannot be read)."""
    for directory in map(Path, _BUDGET_DIRS):
        try:
            return int((directory / "pids.current").read_text(encoding="ascii"))
        except (OSError, ValueError):
            continue
    return None


def pids_limit_hit(container_id: str) -> bool:
    """Whether the container's pids controller refused a fork or clone (host-local engines)."""
    return pids_refused(container_id) > 0


def pids_refused(container_id: str) -> int:
    """How many forks or clones the container's pids controller refused (0 if unknown)."""
    return _cgroup_counter(_PIDS_EVENTS, container_id, "max") or 0


def oom_kills(container_id: str) -> int | None:
    """
    How often the kernel's OOM killer ran in the container's memory cgroup.

    None where the cgroup cannot be read (a remote engine, another layout):
    the caller then asks the engine.
    """
    return _cgroup_counter(_MEMORY_EVENTS, container_id, "oom_kill")


def memory_usage(container_id: str) -> tuple[int, int] | None:
    """The cgroup's memory usage (page cache included) and its inactive page cache."""
    if not container_id:
        return None
    for usage_path, stat_path, inactive_key in _MEMORY_USAGE:
        try:
            usage = int(Path(usage_path.format(id=container_id)).read_text(encoding="ascii"))
            stat = Path(stat_path.format(id=container_id)).read_text(encoding="ascii")
        except (OSError, ValueError):
            continue
        inactive = 0
        for line in stat.splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key and value.strip().isdigit():
                inactive = int(value)
        return usage, inactive
    return None


def _cgroup_counter(templates: Sequence[str], container_id: str, counter: str) -> int | None:
    """
    A counter from the first readable ``*.events`` file of the container's cgroup.

    None when no such file can be read or it has no such counter.
    """
    for template in templates:
        try:
            events = Path(template.format(id=container_id)).read_text(encoding="ascii")
        except OSError:
            continue
        for line in events.splitlines():
            name, _, count = line.partition(" ")
            if name == counter and count.strip().isdigit():
                return int(count)
        return None
    return None
