"""
Argument constraints the policy document states outside Cedar.

A path argument confined to a root must, read as a POSIX path relative to
that root, stay inside it after ``..`` is resolved, and may hold no NUL, no
backslash and no control character. The check is on the text the tool will
receive; symbolic links inside the root are the tool's sandbox's concern.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping

from callward.core import JSONValue
from callward.policies._document import Confinement


def confinement_violation(confinement: Confinement, arguments: Mapping[str, JSONValue]
                          ) -> str | None:
    """The JSON path of the first argument that escapes its root, or None."""
    root = posixpath.normpath(confinement.root)
    for name in confinement.arguments:
        if name not in arguments:
            continue
        value = arguments[name]
        if not isinstance(value, str) or not _inside(root, value):
            return f"$.{name}"
    return None


def _inside(root: str, value: str) -> bool:
    if not value or any(ord(c) < 32 or c in {"\x7f", "\\"} for c in value):
        return False
    joined = posixpath.normpath(posixpath.join(root, value))
    return joined == root or joined.startswith(root.rstrip("/") + "/")
