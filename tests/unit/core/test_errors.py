"""The error tree: the drawing in core/errors.py matches the classes, every kind is stable."""

from __future__ import annotations

import re

import pytest

from callward.core import (
    CallId,
    Decision,
    InfrastructureError,
    KeyId,
    PolicyDenied,
    Receipt,
    RuleId,
    Sha256Hex,
    ToolFailed,
    ToolResult,
    canonical_bytes,
    errors,
)
from callward.policies import AnomalyStateUnavailable, ApprovalRefused
from callward.policies._state import StateUnavailable
from callward.sandbox import SecretUnavailable


def drawn_classes() -> dict[str, str]:
    """Each class the docstring's tree draws, with its parent in the drawing."""
    drawing = errors.__doc__ or ""
    parents: list[tuple[int, str]] = []
    found: dict[str, str] = {}
    for line in drawing.splitlines():
        match = re.match(r"^    ([│ ]*[├└]── )?([A-Z][A-Za-z]+)\s", line)
        if not match:
            continue
        depth = len(match.group(1) or "")
        while parents and parents[-1][0] >= depth:
            parents.pop()
        found[match.group(2)] = parents[-1][1] if parents else ""
        parents.append((depth, match.group(2)))
    return found


CLASSES = {
    "CallwardError": errors.CallwardError,
    "PolicyDenied": errors.PolicyDenied,
    "MalformedCall": errors.MalformedCall,
    "UnknownTool": errors.UnknownTool,
    "ApprovalRefused": ApprovalRefused,
    "ToolFailed": errors.ToolFailed,
    "InfrastructureError": errors.InfrastructureError,
    "SandboxUnavailable": errors.SandboxUnavailable,
    "SecretUnavailable": SecretUnavailable,
    "AuditUnavailable": errors.AuditUnavailable,
    "StateUnavailable": errors.StateUnavailable,
    "AnomalyStateUnavailable": AnomalyStateUnavailable,
    "ConfigurationError": errors.ConfigurationError,
    "PolicyInvalid": errors.PolicyInvalid,
    "PlanInvalid": __import__("callward.core.plans", fromlist=["PlanInvalid"]).PlanInvalid,
    "ModelUnavailable": errors.ModelUnavailable,
    "ModelEndpointFailed": errors.ModelEndpointFailed,
    "VerificationFailed": errors.VerificationFailed,
}


def receipt() -> Receipt:
    return Receipt(seq=1, record_hash=Sha256Hex("0" * 64), key_id=KeyId("k"))


def result(kind: str, message: str = "went wrong") -> ToolResult:
    decision = (Decision("deny", (RuleId("no-square"),), Sha256Hex("0" * 64),
                         kind=kind)  # type: ignore[arg-type]
                if kind in errors.DENY_KINDS else None)
    return ToolResult(call_id=CallId("c1"), tool="square", kind=kind,  # type: ignore[arg-type]
                      content_json=canonical_bytes({"error": kind, "message": message}),
                      receipt=receipt(), decision=decision)


class TestErrorTree:
    def test_the_drawing_names_exactly_the_classes_that_exist(self):
        """Every class drawn exists, and every error class of callward is drawn."""
        expected = sorted(CLASSES)

        assert expected == sorted(drawn_classes())

    @pytest.mark.parametrize("name", sorted(CLASSES))
    def test_each_class_sits_under_its_drawn_parent(self, name):
        """A drawn child is a subclass of the class drawn above it."""
        parent = drawn_classes()[name]

        assert parent == "" or issubclass(CLASSES[name], CLASSES[parent])

    def test_state_errors_are_infrastructure_with_a_kind(self):
        """An unreadable policy or anomaly state is state_unavailable, not a bare RuntimeError."""
        expected = [("state_unavailable", True)] * 2
        assert expected == [(e.kind, isinstance(e, InfrastructureError))
                            for e in (StateUnavailable("x"), AnomalyStateUnavailable("y"))]

    def test_diagnostics_never_is_a_traceback(self):
        """The diagnostics name the kind, the message and what to do."""
        expected = "[state_unavailable] policy state: OperationalError"
        assert expected == StateUnavailable("policy state: OperationalError").diagnostics() \
            .splitlines()[0]


class TestRaiseForKind:
    def test_ok_raises_nothing(self):
        """An ok result returns None."""
        ok = ToolResult(call_id=CallId("c1"), tool="square", kind="ok",
                        content_json=b"9", receipt=receipt())

        assert ok.raise_for_kind() is None

    @pytest.mark.parametrize(
        ("kind", "error"),
        [("schema", PolicyDenied), ("rate_limit", PolicyDenied), ("timeout", ToolFailed),
         ("memory_limit", ToolFailed), ("sandbox_unavailable", InfrastructureError),
         ("audit_unavailable", InfrastructureError)],
    )
    def test_each_kind_raises_its_branch_of_the_tree(self, kind, error):
        """Denials raise PolicyDenied, tool failures ToolFailed, the rest InfrastructureError."""
        with pytest.raises(error) as raised:
            result(kind).raise_for_kind()

        expected = (kind, "square: went wrong")
        assert expected == (raised.value.kind, str(raised.value))

    def test_a_denial_names_its_rule(self):
        """The rule of the decision travels with the PolicyDenied."""
        with pytest.raises(PolicyDenied) as raised:
            result("permission").raise_for_kind()

        assert "no-square" == raised.value.rule
