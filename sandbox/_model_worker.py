"""
Model workers: one long-lived hardened container per loaded model, kept warm between calls.

Each worker is a ``WorkerContainer`` (``_worker_container.py``: the model server in the
sandbox image, hardened like every sandbox container, with read-only mounts of the
host's site-packages, the weights and the server). This module decides which workers
run.

Invariants:

- A request goes to a running worker of its name under the container part of its
  limits (memory, pids, CPU, /tmp and open files); a call under other limits gets a
  worker started under its own. Each request has its own deadline and output cap.
- A worker that overran, died or did not load is removed, and forgotten: the next
  request starts a fresh one.
- The sum of the memory limits of loaded workers stays within the budget: before a
  worker starts, idle workers are stopped, least recently used first; a worker in the
  middle of a request is never stopped for another.
- Every container carries the ``callward`` labels and is removed by ``unload``,
  ``close`` or ``remove_leftovers``.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import docker
import structlog

from callward.core import (
    Execution,
    ResourceLimits,
    Runtime,
    SandboxUnavailable,
    Sha256Hex,
    canonical_bytes,
)
from callward.core._canonical import JSONValue
from callward.sandbox._cgroups import memory_usage
from callward.sandbox._engine import ClientFactory, client_from_env, map_docker_errors
from callward.sandbox._image import find_image
from callward.sandbox._worker_container import (
    LoadFailed,
    WorkerContainer,
    WorkerSpec,
    host_site_packages,
    server_script,
)

log = structlog.get_logger()


def server_sha256() -> Sha256Hex:
    """The SHA-256 of the model server's source, part of every worker's digest."""
    return Sha256Hex(hashlib.sha256(server_script().read_bytes()).hexdigest())


@dataclass(frozen=True, slots=True)
class LoadedWorker:
    """
    One running worker, as ``ModelWorkers.loaded()`` reports it.

    Attributes:
        memory_bytes: What its cgroup holds, less the inactive page cache (as
            ``docker stats`` counts it); None where the cgroup cannot be read.
        memory_with_cache_bytes: The same with all page cache. The kernel charges a
            cached page to the cgroup that first read it, so weights already in the
            host's page cache (read by an earlier worker) are not counted here.
    """

    name: str
    digest: Sha256Hex
    container_id: str
    memory_limit_bytes: int
    memory_bytes: int | None
    memory_with_cache_bytes: int | None
    load_ms: float
    requests: int
    idle_seconds: float

    def to_json(self) -> dict[str, JSONValue]:
        return {
            "name": self.name, "digest": self.digest, "container_id": self.container_id[:12],
            "memory_limit_bytes": self.memory_limit_bytes, "memory_bytes": self.memory_bytes,
            "memory_with_cache_bytes": self.memory_with_cache_bytes,
            "load_ms": round(self.load_ms, 3), "requests": self.requests,
            "idle_seconds": round(self.idle_seconds, 3),
        }


def _container_limits(limits: ResourceLimits) -> tuple[int, int, float, int, int]:
    """The part of the limits a container is created with (time and output are per request)."""
    return (limits.memory_bytes, limits.pids, limits.cpus, limits.tmp_bytes, limits.open_files)


class ModelWorkers:
    """
    The model workers of one gateway: started on demand, kept warm, stopped by LRU or ``unload``.

    Args:
        specs: The workers that may be loaded, by name.
        memory_budget_bytes: The most the memory limits of loaded workers may add up to.
        runtime: ``runc``, or ``runsc`` (gVisor).
        image_id: The image to run (the sandbox image by default, found on first use).
        site_packages: The host directory holding ``torch`` and ``transformers``.
        clock: Monotonic seconds, injected for tests.

    Constructing it does no I/O; the engine is reached on the first ``load``.
    """

    def __init__(
        self,
        specs: Mapping[str, WorkerSpec],
        *,
        memory_budget_bytes: int,
        runtime: Runtime = "runc",
        image_id: str | None = None,
        site_packages: Path | None = None,
        client_factory: ClientFactory = client_from_env,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, spec in specs.items():
            if name != spec.name:
                raise ValueError(f"worker {spec.name} is registered as {name}")
            if spec.limits.memory_bytes > memory_budget_bytes:
                raise ValueError(
                    f"worker {name} needs {spec.limits.memory_bytes} bytes, "
                    f"more than the whole budget of {memory_budget_bytes}")
        self._specs = dict(specs)
        self._budget = memory_budget_bytes
        self._runtime: Runtime = runtime
        self._image_id = image_id
        self._site_packages = site_packages
        self._client_factory = client_factory
        self._clock = clock
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()
        self._workers: dict[str, WorkerContainer] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._specs))

    @property
    def memory_budget_bytes(self) -> int:
        return self._budget

    def spec(self, name: str) -> WorkerSpec:
        """
        Raises:
            KeyError: No worker of that name is configured.
        """
        return self._specs[name]

    def load(self, name: str, limits: ResourceLimits | None = None) -> LoadedWorker:
        """
        Start the worker ``name`` (under ``limits``, else its own) unless it runs already.

        Raises:
            KeyError: No worker of that name is configured.
            SandboxUnavailable: The engine failed, the budget cannot be met, or the
                model did not load (its container is removed).
        """
        worker = self._ready(name, limits or self._specs[name].limits)
        return self._describe(worker)

    def unload(self, name: str) -> int | None:
        """
        Stop the worker ``name`` and remove its container; nothing if it is not loaded.

        Returns:
            The memory it held just before (bytes, from its cgroup), None if unknown
            or not loaded.
        """
        with self._lock:
            worker = self._workers.pop(name, None)
        if worker is None:
            return None
        with worker.lock:  # a request in flight finishes first
            usage = memory_usage(worker.container_id) or self._stats_usage(worker.container_id)
            held = None if usage is None else max(0, usage[0] - usage[1])
            worker.discard()
        log.info("model_worker_unloaded", worker=name, memory_bytes=held)
        return held

    def loaded(self) -> tuple[LoadedWorker, ...]:
        """The running workers with the memory each holds now, by name."""
        with self._lock:
            workers = sorted(self._workers.values(), key=lambda w: w.spec.name)
        return tuple(self._describe(worker) for worker in workers)

    def request(
        self, name: str, op: str, arguments: Mapping[str, JSONValue], limits: ResourceLimits
    ) -> Execution:
        """
        One request to the worker ``name`` under ``limits``, loading it first if needed.

        Returns an ``Execution`` for every way the request can end; a worker that
        overran or died is removed, and the next request starts a fresh one.

        Raises:
            KeyError: No worker of that name is configured.
            SandboxUnavailable: The engine failed or the budget cannot be met.
        """
        payload = canonical_bytes({"op": op, "arguments": dict(arguments)})
        for _attempt in range(2):
            try:
                worker = self._ready(name, limits)
            except LoadFailed as failed:
                return failed.execution
            with worker.lock:
                # Unloaded or evicted between _ready and here: start it once more.
                if not worker.dead:
                    try:
                        return worker.request(payload, limits)
                    finally:
                        if worker.dead:
                            self._forget(worker)
        raise SandboxUnavailable(f"model worker {name} was stopped while a call waited for it")

    def close(self) -> None:
        """Stop every worker and close the engine connection; usable again after."""
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for worker in workers:
            with worker.lock:
                worker.discard()
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with map_docker_errors("close the Docker client"):
                client.close()

    def __enter__(self) -> ModelWorkers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def _docker(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                self._client = self._client_factory()
            return self._client

    def _describe(self, worker: WorkerContainer) -> LoadedWorker:
        usage = memory_usage(worker.container_id) or self._stats_usage(worker.container_id)
        return LoadedWorker(
            name=worker.spec.name, digest=worker.spec.digest,
            container_id=worker.container_id, memory_limit_bytes=worker.limits.memory_bytes,
            memory_bytes=None if usage is None else max(0, usage[0] - usage[1]),
            memory_with_cache_bytes=None if usage is None else usage[0], load_ms=worker.load_ms,
            requests=worker.requests, idle_seconds=max(0.0, self._clock() - worker.last_used),
        )

    def _stats_usage(self, container_id: str) -> tuple[int, int] | None:
        """The engine's stats (one sample) where the cgroup files cannot be read here."""
        if not container_id:
            return None
        try:
            with map_docker_errors("read the model worker's memory"):
                stats = self._docker().api.stats(container_id, stream=False, one_shot=True)
        except SandboxUnavailable:
            return None
        memory = stats.get("memory_stats") or {}
        detail = memory.get("stats") or {}
        if not isinstance(memory.get("usage"), int):
            return None
        inactive = detail.get("total_inactive_file", detail.get("inactive_file", 0))
        return int(memory["usage"]), int(inactive) if isinstance(inactive, int) else 0

    def _ready(self, name: str, limits: ResourceLimits) -> WorkerContainer:
        """The running worker for ``name`` under ``limits``' container part, started if need be."""
        spec = self._specs[name]
        wanted = _container_limits(limits)
        with self._lock:
            current = self._workers.get(name)
            if current is not None and not current.dead and \
                    _container_limits(current.limits) == wanted:
                current.last_used = self._clock()
                return current
        if current is not None:
            self.unload(name)
        evicted = self._make_room(name, limits.memory_bytes)
        for other in evicted:
            log.info("model_worker_evicted", worker=other, for_worker=name)
        client = self._docker()
        site_packages = self._site_packages or host_site_packages()
        worker = WorkerContainer(spec, limits, client, self._clock)
        worker.start(image_id=self._image(), runtime=self._runtime, site_packages=site_packages)
        with self._lock:
            raced = self._workers.get(name)
            if raced is not None and not raced.dead:
                keep, drop = raced, worker
            else:
                self._workers[name] = worker
                keep, drop = worker, None
        if drop is not None:
            drop.discard()
        return keep

    def _make_room(self, name: str, memory_bytes: int) -> list[str]:
        """Stop idle workers, least recently used first, until ``memory_bytes`` fits the budget."""
        if memory_bytes > self._budget:
            raise SandboxUnavailable(
                f"model worker {name} needs {memory_bytes} bytes, more than the budget "
                f"of {self._budget}", remediation="raise models_as_tools.memory_budget_mebibytes")
        evicted: list[str] = []
        while True:
            with self._lock:
                others = [w for n, w in self._workers.items() if n != name]
                used = sum(w.limits.memory_bytes for w in others)
                if used + memory_bytes <= self._budget:
                    return evicted
                idle = sorted((w for w in others if not w.lock.locked()),
                              key=lambda w: w.last_used)
                if not idle:
                    raise SandboxUnavailable(
                        f"model worker {name} does not fit the memory budget while every "
                        "other worker is busy", remediation="retry, or raise the budget")
                victim = idle[0].spec.name
            self.unload(victim)
            evicted.append(victim)

    def _image(self) -> str:
        if self._image_id is None:
            image = find_image(self._docker()).image_id
            with self._lock:
                self._image_id = image
        return self._image_id

    def _forget(self, worker: WorkerContainer) -> None:
        """Drop a worker that is gone from the running set, if it is still the one there."""
        with self._lock:
            if self._workers.get(worker.spec.name) is worker:
                del self._workers[worker.spec.name]
