"""
The gateway's invariants, with a real SQLite audit log and real keys, and
sandbox stand-ins (Stub*) for what a unit test cannot start.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from callward.audit import FileSigner, SQLiteAuditStore, verify
from callward.core import (
    AuditRecord,
    AuditUnavailable,
    CallContext,
    Decision,
    Execution,
    JSONValue,
    ResourceLimits,
    SandboxUnavailable,
    Sha256Hex,
    ToolCall,
    ToolRegistry,
    ToolSpec,
    Usage,
    canonical_bytes,
    sha256_hex,
)
from callward.core.gateway import Gateway
from callward.policies import Policy

IMAGE = Sha256Hex("ab" * 32)


class StubRunner:
    """Returns the square of x as a real runner would, and remembers each call."""

    def __init__(self, on_run=None) -> None:
        self.calls: list[ToolCall] = []
        self._on_run = on_run

    @property
    def image_digest(self) -> Sha256Hex:
        return IMAGE

    def run(self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
        self.calls.append(call)
        if self._on_run is not None:
            return self._on_run(spec, call, limits)
        x = call.arguments.get("x", 0)
        return Execution("ok", canonical_bytes(x * x), "", Usage(1.0, 0, 10))


class StubFailingAuditLog:
    """A real store whose Nth append fails, like a disk that fills at the Nth write."""

    def __init__(self, store: SQLiteAuditStore, fail_on: int) -> None:
        self._store = store
        self._fail_on = fail_on
        self.appends = 0

    def append(self, kind: str, body: Mapping[str, JSONValue]) -> AuditRecord:
        self.appends += 1
        if self.appends == self._fail_on:
            raise AuditUnavailable("injected: the disk is full")
        return self._store.append(kind, body)


@pytest.fixture(name="store")
def _store(tmp_path: Path):
    store = SQLiteAuditStore(tmp_path / "audit.db", FileSigner.load_or_create(tmp_path / "keys"))
    store.open()
    yield store
    store.close()


@pytest.fixture(name="registry")
def _registry(examples: Path) -> ToolRegistry:
    registry = ToolRegistry()
    registry.load(examples / "tools.py")
    return registry


@pytest.fixture(name="policy")
def _policy(examples: Path) -> Policy:
    return Policy.from_file(examples / "policy.yaml")


@pytest.fixture(name="make_gateway")
def _make_gateway(registry, policy, store):
    def make(runner=None, audit=None, policy_engine=None) -> Gateway:
        return Gateway(
            registry=registry,
            policy=policy_engine or policy,
            runner=runner or StubRunner(),
            audit=audit or store,
            new_id=iter(f"gen_{n}" for n in range(1, 1000)).__next__,
        )

    return make


def kinds(store: SQLiteAuditStore) -> list[str]:
    return [record.kind for record in store.records()]


class TestAllowedCall:
    def test_allowed_call_is_authorized_run_and_completed(self, make_gateway, store):
        """An allowed call returns its value with the receipt of a signed call.completed."""
        runner = StubRunner()
        (result,) = make_gateway(runner).handle_text(
            'call function("square", [3], 9)', principal="alice"
        )

        assert ("ok", 9, True) == (result.kind, result.content, result.expected_matched)
        assert ["call.authorized", "call.completed"] == kinds(store)
        assert store.last().receipt == result.receipt
        assert 1 == len(runner.calls)

    def test_expected_output_mismatch_is_reported_not_trusted(self, make_gateway, store):
        """A wrong expected output does not change the result; it is only reported."""
        (result,) = make_gateway().handle_text(
            'call function("square", [3], 10)', principal="alice"
        )

        assert ("ok", 9, False) == (result.kind, result.content, result.expected_matched)
        assert store.last().body["expected_matched"] is False

    def test_authorized_is_durable_before_the_sandbox_runs(self, make_gateway, store, tmp_path):
        """When the sandbox is asked to run, call.authorized is already committed on disk."""
        seen: list[tuple[str, str]] = []

        def read_store_from_outside(spec, call, limits):
            with sqlite3.connect(tmp_path / "audit.db") as outside:
                row = outside.execute(
                    "SELECT kind, body FROM records ORDER BY seq DESC LIMIT 1"
                ).fetchone()
            seen.append((row[0], call.id))
            assert call.id in row[1]
            return Execution("ok", b"1", "", Usage(1.0, 0, 1))

        make_gateway(StubRunner(read_store_from_outside)).handle(
            ToolCall.create(id="ordered", name="square", arguments={"x": 1}, dialect="api"),
            principal="alice",
        )

        assert [("call.authorized", "ordered")] == seen

    def test_records_carry_digests(self, make_gateway, store, registry, policy):
        """The authorization names the policy, tool and image digests in force."""
        make_gateway().handle_text('call function("square", [2])', principal="alice")
        authorized = next(store.records())

        body = authorized.body
        assert policy.digest == body["decision"]["policy_digest"]
        assert registry.get("square").digest == body["tool"]["digest"]
        assert IMAGE == body["image_digest"]
        assert {"x": 2} == body["call"]["arguments"]


class TestDenials:
    @pytest.mark.parametrize(
        ("principal", "text", "kind", "rule"),
        [
            ("alice", '<tool_call>{"name": "square", "arguments": {"x": "3"}}</tool_call>',
             "schema", "schema.square"),
            ("alice", 'call function("rm_rf", ["/"])', "unknown_tool", "registry.unknown-tool"),
            ("mallory", 'call function("drop_table", ["users"])', "permission",
             "guests-never-destroy"),
            ("eve", 'call function("square", [3])', "permission", "default-deny"),
        ],
    )
    def test_denied_calls_are_audited_and_never_run(
        self, make_gateway, store, principal, text, kind, rule
    ):
        """Each denial has its kind and rule, one call.denied record, and nothing ran."""
        runner = StubRunner()

        (result,) = make_gateway(runner).handle_text(text, principal=principal)

        assert (kind, rule) == (result.kind, result.content["rule"])
        assert ["call.denied"] == kinds(store)
        assert kind == store.last().body["decision"]["kind"]
        assert [] == runner.calls

    def test_malformed_text_is_audited_and_never_runs(self, make_gateway, store):
        """A parse failure is recorded as call.rejected and goes back as malformed."""
        runner = StubRunner()

        (result,) = make_gateway(runner).handle_text(
            '<tool_call>{"name": "square", "arguments": {"x": 4}</tool_call>', principal="alice"
        )

        assert "malformed" == result.kind
        assert 51 == result.content["offset"]
        assert ["call.rejected"] == kinds(store)
        assert [] == runner.calls

    def test_a_policy_that_breaks_denies(self, make_gateway, store):
        """An exception inside the policy engine is a denial, never an allow."""

        class StubBrokenPolicy:
            digest = sha256_hex(b"broken")

            def decide(self, call: ToolCall, spec, context: CallContext) -> Decision:
                raise KeyError("bug")

        (result,) = make_gateway(policy_engine=StubBrokenPolicy()).handle_text(
            'call function("square", [3])', principal="alice"
        )

        assert ("permission", "gateway.policy-error") == (result.kind, result.content["rule"])


class TestFailures:
    def test_sandbox_unavailable_is_audited_and_has_no_value(self, make_gateway, store):
        """An unreachable sandbox ends as sandbox_unavailable, recorded, with no value."""

        def unreachable(spec, call, limits):
            raise SandboxUnavailable("Docker Engine did not answer")

        (result,) = make_gateway(StubRunner(unreachable)).handle_text(
            'call function("square", [3])', principal="alice"
        )

        assert "sandbox_unavailable" == result.kind
        assert "sandbox_unavailable" == result.content["error"]
        assert ["call.authorized", "call.completed"] == kinds(store)
        assert "sandbox_unavailable" == store.last().body["outcome"]

    def test_unexpected_sandbox_error_is_widened_not_swallowed(self, make_gateway, store):
        """Any other exception from the sandbox is audited as sandbox_unavailable."""

        def broken(spec, call, limits):
            raise ZeroDivisionError

        (result,) = make_gateway(StubRunner(broken)).handle_text(
            'call function("square", [3])', principal="alice"
        )

        assert "sandbox_unavailable" == result.kind
        assert "call.completed" == store.last().kind

    def test_failed_authorization_write_runs_nothing(self, make_gateway, store):
        """If call.authorized cannot be written, nothing runs and the caller gets an error."""
        runner = StubRunner()

        with pytest.raises(AuditUnavailable):
            make_gateway(runner, StubFailingAuditLog(store, fail_on=1)).handle_text(
                'call function("square", [3])', principal="alice"
            )

        assert [] == runner.calls
        assert [] == kinds(store)

    def test_failed_completion_write_withholds_the_result(self, make_gateway, store):
        """If call.completed cannot be written, the result never reaches the caller."""
        runner = StubRunner()

        with pytest.raises(AuditUnavailable) as caught:
            make_gateway(runner, StubFailingAuditLog(store, fail_on=2)).handle_text(
                'call function("square", [3])', principal="alice"
            )

        assert "audit_unavailable" == caught.value.kind
        assert 1 == len(runner.calls)
        assert ["call.authorized"] == kinds(store)


class TestLogsAndVerification:
    def test_logs_hold_no_argument_values(self, make_gateway):
        """Operational logs carry hashes and sizes, never argument or result values."""
        with capture_logs() as logs:
            make_gateway().handle_text(
                'call function("capital", ["Secretland-42"])', principal="alice"
            )

        assert logs
        assert "Secretland-42" not in repr(logs)

    def test_log_written_by_the_gateway_verifies(self, make_gateway, store, tmp_path):
        """Everything the gateway wrote verifies offline with the public key."""
        gateway = make_gateway()
        for text in ('call function("square", [3])', 'call function("nope", [])', "<tool_call>"):
            gateway.handle_text(text, principal="alice")

        verified = verify(tmp_path / "audit.db", tmp_path / "keys" / "audit-ed25519.pub")

        assert 4 == verified.records
