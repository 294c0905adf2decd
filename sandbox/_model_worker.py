"""
Model workers: one long-lived hardened container per loaded model, kept warm between calls.

A worker runs ``image/model_server.py`` in the sandbox image with exactly the options
of ``container_options`` (no network, read-only root, every capability dropped,
``no-new-privileges``, the user ``nobody``, finite memory, pids, CPU and open files)
plus three read-only bind mounts, the only host paths it sees:

- the host's site-packages (``torch``, ``transformers``, ...) at ``SITE_IN_CONTAINER``;
- the model's weights directory at ``WEIGHTS_IN_CONTAINER``;
- the server script, and for retrieval the document collection.

Invariants:

- The server loads the model once; each request is one JSON line in and one result
  line out, in the sandbox runner's vocabulary, turned into an ``Execution`` by the
  same ``interpret()`` as every other call: the kinds are the usual ones.
- Each request has its own deadline (``wall_seconds``) and output cap; a request that
  overruns, or a worker that dies (the OOM killer), ends that request as ``timeout``
  or ``memory_limit`` and the container is removed: the next request starts a fresh one.
- A worker runs under the memory, pids, CPU, /tmp and open-files limits of the call
  that started it; a call under other limits gets a worker started under its own.
- The sum of the memory limits of loaded workers stays within the budget: before a
  worker starts, idle workers are stopped, least recently used first; a worker in the
  middle of a request is never stopped for another.
- Every container carries the ``callward`` labels and is removed by ``unload``,
  ``close`` or ``remove_leftovers``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Final, Literal, NoReturn

import docker
import structlog

from callward.core import (
    Execution,
    ResourceLimits,
    SandboxUnavailable,
    Sha256Hex,
    canonical_bytes,
)
from callward.core._canonical import JSONValue
from callward.sandbox._docker import (
    _ATTACH_PARAMS,
    _close,
    _Demultiplexer,
    _exchange,
    _oom_kills,
    _pids_refused,
    _remove,
    _socket_of,
    own_pid_namespace,
)
from callward.sandbox._engine import ClientFactory, client_from_env, map_docker_errors
from callward.sandbox._image import find_image
from callward.sandbox._limits import Runtime, container_options
from callward.sandbox.base import DEADLINE_GRACE_SECONDS, RawExecution, interpret

log = structlog.get_logger()

SITE_IN_CONTAINER: Final = "/opt/callward/site"
WEIGHTS_IN_CONTAINER: Final = "/opt/callward/weights"
SERVER_IN_CONTAINER: Final = "/opt/callward/model_server.py"
COLLECTION_IN_CONTAINER: Final = "/opt/callward/collection.jsonl"
#: Output a loading server may write (library warnings on stderr) before it is ready.
_LOAD_OUTPUT_BYTES: Final = 1 << 20
_EXIT_WAIT_SECONDS: Final = 10
_KEEP_BYTES: Final = 1 << 30
#: The cgroup v1 and v2 files of a container's memory use and its page-cache share.
_MEMORY_USAGE: Final = (
    ("/sys/fs/cgroup/memory/docker/{id}/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/docker/{id}/memory.stat", "total_inactive_file"),
    ("/sys/fs/cgroup/docker/{id}/memory.current",
     "/sys/fs/cgroup/docker/{id}/memory.stat", "inactive_file"),
    ("/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.current",
     "/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.stat", "inactive_file"),
)

Task = Literal["embed", "generate"]


def server_script() -> Path:
    """The in-container model server shipped in this package."""
    return Path(str(resources.files("callward.sandbox") / "image" / "model_server.py"))


def server_sha256() -> Sha256Hex:
    """The SHA-256 of the model server's source, part of every worker's digest."""
    return Sha256Hex(hashlib.sha256(server_script().read_bytes()).hexdigest())


def host_site_packages() -> Path:
    """The site-packages that holds this interpreter's ``torch`` (mounted read-only)."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise SandboxUnavailable(
            "torch is not installed here, so no model worker can run",
            remediation="install callward with its model extra (scripts/setup-venv.sh)",
        )
    return Path(spec.origin).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """
    What one model worker runs.

    Attributes:
        name: The worker's name, how ``load``/``unload`` refer to it.
        task: ``embed`` (retrieval over ``collection``) or ``generate`` (a causal LM).
        weights_dir: The model directory (safetensors), mounted read-only.
        digest: SHA-256 over the weights, the server and the collection: what runs.
        limits: The container's memory, pids, CPU, /tmp and open files (a call's own
            limits replace them, see the module docstring); its time and output caps
            are the call's.
        collection: For ``embed``: the JSON Lines file of documents, mounted read-only.
        load_seconds: How long loading may take before the worker is given up.
        max_input_tokens: For ``generate``: the longest prompt the server accepts.
    """

    name: str
    task: Task
    weights_dir: Path
    digest: Sha256Hex
    limits: ResourceLimits
    collection: Path | None = None
    load_seconds: float = 300.0
    max_input_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.task not in ("embed", "generate"):
            raise ValueError("a worker's task is embed or generate")
        if (self.task == "embed") != (self.collection is not None):
            raise ValueError("an embed worker, and only one, has a collection")
        if not 0 < self.load_seconds <= 3600:
            raise ValueError("load_seconds must be in (0, 3600]")


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


