"""
Runs each tool call in its own hardened, single-use container.

Containers are started ahead of demand (a warm pool per limits profile, see
``PoolConfig``), each used for one call and then removed; an empty pool means
a cold start, never less isolation.

``Sandbox`` is the public class: it places each call where its ``Placement`` says
(isolation, runtime, secrets, egress) and keeps the wall clock and the output cap
itself, around a small ``SandboxBackend`` protocol, one module per engine.
``DockerSandbox`` is a ``Sandbox`` on the Docker Engine.

A container has no network, a read-only root, only a small ``noexec`` tmpfs
at ``/tmp`` to write to, no capabilities, ``no-new-privileges``, the user
``nobody`` and finite memory, pids, CPU, open files, time and output. It is
removed after the call, whatever happened. The image is built offline
(``debootstrap``, then ``docker import``) and identified by its digest.

Example (needs a Docker Engine; the first ``ensure_image()`` takes a minute)::

    >>> from callward.core import ToolCall, ToolSpec, ResourceLimits, canonical_bytes, sha256_hex
    >>> from callward.sandbox import DockerSandbox, ensure_image
    >>> image = ensure_image()
    >>> spec = ToolSpec(
    ...     name="square", version="1.0.0", description="x squared",
    ...     source="def square(x):\\n    return x * x\\n", entrypoint="square",
    ...     parameters_json=canonical_bytes({"type": "object"}), digest=sha256_hex(b"square"),
    ... )
    >>> call = ToolCall.create(id="c1", name="square", arguments={"x": 3}, dialect="api")
    >>> with DockerSandbox(image=image) as sandbox:  # close() removes its warm containers
    ...     execution = sandbox.run(spec, call, ResourceLimits())
    >>> (execution.kind, execution.value)
    ('ok', 9)
"""

from callward.core import Isolation, Runtime
from callward.sandbox._attached_stdio import AttachedStdio
from callward.sandbox._docker import DockerSandbox
from callward.sandbox._doctor import DoctorCheck, diagnose
from callward.sandbox._image import SandboxImage, ensure_image, expected_image_tag
from callward.sandbox._model_runner import ModelToolRunner
from callward.sandbox._model_worker import LoadedWorker, ModelWorkers, server_sha256
from callward.sandbox._pool import PoolConfig
from callward.sandbox._sandbox import Sandbox
from callward.sandbox._secrets import (
    DirectorySecretSource,
    EnvironmentSecretSource,
    SecretSource,
    SecretUnavailable,
    secret_source,
)
from callward.sandbox._stdio_service import ServiceImageSpec, StdioService, ensure_service_image
from callward.sandbox._worker_container import WorkerSpec
from callward.sandbox.base import RawExecution, SandboxBackend

__all__ = [
    "AttachedStdio",
    "DirectorySecretSource",
    "DockerSandbox",
    "DoctorCheck",
    "EnvironmentSecretSource",
    "Isolation",
    "LoadedWorker",
    "ModelToolRunner",
    "ModelWorkers",
    "PoolConfig",
    "RawExecution",
    "Runtime",
    "Sandbox",
    "SandboxBackend",
    "SandboxImage",
    "SecretSource",
    "SecretUnavailable",
    "ServiceImageSpec",
    "StdioService",
    "WorkerSpec",
    "diagnose",
    "ensure_image",
    "ensure_service_image",
    "expected_image_tag",
    "secret_source",
    "server_sha256",
]
