"""
The policy language and its evaluator: default deny, every decision explained.

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

from callward.policies._document import PolicyDocument, Rule, load_policy, parse_policy
from callward.policies._evaluator import DEFAULT_DENY_RULE, UNKNOWN_TOOL_RULE, Policy

__all__ = [
    "DEFAULT_DENY_RULE",
    "UNKNOWN_TOOL_RULE",
    "Policy",
    "PolicyDocument",
    "Rule",
    "load_policy",
    "parse_policy",
]
