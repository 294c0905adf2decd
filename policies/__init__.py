"""
The policy language and its evaluator: default deny, every decision explained.

Permissions are Cedar policies (evaluated with ``cedarpy``); the YAML document
names them and carries what Cedar cannot: sandbox limits, rate limits and
quotas, approvals, data-flow labels and result rules.

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
    OpenAnomalies,
)
from callward.policies._approvals import ApprovalRefused, ApprovalSigner
from callward.policies._document import PolicyDocument, Rule, load_policy, parse_policy
from callward.policies._evaluator import (
    DEFAULT_DENY_RULE,
    UNKNOWN_TOOL_RULE,
    Check,
    Policy,
    ReloadResult,
    Trace,
)
from callward.policies._state import PolicyState, Proposal

__all__ = [
    "ANOMALY_METRICS",
    "DEFAULT_DENY_RULE",
    "UNKNOWN_TOOL_RULE",
    "Anomaly",
    "AnomalyState",
    "AnomalyStateUnavailable",
    "ApprovalRefused",
    "ApprovalSigner",
    "Check",
    "OpenAnomalies",
    "Policy",
    "PolicyDocument",
    "PolicyState",
    "Proposal",
    "ReloadResult",
    "Rule",
    "Trace",
    "load_policy",
    "parse_policy",
]
