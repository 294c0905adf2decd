"""
The runner the gateway holds when models are tools: model tools to their warm
worker, every other tool to the usual single-use sandbox.

Invariants:

- A call is sent to a model worker only when its tool's name AND digest are the
  ones the worker was configured for; any other spec of that name (another
  version, a changed schema) goes nowhere: ``SandboxUnavailable``, audited by the
  gateway like any infrastructure failure.
- A model worker keeps only the weights between calls: each request is stateless,
  so it serves every principal and session. A policy that asks for another
  runtime than the workers' is refused, never silently ignored.
- A worker is stopped (``tools_removed``) once no tool routed to it is still known
  to the registry with the digest it was configured for; it starts again on demand.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from callward.core import (
    Execution,
    Placement,
    ResourceLimits,
    Runtime,
    SandboxUnavailable,
    Sha256Hex,
    ToolCall,
    ToolSpec,
)
from callward.core._canonical import JSONValue
from callward.core.protocols import ToolRunner, run_as_placed
from callward.sandbox._cgroups import memory_usage
from callward.sandbox._engine import ClientFactory, client_from_env, map_docker_errors
from callward.sandbox._limits import OWNER_LABEL, OWNER_PID_LABEL
from callward.sandbox._model_worker import ModelWorkers

WORKER_LABEL = "callward.model_worker"

log = structlog.get_logger()


class ModelToolRunner:
    """
    A ``PlacingToolRunner``: routes model tools to ``workers``, the rest to ``fallback``.

    Args:
        workers: The model workers.
        routes: Tool name to (worker name, the tool's digest).
        fallback: The runner of every other tool (a ``DockerSandbox``).
    """

    def __init__(
        self,
        workers: ModelWorkers,
        routes: Mapping[str, tuple[str, Sha256Hex]],
        fallback: ToolRunner,
        *,
        runtime: Runtime = "runc",
    ) -> None:
        for tool, (worker, _digest) in routes.items():
            if worker not in workers.names:
                raise ValueError(f"model tool {tool} is routed to unknown worker {worker}")
        self.workers = workers
        self._routes = dict(routes)
        self._fallback = fallback
        self._runtime: Runtime = runtime

    @property
    def image_digest(self) -> Sha256Hex:
        return self._fallback.image_digest

    def run(self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
        """
        Raises:
            SandboxUnavailable: The worker or the sandbox could not run the tool at all.
        """
        if spec.name not in self._routes:
            return self._fallback.run(spec, call, limits)
        worker, digest = self._routes[spec.name]
        if spec.digest != digest:
            raise SandboxUnavailable(
                f"{spec.ref} is not the model tool its worker serves (digest differs)")
        return self.workers.request(worker, spec.name, call.arguments, limits)

    def run_placed(
        self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits, placement: Placement
    ) -> Execution:
        """
        Other tools run on the fallback as placed (``run_as_placed``); a model tool runs
        in its worker, which serves every principal and session alike.

        Raises:
            SandboxUnavailable: As ``run``; or the policy asks a model tool to run on a
                runtime its workers do not use, or grants it secrets or egress.
        """
        if spec.name not in self._routes:
            return run_as_placed(self._fallback, spec, call, limits, placement)
        if placement.secrets or placement.egress:
            raise SandboxUnavailable(f"model tool {spec.name} runs in a worker without "
                                     "secrets or network; the policy grants it some")
        if placement.runtime is not None and placement.runtime != self._runtime:
            raise SandboxUnavailable(
                f"the policy runs {spec.name} on {placement.runtime}; its model worker runs "
                f"on {self._runtime}")
        return self.run(spec, call, limits)

    def tools_removed(self, removed: tuple[ToolSpec, ...],
                      known: Callable[[str, Sha256Hex], bool]) -> tuple[str, ...]:
        """
        Stop the workers that serve only tools the registry no longer knows (a registry
        ``on_change`` listener: ``removed`` are the versions a refresh took away).

        Args:
            removed: The versions removed.
            known: Whether the registry still knows a tool name with that digest.

        Returns:
            The names of the workers stopped (each starts again on its next request).
        """
        candidates = {self._routes[spec.name][0] for spec in removed
                      if spec.name in self._routes
                      and self._routes[spec.name][1] == spec.digest}
        stopped = []
        for worker in sorted(candidates):
            if any(name == worker and known(tool, digest)
                   for tool, (name, digest) in self._routes.items()):
                continue  # e.g. summarize is gone but sentiment still uses the generator
            freed = self.workers.unload(worker)
            log.info("model_worker_retired", worker=worker, freed_bytes=freed,
                     tools=[spec.ref for spec in removed])
            stopped.append(worker)
        return tuple(stopped)

    def close(self) -> None:
        """Stop every model worker, then close the fallback runner."""
        self.workers.close()
        close = getattr(self._fallback, "close", None)
        if callable(close):
            close()

    def remove_leftovers(self) -> tuple[str, ...]:
        """The fallback's sweep of containers a dead process left (workers are labelled alike)."""
        remove = getattr(self._fallback, "remove_leftovers", None)
        return tuple(remove()) if callable(remove) else ()


@dataclass(frozen=True, slots=True)
class WorkerContainer:
    """A model worker container as the engine reports it (any process's, on this engine)."""

    worker: str
    container_id: str
    owner_pid: str
    state: str
    memory_bytes: int | None
    memory_limit_bytes: int

    def to_json(self) -> dict[str, JSONValue]:
        return {"worker": self.worker, "container_id": self.container_id,
                "owner_pid": self.owner_pid, "state": self.state,
                "memory_bytes": self.memory_bytes, "memory_limit_bytes": self.memory_limit_bytes}


def worker_containers(client_factory: ClientFactory = client_from_env
                      ) -> tuple[WorkerContainer, ...]:
    """
    The model worker containers on the engine (labelled ``callward.model_worker``), with
    the memory each holds (cgroup usage less inactive page cache, as ``ModelWorkers.loaded``
    reports it; from the engine's stats where the cgroup files are not readable here).

    Raises:
        SandboxUnavailable: The engine cannot be reached.
    """
    client = client_factory()
    try:
        with map_docker_errors("list the model worker containers"):
            found = client.api.containers(all=True, filters={"label": [OWNER_LABEL,
                                                                       WORKER_LABEL]})
        result = []
        for container in found:
            container_id = str(container["Id"])
            labels = container.get("Labels") or {}
            with map_docker_errors("inspect a model worker container"):
                host = client.api.inspect_container(container_id)["HostConfig"]
            usage = memory_usage(container_id) if container.get("State") == "running" else None
            if usage is None and container.get("State") == "running":
                with map_docker_errors("read a model worker's memory"):
                    stats = client.api.stats(container_id, stream=False, one_shot=True)
                memory = stats.get("memory_stats") or {}
                detail = memory.get("stats") or {}
                inactive = detail.get("total_inactive_file", detail.get("inactive_file", 0))
                if isinstance(memory.get("usage"), int):
                    usage = (int(memory["usage"]), int(inactive) if isinstance(inactive, int)
                             else 0)
            result.append(WorkerContainer(
                worker=str(labels.get(WORKER_LABEL, "")), container_id=container_id,
                owner_pid=str(labels.get(OWNER_PID_LABEL, "")),
                state=str(container.get("State", "")),
                memory_bytes=None if usage is None else max(0, usage[0] - usage[1]),
                memory_limit_bytes=int(host.get("Memory") or 0)))
    finally:
        client.close()
    return tuple(sorted(result, key=lambda w: (w.worker, w.container_id)))