class _Worker:
    """One started container running the model server, its attach socket and demultiplexer."""

    def __init__(self, spec: WorkerSpec, limits: ResourceLimits) -> None:
        self.spec = spec
        self.limits = limits
        self.container_id = ""
        self.attached: object = None
        # Each exchange stops at its own call's output cap; this only bounds what is kept.
        self.demux = _Demultiplexer(_KEEP_BYTES)
        self.lock = threading.Lock()
        self.last_used = 0.0
        self.load_ms = 0.0
        self.requests = 0
        self.dead = False


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
        self._workers: dict[str, _Worker] = {}

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
            usage = _memory_usage(worker.container_id) or self._stats_usage(worker.container_id)
            held = None if usage is None else max(0, usage[0] - usage[1])
            self._discard(worker)
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
            except _LoadFailed as failed:
                return failed.execution
            with worker.lock:
                # Unloaded or evicted between _ready and here: start it once more.
                if not worker.dead:
                    return self._send(worker, payload, limits)
        raise SandboxUnavailable(f"model worker {name} was stopped while a call waited for it")

    def close(self) -> None:
        """Stop every worker and close the engine connection; usable again after."""
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for worker in workers:
            with worker.lock:
                self._discard(worker)
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

    def _describe(self, worker: _Worker) -> LoadedWorker:
        usage = _memory_usage(worker.container_id) or self._stats_usage(worker.container_id)
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

    def _ready(self, name: str, limits: ResourceLimits) -> _Worker:
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
        worker = _Worker(spec, limits)
        self._start(worker)
        with self._lock:
            raced = self._workers.get(name)
            if raced is not None and not raced.dead:
                keep, drop = raced, worker
            else:
                self._workers[name] = worker
                keep, drop = worker, None
        if drop is not None:
            self._discard(drop)
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

    def _start(self, worker: _Worker) -> None:
        """
        Create, attach to and start the worker's container and wait for its ready line.

        Raises:
            SandboxUnavailable: The engine failed.
            _LoadFailed: The server did not become ready (the container is removed).
        """
        spec = worker.spec
        client = self._docker()
        site = self._site_packages or host_site_packages()
        command = ["--task", spec.task, "--weights", WEIGHTS_IN_CONTAINER,
                   "--threads", str(max(1, round(worker.limits.cpus))),
                   "--max-input-tokens", str(spec.max_input_tokens)]
        volumes = {
            str(site): {"bind": SITE_IN_CONTAINER, "mode": "ro"},
            str(spec.weights_dir.resolve()): {"bind": WEIGHTS_IN_CONTAINER, "mode": "ro"},
            str(server_script().resolve()): {"bind": SERVER_IN_CONTAINER, "mode": "ro"},
        }
        if spec.collection is not None:
            volumes[str(spec.collection.resolve())] = {"bind": COLLECTION_IN_CONTAINER,
                                                       "mode": "ro"}
            command += ["--collection", COLLECTION_IN_CONTAINER]
        base = container_options(worker.limits, image=self._image(), runtime=self._runtime,
                                 owner_pid=os.getpid(), owner_pidns=own_pid_namespace())
        threads = str(max(1, round(worker.limits.cpus)))
        # The hardened options, with the server in place of the runner and read-only binds.
        options: dict[str, object] = {
            **base,
            "entrypoint": ["/usr/bin/python3", "-S", "-B", SERVER_IN_CONTAINER],
            "command": command,
            "volumes": volumes,
            "environment": {
                **base["environment"], "PYTHONPATH": SITE_IN_CONTAINER,
                "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "LANG": "C.UTF-8",
            },
            "labels": {**base["labels"], "callward.model_worker": spec.name},
        }
        with map_docker_errors("create the model worker container"):
            worker.container_id = str(client.containers.create(**options).id)
        try:
            with map_docker_errors("attach to the model worker container"):
                worker.attached = client.api.attach_socket(worker.container_id,
                                                           params=dict(_ATTACH_PARAMS))
            _socket_of(worker.attached)  # refuses a stream that is not a socket
            started = self._clock()
            with map_docker_errors("start the model worker container"):
                client.api.start(worker.container_id)
            exchange = _exchange(
                _socket_of(worker.attached), b"", deadline=started + spec.load_seconds,
                output_cap=_LOAD_OUTPUT_BYTES, clock=self._clock, demux=worker.demux,
                half_close=False,
            )
        except BaseException:
            self._discard(worker)
            raise
        worker.load_ms = (self._clock() - started) * 1000
        if _ready_line(exchange.stdout) is None:
            self._load_failed(worker, exchange.stdout, exchange.output_bytes,
                              deadline_hit=exchange.deadline_hit)
        worker.last_used = self._clock()
        log.info("model_worker_loaded", worker=spec.name, digest=spec.digest,
                 container_id=worker.container_id[:12], load_ms=round(worker.load_ms, 1))

    def _load_failed(
        self, worker: _Worker, stdout: bytes, output_bytes: int, *, deadline_hit: bool
    ) -> NoReturn:
        """
        Raises:
            _LoadFailed: Always, with how the call that asked for the worker ends.
        """
        spec = worker.spec
        try:
            raw = self._ended(worker, stdout, output_bytes, worker.load_ms / 1000,
                              deadline_hit=deadline_hit)
        finally:
            self._discard(worker)
        load_limits = dataclasses.replace(worker.limits, wall_seconds=spec.load_seconds,
                                          output_bytes=_LOAD_OUTPUT_BYTES)
        execution = interpret(raw, load_limits)
        log.warning("model_worker_load_failed", worker=spec.name, kind=execution.kind,
                    container_id=worker.container_id[:12])
        raise _LoadFailed(_load_failure(execution, spec))

    def _send(self, worker: _Worker, payload: bytes, limits: ResourceLimits) -> Execution:
        """One request on a worker whose lock the caller holds."""
        container_id = worker.container_id
        oom_before = _oom_kills(container_id) or 0
        pids_before = _pids_refused(container_id)
        worker.demux.start_over()
        started = self._clock()
        exchange = _exchange(
            _socket_of(worker.attached), payload + b"\n",
            deadline=started + limits.wall_seconds + DEADLINE_GRACE_SECONDS,
            output_cap=limits.output_bytes, clock=self._clock, demux=worker.demux,
            half_close=False,
        )
        wall_seconds = self._clock() - started
        worker.requests += 1
        worker.last_used = self._clock()
        oom_after = _oom_kills(container_id)
        pids_hit = _pids_refused(container_id) > pids_before
        has_line = b"\n" in exchange.stdout
        if exchange.deadline_hit or exchange.output_cap_hit or not has_line:
            raw = self._ended(worker, exchange.stdout, exchange.output_bytes, wall_seconds,
                              deadline_hit=exchange.deadline_hit or
                              wall_seconds >= limits.wall_seconds,
                              output_cap_hit=exchange.output_cap_hit,
                              oom_before=oom_before, pids_hit=pids_hit)
        else:
            raw = RawExecution(
                stdout=exchange.stdout, output_bytes=exchange.output_bytes,
                wall_seconds=wall_seconds, exit_code=None,
                deadline_hit=wall_seconds >= limits.wall_seconds,
                oom_killed=oom_after is not None and oom_after > oom_before,
                pids_limit_hit=pids_hit, container_id=container_id,
            )
        execution = interpret(raw, limits)
        if execution.kind in ("timeout", "memory_limit", "output_limit", "pids_limit") \
                and not worker.dead:
            # A worker past a limit may hold a half-done request: never reuse it.
            self._retire(worker)
        log.info("model_worker_request", worker=worker.spec.name, kind=execution.kind,
                 wall_ms=round(wall_seconds * 1000, 3), container_id=container_id[:12])
        return execution

    def _ended(
        self,
        worker: _Worker,
        stdout: bytes,
        output_bytes: int,
        wall_seconds: float,
        *,
        deadline_hit: bool = False,
        output_cap_hit: bool = False,
        oom_before: int = 0,
        pids_hit: bool = False,
    ) -> RawExecution:
        """What a worker that overran or died observed; its container is removed."""
        exit_code: int | None = None
        oom_killed = (_oom_kills(worker.container_id) or 0) > oom_before
        if not (deadline_hit or output_cap_hit):
            client = self._docker()
            with map_docker_errors("wait for the model worker container"):
                exit_code = int(client.api.wait(worker.container_id,
                                                timeout=_EXIT_WAIT_SECONDS)["StatusCode"])
                state = client.api.inspect_container(worker.container_id)["State"]
            oom_killed = oom_killed or bool(state.get("OOMKilled"))
        raw = RawExecution(
            stdout=stdout, output_bytes=output_bytes, wall_seconds=wall_seconds,
            exit_code=exit_code, deadline_hit=deadline_hit, output_cap_hit=output_cap_hit,
            oom_killed=oom_killed, pids_limit_hit=pids_hit, container_id=worker.container_id,
        )
        self._retire(worker)
        return raw

    def _retire(self, worker: _Worker) -> None:
        with self._lock:
            if self._workers.get(worker.spec.name) is worker:
                del self._workers[worker.spec.name]
        self._discard(worker)

    def _discard(self, worker: _Worker) -> None:
        """Close the attach connection and remove the container; never raises."""
        if worker.dead:
            return
        worker.dead = True
        if worker.attached is not None:
            _close(worker.attached, _socket_of(worker.attached))
        if worker.container_id:
            _remove(self._docker(), worker.container_id)


class _LoadFailed(Exception):
    """A worker did not become ready; carries how the call that asked for it ends."""

    def __init__(self, execution: Execution) -> None:
        super().__init__(execution.message)
        self.execution = execution


def _load_failure(execution: Execution, spec: WorkerSpec) -> Execution:
    """The loading outcome, said as the model's failure to load."""
    if execution.kind == "timeout":
        message = f"model {spec.name} did not load within {spec.load_seconds} s"
    elif execution.kind == "ok":
        return Execution("tool_error", None, f"model {spec.name} did not report ready",
                         execution.usage)
    else:
        message = f"model {spec.name} did not load: {execution.message}"
    return Execution(execution.kind, None, message[:500], execution.usage)


def _ready_line(stdout: bytes) -> dict[str, object] | None:
    from callward.core import strict_loads  # noqa: PLC0415

    try:
        value = strict_loads(stdout.split(b"\n", 1)[0])
    except ValueError:
        return None
    return value if isinstance(value, dict) and value.get("ready") is True else None


def _memory_usage(container_id: str) -> tuple[int, int] | None:
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
