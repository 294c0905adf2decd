"""
Policy pins on tool versions and digests, and calls that name a version, decided
by the real evaluator and run through a real gateway with a live registry.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from callward.audit import FileSigner, SQLiteAuditStore
from callward.core import (
    CallContext,
    Execution,
    PolicyInvalid,
    ToolCall,
    ToolRegistry,
    ToolSpec,
    Usage,
    canonical_bytes,
)
from callward.core.gateway import Gateway
from callward.core.registry import LiveRegistry, RegistryStore
from callward.core.registry._files import read_tool_file
from callward.core.testing import StubRunner
from callward.policies import Policy
from tests.unit.core.test_registry_versions import tool_file

POLICY = """
version: 1
default: deny
rules:
  - {id: anyone-doubles, effect: allow, principals: ["*"], tools: [double]}
tools:
  double:
    versions: ["1.0.0"]
"""


def call(name: str, x: int = 3) -> ToolCall:
    return ToolCall.create(id="c1", name=name, arguments={"x": x}, dialect="api")


def spec(directory: Path, version: str, returns: str = "x * 2") -> ToolSpec:
    (loaded,) = read_tool_file(tool_file(directory, version, returns)).specs
    return loaded


class TestPins:
    def test_pinned_version_is_allowed(self, tmp_path):
        """The version the policy names is allowed, and the trace shows the pin passed."""
        policy = Policy.from_text(POLICY)

        trace = policy.explain(call("double"), spec(tmp_path, "1.0.0"), CallContext("alice"))

        assert "allow" == trace.decision.effect
        assert ("pin", True) == (trace.checks[0].check, trace.checks[0].passed)

    def test_another_version_is_denied_by_the_pin(self, tmp_path):
        """A call resolving to an unpinned version is denied as permission, naming it."""
        decision = Policy.from_text(POLICY).decide(
            call("double"), spec(tmp_path, "2.0.0"), CallContext("alice"))

        assert ("deny", "permission", "tools.double.pin") == (
            decision.effect, decision.kind, decision.reasons[0])
        assert "version 2.0.0 is not allowed" in decision.message

    def test_the_pin_is_checked_before_the_schema(self, tmp_path):
        """An unpinned version with bad arguments is still denied for its version."""
        bad = ToolCall.create(id="c1", name="double", arguments={"x": "no"}, dialect="api")

        decision = Policy.from_text(POLICY).decide(bad, spec(tmp_path, "2.0.0"),
                                                   CallContext("alice"))

        assert ("permission", "tools.double.pin") == (decision.kind, decision.reasons[0])

    def test_digest_pin(self, tmp_path):
        """A digest pin allows that exact content only: same version, other code is denied."""
        good = spec(tmp_path, "1.0.0")
        (other,) = read_tool_file(tool_file(tmp_path, "1.0.0", "x * 3",
                                            filename="other.py")).specs
        policy = Policy.from_text(POLICY.replace('versions: ["1.0.0"]',
                                                 f"digests: [{good.digest}]"))

        allowed = policy.decide(call("double"), good, CallContext("alice"))
        denied = policy.decide(call("double"), other, CallContext("alice"))

        assert ("allow", "deny") == (allowed.effect, denied.effect)
        assert "tools.double.pin" == denied.reasons[0]

    @pytest.mark.parametrize("pin", ["versions: []", "versions: ['no spaces']",
                                     "digests: [abc]", "versions: [1.0.0, 1.0.0]"])
    def test_invalid_pins_are_refused(self, pin):
        """An empty, malformed or duplicated pin is an invalid policy, never ignored."""
        with pytest.raises(PolicyInvalid):
            Policy.from_text(POLICY.replace('versions: ["1.0.0"]', pin))

    def test_a_call_may_name_a_version(self, tmp_path):
        """name@version reaches that version; any other name for the spec is unknown."""
        policy = Policy.from_text(POLICY)
        pinned = spec(tmp_path, "1.0.0")

        named = policy.decide(call("double@1.0.0"), pinned, CallContext("alice"))
        mismatched = policy.decide(call("double@2.0.0"), pinned, CallContext("alice"))

        assert ("allow", "unknown_tool") == (named.effect, mismatched.kind)


class TestGatewayWithLiveRegistry:
    @pytest.fixture(name="world")
    def _world(self, tmp_path):
        audit = SQLiteAuditStore(tmp_path / "audit.db",
                                 FileSigner.load_or_create(tmp_path / "keys"))
        audit.open()
        store = RegistryStore(tmp_path / "registry.db")
        store.open()
        registry = ToolRegistry()
        registry.attach(store)
        runner = StubRunner(lambda spec, _call, _limits: Execution(
            "ok", canonical_bytes(spec.ref), "", Usage(1.0, 0, 1)))
        gateway = Gateway(registry=registry, policy=Policy.from_text(POLICY), runner=runner,
                          audit=audit)
        # The operator's change comes through another connection, as the CLI's would.
        admin_store = RegistryStore(tmp_path / "registry.db")
        admin_store.open()
        admin_registry = ToolRegistry()
        admin_registry.attach(admin_store)
        yield gateway, LiveRegistry(admin_registry, admin_store, audit), audit
        admin_store.close()
        store.close()
        audit.close()

    def test_next_call_runs_the_newly_loaded_version(self, world, tmp_path):
        """Load v1, call; load v2 while the gateway lives: the next call runs v2 (pin denies)."""
        gateway, live, audit = world
        live.load(tool_file(tmp_path, "1.0.0"))
        first = gateway.handle(call("double"), principal="alice")
        live.load(tool_file(tmp_path, "2.0.0", "x * 20"))
        second = gateway.handle(call("double"), principal="alice")
        explicit = gateway.handle(call("double@1.0.0"), principal="alice")

        denied = next(r for r in audit.records() if r.kind == "call.denied")

        assert ("ok", "double@1.0.0") == (first.kind, first.content)
        assert ("permission", "tools.double.pin") == (second.kind, second.decision.reasons[0])
        assert ("double@2.0.0", live.registry.require("double").digest) == (
            denied.body["tool"]["ref"], denied.body["tool"]["digest"])
        assert ("ok", "double@1.0.0") == (explicit.kind, explicit.content)

    def test_rollback_reaches_the_running_gateway(self, world, tmp_path):
        """Without a pin, v2 runs after its load and v1 again after a rollback."""
        pinned, live, audit = world
        gateway = Gateway(registry=pinned.registry, runner=pinned.runner, audit=audit,
                          policy=Policy.from_text(POLICY.split("tools:\n  double:", maxsplit=1)[0]))
        live.load(tool_file(tmp_path, "1.0.0"))
        live.load(tool_file(tmp_path, "2.0.0", "x * 20"))
        after_load = gateway.handle(call("double"), principal="alice").content
        live.rollback("double")
        after_rollback = gateway.handle(call("double"), principal="alice").content

        assert ("double@2.0.0", "double@1.0.0") == (after_load, after_rollback)

    def test_model_text_may_name_a_version(self, world, tmp_path):
        """A parsed call to name@version (any JSON dialect) runs that version."""
        gateway, live, _audit = world
        live.load(tool_file(tmp_path, "1.0.0"))
        live.load(tool_file(tmp_path, "2.0.0", "x * 20"), activate=False)

        (result,) = gateway.handle_text(
            '<tool_call>{"name": "double@1.0.0", "arguments": {"x": 3}}</tool_call>',
            principal="alice")

        assert ("ok", "double@1.0.0", "double") == (result.kind, result.content, result.tool)
