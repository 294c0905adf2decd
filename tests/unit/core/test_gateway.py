"""
The gateway's invariants, with a real SQLite audit log and real keys, and
sandbox stand-ins (Stub*) for what a unit test cannot start.
"""

from __future__ import annotations

import sqlite3

import pytest
from structlog.testing import capture_logs

from callward.audit import verify
from callward.core import (
    AuditUnavailable,
    CallContext,
    Decision,
    SandboxUnavailable,
    ToolCall,
    sha256_hex,
)
from callward.core.testing import (
    STUB_IMAGE_DIGEST,
    StubFailingAuditLog,
    StubRunner,
    kinds,
    ok_execution,
)


class TestAllowedCall:
    def test_allowed_call_is_authorized_run_and_completed(self, make_gateway, store, runner):
        """An allowed call returns its value with the receipt of a signed call.completed."""
        (result,) = make_gateway().handle_text(
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
            return ok_execution(1)

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
        assert STUB_IMAGE_DIGEST == body["image_digest"]
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
        self, make_gateway, store, runner, principal, text, kind, rule
    ):
        """Each denial has its kind and rule, one call.denied record, and nothing ran."""
        (result,) = make_gateway().handle_text(text, principal=principal)

        assert (kind, rule) == (result.kind, result.content["rule"])
        assert ["call.denied"] == kinds(store)
        assert kind == store.last().body["decision"]["kind"]
        assert [] == runner.calls

    def test_malformed_text_is_audited_and_never_runs(self, make_gateway, store, runner):
        """A parse failure is recorded as call.rejected and goes back as malformed."""
        (result,) = make_gateway().handle_text(
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

        (result,) = make_gateway(policy=StubBrokenPolicy()).handle_text(
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

    def test_failed_authorization_write_runs_nothing(self, make_gateway, store, runner):
        """If call.authorized cannot be written, nothing runs and the caller gets an error."""
        with pytest.raises(AuditUnavailable):
            make_gateway(audit=StubFailingAuditLog(store, fail_on=1)).handle_text(
                'call function("square", [3])', principal="alice"
            )

        assert [] == runner.calls
        assert [] == kinds(store)

    def test_failed_completion_write_withholds_the_result(self, make_gateway, store, runner):
        """If call.completed cannot be written, the result never reaches the caller."""
        with pytest.raises(AuditUnavailable) as caught:
            make_gateway(audit=StubFailingAuditLog(store, fail_on=2)).handle_text(
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
