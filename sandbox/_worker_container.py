"""
One model worker's container: the model server, hardened like every sandbox container.

A worker runs ``image/model_server.py`` in the sandbox image with exactly the options
of ``container_options`` (no network, read-only root, every capability dropped,
``no-new-privileges``, the user ``nobody``, finite memory, pids, CPU and open files)
plus three read-only bind mounts, the only host paths it sees:

- the host's site-packages (``torch``, ``transformers``, ...) at ``SITE_IN_CONTAINER``;
- the model's weights directory at ``WEIGHTS_IN_CONTAINER``;
- the server script, and for retrieval the document collection.

Invariants:

- The server loads the model once; each request is one JSON line in and one result
  line out, in the sandbox runner's vocabulary, read by the same ``exchange()`` that
  keeps every sandbox call's deadline and output cap, and turned into an
  ``Execution`` by the same ``interpret()``: the kinds are the usual ones.
- A request that overruns, or a worker that dies (the OOM killer), ends that request
  as ``timeout`` or ``memory_limit`` and the container is removed (``dead``): it is
  never used again.
- A worker that does not report ready within ``load_seconds`` is removed, and the
  call that asked for it ends as the kind its loading ended in (``LoadFailed``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Final, Literal, NoReturn

import docker
import structlog

from callward.core import (
    Execution,
    ResourceLimits,
    Runtime,
    SandboxUnavailable,
    Sha256Hex,
    strict_loads,
)
from callward.sandbox._attach import AttachStream, attach
from callward.sandbox._cgroups import oom_kills, pids_refused
from callward.sandbox._engine import map_docker_errors, remove_container
from callward.sandbox._interpret import DEADLINE_GRACE_SECONDS, interpret
from callward.sandbox._leftovers import own_pid_namespace
from callward.sandbox._limits import container_options
from callward.sandbox._sandbox import exchange
from callward.sandbox.base import RawExecution

log = structlog.get_logger()

SITE_IN_CONTAINER: Final = "/opt/callward/site"
WEIGHTS_IN_CONTAINER: Final = "/opt/callward/weights"
SERVER_IN_CONTAINER: Final = "/opt/callward/model_server.py"
COLLECTION_IN_CONTAINER: Final = "/opt/callward/collection.jsonl"
#: Output a loading server may write (library warnings on stderr) before it is ready.
_LOAD_OUTPUT_BYTES: Final = 1 << 20
_EXIT_WAIT_SECONDS: Final = 10
#: What ends a request and leaves a worker that may hold a half-done request.
_LIMIT_KINDS: Final = ("timeout", "memory_limit", "output_limit", "pids_limit")

Task = Literal["embed", "generate"]


def server_script() -> Path:
    """The in-container model server shipped in this package."""
    return Path(str(resources.files("callward.sandbox") / "image" / "model_server.py"))


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
            limits replace them, see ``ModelWorkers``); its time and output caps
            are the call's.
        collection: For ``embed``: the JSON Lines file of documents, mounted read-only.
        load_seconds: How long loading may take before the worker is given up.
        max_input_tokens: For ``generate``: the longest prompt the server accepts.
        dtype: For ``generate``: ``auto`` (bfloat16 where the CPU has bfloat16
            arithmetic, else float32), ``float32`` or ``bfloat16``.
    """

    name: str
    task: Task
    weights_dir: Path
    digest: Sha256Hex
    limits: ResourceLimits
    collection: Path | None = None
    load_seconds: float = 300.0
    max_input_tokens: int = 2048
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    def __post_init__(self) -> None:
        if self.task not in ("embed", "generate"):
            raise ValueError("a worker's task is embed or generate")
        if (self.task == "embed") != (self.collection is not None):
            raise ValueError("an embed worker, and only one, has a collection")
        if not 0 < self.load_seconds <= 3600:
            raise ValueError("load_seconds must be in (0, 3600]")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError("a worker's dtype is auto, float32 or bfloat16")


class LoadFailed(Exception):
    """A worker did not become ready; carries how the call that asked for it ends."""

    def __init__(self, execution: Execution) -> None:
        super().__init__(execution.message)
        self.execution = execution


