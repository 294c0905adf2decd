"""
Result rules: redaction before a result reaches the model, and what the audit keeps.

Redaction walks the result's JSON and replaces every match of the rules'
patterns inside strings (keys and values) with ``[REDACTED]``; the result
stays valid JSON. The audit keeps the redacted body only when a rule says
``audit_body: body``; otherwise only its hash.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from callward.core import JSONValue, canonical_bytes
from callward.core._canonical import canonical_loads
from callward.core.types import ResultTreatment
from callward.policies._document import ResultRule

REDACTED: Final = "[REDACTED]"


def treat(rules: Sequence[ResultRule], content_json: bytes, labels: frozenset[str]
          ) -> ResultTreatment:
    """Redaction and what the audit keeps, by the result rules that apply."""
    patterns = [p for rule in rules for p in rule.redact]
    content, redactions = content_json, 0
    if patterns:
        value, redactions = redact(canonical_loads(content_json), patterns)
        if redactions:
            content = canonical_bytes(value)
    keep = [rule.audit_body for rule in rules if rule.audit_body is not None]
    return ResultTreatment(
        content_json=content,
        keep_body=bool(keep) and keep[-1] == "body",
        labels=tuple(sorted(labels)),
        rules=tuple(rule.id for rule in rules),
        redactions=redactions,
    )


def redact(value: JSONValue, patterns: Sequence[re.Pattern[str]]) -> tuple[JSONValue, int]:
    """The value with every match replaced, and how many were replaced."""
    if isinstance(value, str):
        count = 0
        for pattern in patterns:
            value, n = pattern.subn(REDACTED, value)
            count += n
        return value, count
    if isinstance(value, list | tuple):
        total = 0
        items = []
        for item in value:
            new, n = redact(item, patterns)
            items.append(new)
            total += n
        return items, total
    if isinstance(value, dict):
        total = 0
        mapping: dict[str, JSONValue] = {}
        for key, item in value.items():
            new_key, n = redact(key, patterns)
            new, m = redact(item, patterns)
            mapping[str(new_key)] = new
            total += n + m
        return mapping, total
    return value, 0
