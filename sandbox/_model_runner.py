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
from typing import Literal

import structlog

from callward.core import (
    Execution,
    ResourceLimits,
    SandboxUnavailable,
    Sha256Hex,
    ToolCall,
    ToolSpec,
)
from callward.core.protocols import PlacingToolRunner, ToolRunner
from callward.sandbox._model_worker import ModelWorkers

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
        runtime: Literal["runc", "runsc"] = "runc",
    ) -> None:
        for tool, (worker, _digest) in routes.items():
            if worker not in workers.names:
                raise ValueError(f"model tool {tool} is routed to unknown worker {worker}")
        self.workers = workers
        self._routes = dict(routes)
        self._fallback = fallback
        self._runtime = runtime

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
        self,
        spec: ToolSpec,
        call: ToolCall,
        limits: ResourceLimits,
        *,
        isolation: Literal["call", "session"],
        runtime: Literal["runc", "runsc"] | None,
        principal: str,
        session_id: str,
        secrets: tuple[str, ...] = (),
        egress: tuple[str, ...] = (),
    ) -> Execution:
        """
        Raises:
            SandboxUnavailable: As ``run``; or the policy asks a model tool to run on a
                runtime its workers do not use, or grants it secrets or egress.
        """
        if spec.name not in self._routes:
            if isinstance(self._fallback, PlacingToolRunner):
                grants = {"secrets": secrets, "egress": egress} if secrets or egress else {}
                return self._fallback.run_placed(
                    spec, call, limits, isolation=isolation, runtime=runtime,
                    principal=principal, session_id=session_id, **grants)
            if secrets or egress:
                raise SandboxUnavailable(f"the sandbox cannot hand {spec.name} secrets or egress")
            if runtime is not None:
                raise SandboxUnavailable(f"the sandbox cannot run {spec.name} on {runtime}")
            return self._fallback.run(spec, call, limits)
        if secrets or egress:
            raise SandboxUnavailable(f"model tool {spec.name} runs in a worker without "
                                     "secrets or network; the policy grants it some")
        if runtime is not None and runtime != self._runtime:
            raise SandboxUnavailable(
                f"the policy runs {spec.name} on {runtime}; its model worker runs on "
                f"{self._runtime}")
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
