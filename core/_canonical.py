"""
The one definition of the bytes callward hashes and signs: RFC 8785 (JCS).

Nothing in callward hashes or signs a ``dict`` or a ``str`` directly; it
hashes ``canonical_bytes(value)``. The audit log, argument digests and tool
digests therefore agree byte for byte with any other JCS implementation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, NewType, TypeAlias

import rfc8785

Sha256Hex = NewType("Sha256Hex", str)

JSONScalar: TypeAlias = bool | int | float | str | None
JSONValue: TypeAlias = JSONScalar | Sequence["JSONValue"] | Mapping[str, "JSONValue"]

#: Bounds on JSON that callward reads from outside (model text, files).
MAX_JSON_BYTES: Final = 1 << 20
MAX_JSON_DEPTH: Final = 64

#: Domain prefixes, so that a hash of one kind of thing never equals another's.
TOOL_DIGEST_DOMAIN: Final = b"callward.tool.v1\x00"
POLICY_DIGEST_DOMAIN: Final = b"callward.policy.v1\x00"


class CanonicalizationError(ValueError):
    """A value cannot be written as RFC 8785 JSON (NaN, a huge integer, a non-str key...)."""


def canonical_bytes(value: object) -> bytes:
    """
    Return the RFC 8785 canonical UTF-8 bytes of a JSON value.

    Raises:
        CanonicalizationError: The value is not representable in I-JSON.
    """
    try:
        return rfc8785.dumps(value)  # type: ignore[arg-type] # checked by rfc8785 itself
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError) as exc:
        raise CanonicalizationError(f"not canonical JSON: {type(exc).__name__}") from exc


def sha256_hex(data: bytes, *, domain: bytes = b"") -> Sha256Hex:
    """SHA-256 of ``domain || data``, as lower-case hex."""
    return Sha256Hex(hashlib.sha256(domain + data).hexdigest())


def canonical_sha256(value: object, *, domain: bytes = b"") -> Sha256Hex:
    """SHA-256 of the canonical bytes of a JSON value."""
    return sha256_hex(canonical_bytes(value), domain=domain)


_SAFE_INTEGER: Final = 2**53 - 1


def _parse_canonical_int(text: str) -> int | float:
    # JCS writes a float with an integral value (5.6e16) as digits; beyond the
    # I-JSON safe range only a float can have been meant.
    value = int(text)
    return float(value) if abs(value) > _SAFE_INTEGER else value


def canonical_loads(data: bytes) -> Any:
    """
    Decode canonical bytes back into the value they were made from.

    ``canonical_loads(canonical_bytes(v)) == v`` for any I-JSON value ``v``.
    """
    return json.loads(data, parse_int=_parse_canonical_int)


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError("duplicate key in JSON object")
        result[key] = value
    return result


def _depth(text: str) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


STRICT_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_reject_duplicate_keys,
    parse_constant=_reject_constant,
)


def check_json_bounds(text: str) -> None:
    """
    Refuse JSON text that is too large or too deeply nested, before parsing it.

    Raises:
        ValueError: The text is over ``MAX_JSON_BYTES`` or ``MAX_JSON_DEPTH``.
    """
    if len(text.encode("utf-8", "surrogatepass")) > MAX_JSON_BYTES:
        raise ValueError(f"JSON text is over {MAX_JSON_BYTES} bytes")
    if _depth(text) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON is nested deeper than {MAX_JSON_DEPTH} levels")


def strict_loads(text: str | bytes) -> object:
    """
    Parse JSON strictly: bounded size and depth, no NaN or Infinity, no duplicate keys.

    Raises:
        ValueError: The text is not strict JSON (``json.JSONDecodeError`` carries the offset).
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    check_json_bounds(text)
    return STRICT_DECODER.decode(text)
