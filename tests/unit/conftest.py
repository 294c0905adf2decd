"""
Fixtures shared by the unit tests: a real signed SQLite audit log under tmp_path, the
shipped example tools and policy, and gateways over them whose tools run in a
``StubRunner`` (a unit test starts no container). A test module overrides ``registry``,
``policy`` or ``runner`` to change what ``make_gateway`` builds with.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from callward.audit import FileSigner, SQLiteAuditStore
from callward.core import (
    AuditLog,
    Execution,
    PolicyEngine,
    ResourceLimits,
    ToolCall,
    ToolRegistry,
    ToolRunner,
    ToolSpec,
)
from callward.core.gateway import Gateway
from callward.core.observe import CallObserver, Tracing, configure_tracing
from callward.core.testing import StubRunner, ok_execution
from callward.policies import Policy


def square_of_x(spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
    """Every tool answers x squared (0 without an x), as the example `square` would."""
    x = call.arguments.get("x", 0)
    return ok_execution(x * x)


@pytest.fixture(name="signer")
def _signer(tmp_path: Path) -> FileSigner:
    """A fresh Ed25519 key in tmp_path/keys (its public key: keys/audit-ed25519.pub)."""
    return FileSigner.load_or_create(tmp_path / "keys")


@pytest.fixture(name="store")
def _store(tmp_path: Path, signer: FileSigner) -> Iterator[SQLiteAuditStore]:
    """A real audit log in tmp_path/audit.db, open for the test and closed after it."""
    store = SQLiteAuditStore(tmp_path / "audit.db", signer)
    store.open()
    yield store
    store.close()


@pytest.fixture(name="registry")
def _registry(examples: Path) -> ToolRegistry:
    """The shipped example tools (square, add, capital, drop_table, spin)."""
    registry = ToolRegistry()
    registry.load(examples / "tools.py")
    return registry


@pytest.fixture(name="policy")
def _policy(examples: Path) -> Policy:
    """The shipped example policy."""
    return Policy.from_file(examples / "policy.yaml")


@pytest.fixture(name="runner")
def _runner() -> StubRunner:
    """A StubRunner whose every tool answers x squared, recording each run."""
    return StubRunner(square_of_x)


@pytest.fixture(name="make_gateway")
def _make_gateway(
    registry: ToolRegistry, policy: PolicyEngine, runner: ToolRunner, store: SQLiteAuditStore
) -> Callable[..., Gateway]:
    """
    Build a gateway from this test's ``registry``, ``policy``, ``runner`` and ``store``,
    any of which a call replaces; its call ids are gen_1, gen_2, ... (deterministic).
    """
    defaults = (registry, policy, runner, store)

    def make(
        runner: ToolRunner | None = None,
        *,
        audit: AuditLog | None = None,
        policy: PolicyEngine | None = None,
        registry: ToolRegistry | None = None,
        observers: tuple[CallObserver, ...] = (),
    ) -> Gateway:
        counter = itertools.count(1)
        return Gateway(
            registry=defaults[0] if registry is None else registry,
            policy=defaults[1] if policy is None else policy,
            runner=defaults[2] if runner is None else runner,
            audit=defaults[3] if audit is None else audit,
            observers=observers,
            new_id=lambda: f"gen_{next(counter)}",
        )

    return make


@pytest.fixture(name="gateway")
def _gateway(make_gateway: Callable[..., Gateway]) -> Gateway:
    """A gateway over this test's registry, policy, runner and store."""
    return make_gateway()


@pytest.fixture(name="spans")
def _spans() -> InMemorySpanExporter:
    """The SDK's in-memory exporter: every span the test's gateway ended."""
    return InMemorySpanExporter()


@pytest.fixture(name="tracing")
def _tracing(spans: InMemorySpanExporter) -> Iterator[Tracing]:
    """Tracing on, into ``spans``; its provider is the test's own, never the global one."""
    tracing = configure_tracing(exporter=spans, service_name="callward-test")
    yield tracing
    tracing.shutdown()
