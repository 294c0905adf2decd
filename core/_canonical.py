"""
The one definition of the bytes callward hashes and signs: RFC 8785 (JCS).

Nothing in callward hashes or signs a ``dict`` or a ``str`` directly; it
hashes ``canonical_bytes(value)``. The audit log, argument digests and tool
digests therefore agree byte for byte with any other JCS implementation.
"""

from __future__ import annotations

import hashlib
import json
import math
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

    Values made only of plain ``dict``/``list``/``tuple``/``str``/``int``/``bool``/
    ``None`` and floats whose JCS text is Python's own are written by the standard
    library's C encoder (``_fit`` says which); anything else goes to ``rfc8785``,
    which stays the definition: the tests check both give the same bytes (or both
    refuse) for any value.

    Raises:
        CanonicalizationError: The value is not representable in I-JSON.
    """
    try:
        return _FAST_ENCODER.encode(_fit(value, 0)).encode("utf-8")
    except (_NotFast, ValueError, RecursionError):
        pass  # e.g. a lone surrogate: rfc8785 refuses it with its own error
    try:
        return rfc8785.dumps(value)  # type: ignore[arg-type] # checked by rfc8785 itself
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError) as exc:
        raise CanonicalizationError(f"not canonical JSON: {type(exc).__name__}") from exc


class _NotFast(Exception):
    """The value needs ``rfc8785`` itself (or is not I-JSON, which rfc8785 then says)."""


# Sorted keys, no whitespace, UTF-8 kept as is, and no NaN: RFC 8785 for the values
# ``_fit`` lets through. Its string escaping is JCS's (\b \t \n \f \r, \u00xx in
# lower case for the other controls, \" and \\) and it sorts keys by code point,
# which is UTF-16 order for keys without characters past U+FFFF.
_FAST_ENCODER: Final = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":"),
    check_circular=False,
)
_FAST_MAX_DEPTH: Final = 128
# JCS writes a float as Python's repr does when it is not integral and 1e-4 <= |f| < 1e16
# (rfc8785 takes its digits from repr and only moves the point outside that range);
# an integral float below 1e16 is written as the integer.
_FIXED_LOW: Final = 1e-4
_FIXED_HIGH: Final = 1e16


def _fit(value: object, depth: int) -> object:
    """
    ``value`` ready for ``_FAST_ENCODER`` (integral floats as ints), or ``_NotFast``.

    Raises:
        _NotFast: Something in ``value`` is not written the JCS way by the C encoder.
    """
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        if -_SAFE_INTEGER <= value <= _SAFE_INTEGER:  # type: ignore[operator] # an int
            return value
        raise _NotFast
    if kind is float:
        return _fit_float(value)  # type: ignore[arg-type] # a float
    if depth >= _FAST_MAX_DEPTH:
        raise _NotFast
    if kind is dict:
        return _fit_dict(value, depth)  # type: ignore[arg-type] # a dict
    if kind is list or kind is tuple:
        return _fit_items(value, depth)  # type: ignore[arg-type] # a list or tuple
    raise _NotFast


def _fit_float(number: float) -> float | int:
    magnitude = abs(number)
    if number.is_integer() and magnitude < _FIXED_HIGH:
        return int(number)
    if _FIXED_LOW <= magnitude < _FIXED_HIGH:
        return number
    raise _NotFast


def _fit_dict(mapping: dict[object, object], depth: int) -> dict[object, object]:
    fitted: dict[object, object] | None = None
    for key, item in mapping.items():
        if type(key) is not str or not (key.isascii() or max(key) <= "\uffff"):
            raise _NotFast
        kind = type(item)
        if kind is str or item is None or kind is bool:
            continue  # most leaves: no call for them
        new = _fit(item, depth + 1)
        if new is not item:
            if fitted is None:
                fitted = dict(mapping)
            fitted[key] = new
    return mapping if fitted is None else fitted


def _fit_items(
    items: list[object] | tuple[object, ...], depth: int
) -> list[object] | tuple[object, ...]:
    fitted: list[object] | None = None
    for index, item in enumerate(items):
        kind = type(item)
        if kind is str or item is None or kind is bool:
            continue
        new = _fit(item, depth + 1)
        if new is not item:
            if fitted is None:
                fitted = list(items)
            fitted[index] = new
    return items if fitted is None else fitted


def sha256_hex(data: bytes, *, domain: bytes = b"") -> Sha256Hex:
    """SHA-256 of ``domain || data``, as lower-case hex."""
    return Sha256Hex(hashlib.sha256(domain + data).hexdigest())


def non_ijson_path(value: object, path: str = "$") -> str | None:
    """
    The JSON path of the first value in ``value`` that I-JSON (RFC 7493) cannot hold:
    an integer beyond +-(2**53 - 1), a float that is not finite, a string with a lone
    surrogate, a key that is not a string; None if there is none.
    """
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not _encodes(key):
                return path
            found = non_ijson_path(item, path + _step(key))
            if found is not None:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = non_ijson_path(item, f"{path}[{index}]")
            if found is not None:
                return found
        return None
    return None if _is_ijson_scalar(value) else path


def _is_ijson_scalar(value: object) -> bool:
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return abs(value) <= _SAFE_INTEGER
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and _encodes(value)


#: The marker key of a value a record holds as its digest (``elide_large_values``).
ELIDED_KEY: Final = "$elided"
_ELIDED_PREFIX_CHARS: Final = 64


def elide_large_values(value: JSONValue, max_value_bytes: int, path: str = "$"
                       ) -> tuple[JSONValue, tuple[str, ...]]:
    """
    ``value`` with every part whose canonical bytes exceed ``max_value_bytes`` replaced
    by ``{"$elided": {"sha256", "bytes", "prefix"}}`` -- the SHA-256 and length of that
    part's RFC 8785 bytes and its first characters -- and the JSON paths replaced.

    An object or array is elided whole only if it is still too large once its own
    parts are: a long string inside stays the only thing elided. A reviewer holding
    the exact arguments checks them against the record by hashing each elided part.
    """
    data = canonical_bytes(value)
    if len(data) <= max_value_bytes:
        return value, ()
    bounded: JSONValue = value
    paths: tuple[str, ...] = ()
    if isinstance(value, dict):
        parts = {key: elide_large_values(item, max_value_bytes, path + _step(key))
                 for key, item in value.items()}
        bounded = {key: part for key, (part, _) in parts.items()}
        paths = tuple(p for _, found in parts.values() for p in found)
    elif isinstance(value, list):
        items = [elide_large_values(item, max_value_bytes, f"{path}[{index}]")
                 for index, item in enumerate(value)]
        bounded = [part for part, _ in items]
        paths = tuple(p for _, found in items for p in found)
    if paths and len(canonical_bytes(bounded)) <= max_value_bytes:
        return bounded, paths
    text = value if isinstance(value, str) else data.decode("utf-8")
    return {ELIDED_KEY: {"sha256": sha256_hex(data), "bytes": len(data),
                         "prefix": text[:_ELIDED_PREFIX_CHARS]}}, (path,)


def _step(key: str) -> str:
    return f".{key}" if key.isidentifier() else f"[{json.dumps(key)}]"


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    # json.loads(data, parse_int=...) without building a decoder per call. Bytes
    # that start with neither a BOM nor a NUL are UTF-8 to json.detect_encoding.
    if isinstance(data, str):
        text = data
    elif data[:1] not in _NOT_PLAIN_UTF8 and data[1:2] != b"\x00":
        text = data.decode("utf-8", "surrogatepass")
    else:
        text = data.decode(json.detect_encoding(data), "surrogatepass")
    return _CANONICAL_DECODER.decode(text)


_NOT_PLAIN_UTF8: Final = (b"", b"\x00", b"\xef", b"\xfe", b"\xff")


_CANONICAL_DECODER: Final = json.JSONDecoder(parse_int=_parse_canonical_int)


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
