"""
Data-flow labels: where a labelled result may go, judged per value or per session.

A result carries its tool's ``output_labels``. A call whose provenance is
known (``CallContext.provenance``: a plan step, whose arguments are literals
or ``$ref`` values from earlier calls) is checked **per value**: each argument
carries the labels recorded for the result it came from, plus, transitively,
whatever that result inherited; its own result inherits them too unless the
tool ``declassifies`` them. Another call of the same session that takes
nothing from a labelled result is allowed. A source the policy never recorded
in the session is judged by the session's labels; literal arguments carry the
labels of every result the session saw without provenance (a model that read
it may have written the plan). A call without provenance (a model-emitted
call: nobody knows which earlier result the model copied from) keeps the
strict session rule: once any result of the session was labelled, no call of
that session may reach a sink the flow rule names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from callward.core import CallContext, canonical_bytes
from callward.core.types import Provenance
from callward.policies._document import PolicyDocument
from callward.policies._state import PolicyStateStore
from callward.policies._trace import Check, CheckRecord

_IDENTIFIER: Final = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")


def labels_session_key(context: CallContext) -> str:
    """Labels are kept per principal and session; calls without a session share one."""
    return canonical_bytes([context.principal, context.session_id]).decode()


def pointer_to_json_path(pointer: str) -> str:
    """``/hits/0/text`` as the ``$.hits[0].text`` form the other checks report."""
    path = "$"
    for token in pointer.split("/")[1:] if pointer else ():
        key = token.replace("~1", "/").replace("~0", "~")
        if key.isdigit():
            path += f"[{key}]"
        elif _IDENTIFIER.match(key):
            path += f".{key}"
        else:
            path += "[" + canonical_bytes(key).decode() + "]"
    return path


@dataclass(frozen=True, slots=True)
class Inflow:
    """The labels one argument (an RFC 6901 pointer; "" for every literal) brings in."""

    argument: str
    labels: frozenset[str]
    origin: str


def inflows_of(state: PolicyStateStore, context: CallContext, session_labels: frozenset[str]
               ) -> tuple[Inflow, ...] | None:
    """
    Per argument, the labels it brings in; None when the provenance is unknown.

    Raises:
        StateUnavailable: The recorded labels cannot be read.
    """
    provenance = context.provenance
    if provenance is None:
        return None
    key = labels_session_key(context)
    known = (state.call_labels(key, [edge.source_call_id for edge in provenance.edges])
             if provenance.edges else {})
    # Literals carry what the caller says, and whatever a call of this session without
    # provenance (a model's) saw: the model may have written it into the plan.
    literals = provenance.literal_labels | state.unattributed_labels(key)
    found = [Inflow("", literals, "a literal value")]
    for edge in provenance.edges:
        # A source never recorded in this session is judged by the whole session.
        labels = known.get(edge.source_call_id, session_labels)
        found.append(Inflow(edge.argument, labels,
                            f"the value from step {edge.source_step!r}"))
    return tuple(found)


def inherited(state: PolicyStateStore, context: CallContext, provenance: Provenance
              ) -> frozenset[str]:
    """
    The labels a call's arguments brought in, which its result carries on.

    Raises:
        StateUnavailable: The recorded labels cannot be read.
    """
    session_labels = (state.session_labels(labels_session_key(context))
                      if provenance.edges else frozenset())
    brought = inflows_of(state, context, session_labels) or ()
    return frozenset().union(*(inflow.labels for inflow in brought))


def flow_check(document: PolicyDocument, labels: frozenset[str], *,
               session_labels: frozenset[str], inflows: tuple[Inflow, ...] | None,
               context: CallContext, record: CheckRecord) -> None:
    """Deny when labelled data may reach a tool labelled as a sink of a flow rule."""
    if not document.flows:
        return
    if inflows is None and context.provenance is not None:
        return  # the state was unreadable; that check already denies
    if inflows is None:
        flows = tuple(flow.id for flow in document.flows
                      if flow.sources & session_labels and flow.sinks & labels)
        if flows:
            record.add("flow", Check("flow", False, flows,
                                     "labelled data from this session may not reach "
                                     "this tool"))
        else:
            record.add("flow", Check("flow", True, ()))
        return
    hits = [(flow, inflow) for inflow in inflows for flow in document.flows
            if flow.sources & inflow.labels and flow.sinks & labels]
    if not hits:
        record.add("flow", Check("flow", True, ()))
        return
    flow, inflow = hits[0]
    carried = ", ".join(sorted(flow.sources & inflow.labels))
    record.add("flow", Check(
        "flow", False, tuple(dict.fromkeys(f.id for f, _ in hits)),
        f"{inflow.origin} carries {carried}, which may not reach this tool",
        pointer_to_json_path(inflow.argument)))
