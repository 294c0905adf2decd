"""
The checks of a decision that change nothing: pin, input, permission, anomaly.

Each adds what it found to the decision's ``CheckRecord`` and fails closed:
input out of bounds is never handed to the schema or to Cedar, a Cedar policy
that errors denies, and an ``anomalies`` gate that applies denies when the
anomaly state is missing or unreadable.
"""

from __future__ import annotations

from callward.core import CallContext, RuleId, ToolCall, ToolSpec
from callward.core._canonical import MAX_JSON_BYTES, check_json_bounds
from callward.core.errors import DenyKind
from callward.policies._anomaly_state import AnomalyStateUnavailable, OpenAnomalies
from callward.policies._argument_constraints import first_violation
from callward.policies._cedar import CedarPermissions, ContextError
from callward.policies._constraints import confinement_violation
from callward.policies._document import PolicyDocument
from callward.policies._effects import Pending
from callward.policies._schema import SchemaCheck
from callward.policies._trace import (
    ANOMALY_STATE_RULE,
    BOUNDS_RULE,
    CEDAR_CONTEXT_RULE,
    CEDAR_ERROR_RULE,
    DEFAULT_DENY_RULE,
    Check,
    CheckRecord,
    schema_rule,
)


def pin_check(document: PolicyDocument, spec: ToolSpec, record: CheckRecord) -> None:
    """A call resolving to a version or digest the document does not pin is denied."""
    pin = document.pins.get(spec.name)
    if pin is not None:
        violation = pin.violation(spec.version, spec.digest)
        record.add("permission", Check("pin", violation is None,
                                       (RuleId(f"tools.{spec.name}.pin"),), violation or ""))


def input_checks(schema: SchemaCheck, document: PolicyDocument, call: ToolCall, spec: ToolSpec,
                 record: CheckRecord, *, context: CallContext) -> bool:
    """Bounds, schema and argument constraints; False when the input is out of bounds."""
    bounds = _bounds(call)
    if bounds is not None:
        record.add("schema", Check("bounds", False, (BOUNDS_RULE,), bounds, "$"))
        return False
    violation = schema.violation(call, spec)
    record.add("schema", Check(
        "schema", violation is None, (schema_rule(spec),),
        "" if violation is None else violation.message,
        None if violation is None else violation.json_path))
    confinement = document.confinements.get(spec.name)
    if confinement is not None:
        path = confinement_violation(confinement, call.arguments)
        record.add("constraint", Check(
            "constraint", path is None, (RuleId(f"confine.{spec.name}"),),
            "" if path is None else f"a path argument leaves {confinement.root}", path))
    constraints = document.argument_constraints.get(spec.name, ())
    if constraints:
        broken = first_violation(constraints, call.arguments, principal=context.principal,
                                 roles=document.caller_roles(context),
                                 groups=document.caller_groups(context))
        record.add("constraint", Check(
            "constraint", broken is None,
            (broken.rule,) if broken else tuple(c.id for c in constraints),
            "" if broken is None else f"an argument is {broken.reason}",
            None if broken is None else broken.json_path))
    if spec.secrets:  # the tool declares, the policy grants; anything else is denied
        missing = document.ungranted_secrets(spec.name, spec.secrets)
        record.add("permission", Check(
            "secrets", not missing, (RuleId(f"secrets.{spec.name}"),),
            f"the policy grants {spec.name} no secret {', '.join(missing)}" if missing
            else ""))
    return True


def _bounds(call: ToolCall) -> str | None:
    if len(call.arguments_json) > MAX_JSON_BYTES:
        return f"the arguments are over {MAX_JSON_BYTES} bytes"
    # Nesting deeper than the bound needs more characters than this.
    if len(call.arguments_json) > 128:
        try:
            check_json_bounds(call.arguments_json.decode("utf-8"))
        except ValueError as exc:
            return str(exc)
    return None


def permission_check(cedar: CedarPermissions, call: ToolCall, spec: ToolSpec, *,
                     context: CallContext, session_labels: frozenset[str], now: float,
                     record: CheckRecord) -> tuple[tuple[RuleId, ...], tuple[str, ...]]:
    """
    Ask Cedar; a forbid, an evaluation error or no permit denies.

    Returns:
        The permits that matched, and Cedar's diagnostics.
    """
    try:
        answer = cedar.decide(
            principal=context.principal, spec=spec, arguments=call.arguments,
            session_id=context.session_id, session_labels=session_labels, now=now,
            identity=context.identity)
    except ContextError as exc:
        record.add("constraint", Check("cedar.context", False, (CEDAR_CONTEXT_RULE,),
                                       str(exc), exc.json_path))
        return (), ()
    if answer.errors:
        record.add("permission", Check("permission", False, (CEDAR_ERROR_RULE,),
                                       "a Cedar policy failed to evaluate"))
    elif answer.forbids:
        record.add("permission", Check("permission", False, answer.forbids,
                                       "a forbid policy matches this call"))
    elif not answer.allowed:
        record.add("permission", Check("permission", False, (DEFAULT_DENY_RULE,),
                                       "no rule allows this principal this tool"))
    else:
        record.add("permission", Check("permission", True, answer.permits))
    return answer.permits, answer.errors


def anomaly_check(anomalies: OpenAnomalies | None, document: PolicyDocument, spec: ToolSpec,
                  *, context: CallContext, pending: Pending, record: CheckRecord,
                  now: float) -> None:
    """Deny, or ask for approval, while an anomaly a gate names is open for the caller."""
    roles = document.caller_roles(context)
    groups = document.caller_groups(context)
    gates = [g for g in document.anomaly_gates
             if g.applies(context.principal, roles, groups, spec.name)]
    if not gates:
        return
    kind: DenyKind = "permission" if gates[0].approval is None else "approval_required"
    if anomalies is None:
        record.add(kind, Check("anomaly", False, (ANOMALY_STATE_RULE,),
                               "no anomaly state is configured"))
        return
    try:
        open_now = anomalies.open_for(context.principal, now)
    except AnomalyStateUnavailable:
        record.add(kind, Check("anomaly", False, (ANOMALY_STATE_RULE,),
                               "the anomaly state is unreadable"))
        return
    for gate in gates:
        held = [a for a in open_now if a.metric in gate.metrics]
        if not held:
            continue
        ids = tuple(RuleId(f"anomaly.{a.id}") for a in held)
        if gate.approval is None:
            record.add("permission", Check(
                "anomaly", False, (gate.id, *ids),
                f"an anomaly ({held[0].metric}) is open for this principal"))
        elif pending.anomaly_approval is None:
            pending.anomaly_approval = (gate.approval, ids)
    if record.ok and pending.anomaly_approval is None:
        record.add_trace(Check("anomaly", True, tuple(g.id for g in gates)))
