"""
JSON Schema (2020-12) validation of a call's arguments against its tool.

Validators are built once per tool digest with an explicit format checker
and an empty ``referencing`` registry, so no remote ``$ref`` is ever fetched.
A violation is reported by where it is (a JSON path) and which keyword failed,
never by the offending value, which may be a secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from threading import Lock

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry

from callward.core import ToolCall, ToolSpec


@dataclass(frozen=True, slots=True)
class SchemaViolation:
    json_path: str
    keyword: str
    count: int

    @property
    def message(self) -> str:
        more = f" (and {self.count - 1} more)" if self.count > 1 else ""
        return f"the arguments fail the tool's schema at {self.json_path} ({self.keyword}){more}"


class SchemaCheck:
    """Checks arguments against the tool's schema; validators are cached by tool digest."""

    def __init__(self) -> None:
        self._validators: dict[str, Draft202012Validator] = {}
        self._lock = Lock()

    def _validator(self, spec: ToolSpec) -> Draft202012Validator:
        validator = self._validators.get(spec.digest)
        if validator is None:
            schema = spec.parameters
            Draft202012Validator.check_schema(schema)
            validator = Draft202012Validator(
                schema,
                format_checker=Draft202012Validator.FORMAT_CHECKER,
                registry=Registry(),
            )
            with self._lock:
                self._validators[spec.digest] = validator
        return validator

    def violation(self, call: ToolCall, spec: ToolSpec) -> SchemaViolation | None:
        """
        The first violation of the schema, or None when the arguments conform.

        Any failure inside validation (an unresolvable ``$ref``, a broken
        schema) is itself a violation: the check fails closed.
        """
        try:
            errors = list(self._validator(spec).iter_errors(call.arguments))
        except Exception as exc:  # noqa: BLE001 - a check that cannot finish denies
            return SchemaViolation("$", f"validation failed: {type(exc).__name__}", 1)
        if not errors:
            return None
        best = best_match(errors)
        if best is None:  # pragma: no cover - best_match of a non-empty list
            return SchemaViolation("$", "unknown", len(errors))
        return SchemaViolation(best.json_path, str(best.validator), len(errors))
