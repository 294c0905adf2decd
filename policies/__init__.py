"""
The policy language and its evaluator: default deny, every decision explained.

Permissions are Cedar policies (evaluated with ``cedarpy``); the YAML document
names them and carries what Cedar cannot: sandbox limits, rate limits and
quotas, approvals, data-flow labels and result rules.

Inside, in the order a call meets them: ``_loader`` reads a document
(``_format`` is its schema, ``_document`` its model); ``_evaluator`` decides,
running ``_checks``, ``_flows``, ``_effects`` and ``_approvals`` and writing
each step to a ``_trace``; ``_results`` treats a result; ``_reload`` swaps a
changed file in. Policy authors use ``_lint`` (with ``_shapes``), ``_cases``
and ``_replay``. The policy's state (``_state``, ``_anomaly_state``) is a SQLite
file per gateway or, for a fleet, PostgreSQL (``_state_postgres``,
``_anomaly_state_postgres``, which load psycopg only when first used).

Example::

    >>> from callward.policies import Policy
    >>> policy = Policy.from_text('''
    ... version: 1
    ... default: deny
    ... principals: {alice: {roles: [analyst]}}
    ... rules:
    ...   - {id: analysts-square, effect: allow, roles: [analyst], tools: [square]}
    ... ''')
    >>> policy.document.roles_of("alice")
    frozenset({'analyst'})
"""

from callward.policies._anomaly_state import (
    ANOMALY_METRICS,
    Anomaly,
    AnomalyState,
    AnomalyStateUnavailable,
    AnomalyStore,
    OpenAnomalies,
)
from callward.policies._anomaly_state_postgres import PostgresAnomalyState
from callward.policies._approvals import ApprovalRefused, ApprovalSigner
from callward.policies._document import PolicyDocument, Rule
from callward.policies._evaluator import Policy
from callward.policies._loader import load_policy, parse_policy
from callward.policies._reload import ReloadResult
from callward.policies._state import PolicyState, PolicyStateStore, Proposal
from callward.policies._state_postgres import PostgresPolicyState
from callward.policies._trace import DEFAULT_DENY_RULE, UNKNOWN_TOOL_RULE, Check, Trace

__all__ = [
    "ANOMALY_METRICS",
    "DEFAULT_DENY_RULE",
    "UNKNOWN_TOOL_RULE",
    "Anomaly",
    "AnomalyState",
    "AnomalyStateUnavailable",
    "AnomalyStore",
    "ApprovalRefused",
    "ApprovalSigner",
    "Check",
    "OpenAnomalies",
    "Policy",
    "PolicyDocument",
    "PolicyState",
    "PolicyStateStore",
    "PostgresAnomalyState",
    "PostgresPolicyState",
    "Proposal",
    "ReloadResult",
    "Rule",
    "Trace",
    "load_policy",
    "parse_policy",
]
