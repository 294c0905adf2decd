"""
Sweeping what a dead process left on the engine: its containers and egress networks.

Every container and egress network callward creates carries the ``callward`` label,
the owning process's pid and that pid's namespace. A killed process cannot remove
them itself; the next start does (``remove_leftovers``).

Invariants:

- Only what is owned in this PID namespace is judged: a pid from another namespace
  sharing the engine (another container, another host) says nothing here, so that is
  left alone.
- What this very process owns counts as left over: sweep at start, before this
  process runs anything.
- One that vanished meanwhile (removed by someone else) is no error.
"""

from __future__ import annotations

import functools
import os

import docker
import docker.errors
import structlog

from callward.core import SandboxUnavailable
from callward.sandbox._egress import NETWORK_LABEL
from callward.sandbox._engine import map_docker_errors
from callward.sandbox._limits import OWNER_LABEL, OWNER_PID_LABEL, OWNER_PIDNS_LABEL

log = structlog.get_logger()


def remove_leftovers(client: docker.DockerClient) -> tuple[str, ...]:
    """
    Remove containers labelled ``callward`` whose owning process is gone (or is this
    one), then such egress networks.

    Returns:
        The ids of the containers removed.

    Raises:
        SandboxUnavailable: The engine could not be reached.
    """
    with map_docker_errors("list sandbox containers"):
        # The low-level list: one request, and no inspect that a removal could race.
        containers = client.api.containers(all=True, filters={"label": OWNER_LABEL})
    removed: list[str] = []
    for container in containers:
        if not is_leftover(container.get("Labels") or {}):
            continue
        container_id = str(container["Id"])
        with map_docker_errors("remove a leftover sandbox container"):
            try:
                client.api.remove_container(container_id, force=True, v=True)
            except docker.errors.NotFound:
                continue  # removed meanwhile by someone else
        removed.append(container_id)
    removed_networks = _remove_leftover_networks(client)
    log.info("sandbox_leftovers_removed", count=len(removed), networks=removed_networks)
    return tuple(removed)


def _remove_leftover_networks(client: docker.DockerClient) -> int:
    """
    Remove egress networks whose owning process is gone; how many were removed.

    Their firewall rules name a bridge that no longer exists and match nothing.
    """
    with map_docker_errors("list egress networks"):
        networks = client.api.networks(filters={"label": NETWORK_LABEL})
    removed = 0
    for network in networks:
        if not is_leftover(network.get("Labels") or {}):
            continue
        try:
            with map_docker_errors("remove a leftover egress network"):
                client.api.remove_network(str(network["Id"]))
        except SandboxUnavailable:  # gone meanwhile, or still in use: the next sweep retries
            log.warning("egress_network_not_removed", network=str(network.get("Name", "")))
            continue
        removed += 1
    return removed


@functools.cache
def own_pid_namespace() -> str:
    """This process's PID namespace, as ``pid:[inode]``; empty where it cannot be read."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def is_leftover(labels: dict[str, str]) -> bool:
    """
    Whether a callward container's owner is gone (or is this very process).

    A container owned in another PID namespace is never a leftover here: its pid
    names some process over there, alive or not.
    """
    pidns = labels.get(OWNER_PIDNS_LABEL, "")
    if pidns and pidns != own_pid_namespace():
        return False
    return not _owner_alive(labels.get(OWNER_PID_LABEL, ""))


def _owner_alive(pid_label: str) -> bool:
    """Whether the process named by a ``callward.pid`` label still runs (and is not this one)."""
    if not pid_label.isdigit():
        return False
    pid = int(pid_label)
    if pid in (0, os.getpid()):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True
