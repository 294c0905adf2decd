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

from callward.core import JSONValue

REDACTED: Final = "[REDACTED]"


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