class WorkerContainer:
    """
    One worker's container, its attach stream, and what it served; the caller holds
    ``lock`` around ``request`` and ``discard``.

    Args:
        spec: What it runs.
        limits: The limits it is started under (a call's, or the spec's own).
        client: The engine it runs on.
        clock: Monotonic seconds.
    """

    def __init__(self, spec: WorkerSpec, limits: ResourceLimits, client: docker.DockerClient,
                 clock: Callable[[], float]) -> None:
        self.spec = spec
        self.limits = limits
        self.container_id = ""
        self.lock = threading.Lock()
        self.last_used = 0.0
        self.load_ms = 0.0
        self.requests = 0
        self.dead = False
        self.dtype = ""
        self._client = client
        self._clock = clock
        self._stream: AttachStream | None = None

    def start(self, *, image_id: str, runtime: Runtime, site_packages: Path) -> None:
        """
        Create, attach to and start the container and wait for the server's ready line.

        Raises:
            SandboxUnavailable: The engine failed (the container is removed).
            LoadFailed: The server did not become ready (the container is removed).
        """
        spec = self.spec
        client = self._client
        threads = str(max(1, round(self.limits.cpus)))
        command = ["--task", spec.task, "--weights", WEIGHTS_IN_CONTAINER,
                   "--threads", threads, "--max-input-tokens", str(spec.max_input_tokens),
                   "--dtype", spec.dtype]
        volumes = {
            str(site_packages): {"bind": SITE_IN_CONTAINER, "mode": "ro"},
            str(spec.weights_dir.resolve()): {"bind": WEIGHTS_IN_CONTAINER, "mode": "ro"},
            str(server_script().resolve()): {"bind": SERVER_IN_CONTAINER, "mode": "ro"},
        }
        if spec.collection is not None:
            volumes[str(spec.collection.resolve())] = {"bind": COLLECTION_IN_CONTAINER,
                                                       "mode": "ro"}
            command += ["--collection", COLLECTION_IN_CONTAINER]
        base = container_options(self.limits, image=image_id, runtime=runtime,
                                 owner_pid=os.getpid(), owner_pidns=own_pid_namespace())
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
            self.container_id = str(client.containers.create(**options).id)
        try:
            self._stream = attach(client, self.container_id, end_input=False,
                                  what="the model worker container")
            started = self._clock()
            with map_docker_errors("start the model worker container"):
                client.api.start(self.container_id)
            loaded = exchange(self._stream, b"", deadline=started + spec.load_seconds,
                              output_cap=_LOAD_OUTPUT_BYTES, clock=self._clock)
        except BaseException:
            self.discard()
            raise
        self.load_ms = (self._clock() - started) * 1000
        ready = _ready_line(loaded.stdout)
        if ready is None:
            self._load_failed(loaded.stdout, loaded.output_bytes, deadline_hit=loaded.deadline_hit)
        self.last_used = self._clock()
        self.dtype = str((ready or {}).get("dtype", ""))
        log.info("model_worker_loaded", worker=spec.name, digest=spec.digest,
                 container_id=self.container_id[:12], load_ms=round(self.load_ms, 1),
                 dtype=self.dtype, dtype_reason=str((ready or {}).get("dtype_reason", "")))

    def request(self, payload: bytes, limits: ResourceLimits) -> Execution:
        """
        One request (a JSON line) under ``limits``; a worker past a limit or gone is
        removed (``dead``).

        Raises:
            SandboxUnavailable: The engine could not say how a worker that died ended.
        """
        if self._stream is None:
            raise SandboxUnavailable(f"model worker {self.spec.name} was never started")
        container_id = self.container_id
        oom_before = oom_kills(container_id) or 0
        pids_before = pids_refused(container_id)
        started = self._clock()
        exchanged = exchange(
            self._stream, payload + b"\n",
            deadline=started + limits.wall_seconds + DEADLINE_GRACE_SECONDS,
            output_cap=limits.output_bytes, clock=self._clock,
        )
        wall_seconds = self._clock() - started
        self.requests += 1
        self.last_used = self._clock()
        oom_after = oom_kills(container_id)
        pids_hit = pids_refused(container_id) > pids_before
        has_line = b"\n" in exchanged.stdout
        if exchanged.deadline_hit or exchanged.output_cap_hit or not has_line:
            raw = self._ended(exchanged.stdout, exchanged.output_bytes, wall_seconds,
                              deadline_hit=exchanged.deadline_hit
                              or wall_seconds >= limits.wall_seconds,
                              output_cap_hit=exchanged.output_cap_hit,
                              oom_before=oom_before, pids_hit=pids_hit)
        else:
            raw = RawExecution(
                stdout=exchanged.stdout, output_bytes=exchanged.output_bytes,
                wall_seconds=wall_seconds, exit_code=None,
                deadline_hit=wall_seconds >= limits.wall_seconds,
                oom_killed=oom_after is not None and oom_after > oom_before,
                pids_limit_hit=pids_hit, container_id=container_id,
            )
        execution = interpret(raw, limits)
        if execution.kind in _LIMIT_KINDS:
            # A worker past a limit may hold a half-done request: never reuse it.
            self.discard()
        log.info("model_worker_request", worker=self.spec.name, kind=execution.kind,
                 wall_ms=round(wall_seconds * 1000, 3), container_id=container_id[:12])
        return execution

    def discard(self) -> None:
        """Close the attach connection and remove the container; never raises."""
        if self.dead:
            return
        self.dead = True
        if self._stream is not None:
            self._stream.close()
        if self.container_id:
            remove_container(self._client, self.container_id)

    def _load_failed(self, stdout: bytes, output_bytes: int, *, deadline_hit: bool
                     ) -> NoReturn:
        """
        Raises:
            LoadFailed: Always, with how the call that asked for the worker ends.
        """
        spec = self.spec
        raw = self._ended(stdout, output_bytes, self.load_ms / 1000, deadline_hit=deadline_hit)
        load_limits = dataclasses.replace(self.limits, wall_seconds=spec.load_seconds,
                                          output_bytes=_LOAD_OUTPUT_BYTES)
        execution = interpret(raw, load_limits)
        log.warning("model_worker_load_failed", worker=spec.name, kind=execution.kind,
                    container_id=self.container_id[:12])
        raise LoadFailed(_load_failure(execution, spec))

    def _ended(
        self,
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
        try:
            exit_code: int | None = None
            oom_killed = (oom_kills(self.container_id) or 0) > oom_before
            if not (deadline_hit or output_cap_hit):
                with map_docker_errors("wait for the model worker container"):
                    exit_code = int(self._client.api.wait(
                        self.container_id, timeout=_EXIT_WAIT_SECONDS)["StatusCode"])
                    state = self._client.api.inspect_container(self.container_id)["State"]
                oom_killed = oom_killed or bool(state.get("OOMKilled"))
        finally:
            self.discard()
        return RawExecution(
            stdout=stdout, output_bytes=output_bytes, wall_seconds=wall_seconds,
            exit_code=exit_code, deadline_hit=deadline_hit, output_cap_hit=output_cap_hit,
            oom_killed=oom_killed, pids_limit_hit=pids_hit, container_id=self.container_id,
        )


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
    try:
        value = strict_loads(stdout.split(b"\n", 1)[0])
    except ValueError:
        return None
    return value if isinstance(value, dict) and value.get("ready") is True else None
