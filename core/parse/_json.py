"""
Call objects without tags, as small models write them: ``{"name": ..., "arguments": {...}}``
in a fenced ```` ```json ```` block, or bare at the start of a line (one or several, or a
list of them). ``parameters`` is read as ``arguments`` (Llama's spelling).

JSON that is not shaped like a call (no ``name`` with ``arguments``) is text, not a
call; JSON that fails to decode but names a ``name`` key is a call that cannot be
read, and is refused.
"""

from __future__ import annotations

import json
import re
from typing import Final

from callward.core._canonical import STRICT_DECODER
from callward.core.parse._common import (
    Found,
    NewId,
    Read,
    Scan,
    Spans,
    arguments_from,
    call_id,
    fail,
    make_call,
    skip_ws,
)
from callward.core.types import Dialect

_FENCE_OPEN: Final = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\r?\n")
_CALL_FENCES: Final = frozenset({"", "json", "JSON", "tool_call", "tool_code"})
_FENCE_CLOSE: Final = "```"
# A JSON value at a line start, or right after Llama's <|python_tag|>.
_LINE_JSON: Final = re.compile(r"(?:^[ \t]*|<\|python_tag\|>\s*)([{\[])", re.MULTILINE)
_NAME_KEY: Final = re.compile(r"""["']name["']\s*:""")
_CALL_KEYS: Final = frozenset({"name", "arguments", "parameters", "id", "type"})


def is_call_object(value: object) -> bool:
    return isinstance(value, dict) and "name" in value and (
        "arguments" in value or "parameters" in value
    )


def call_from_object(
    document: dict[str, object], offset: int, end: int, dialect: Dialect, new_id: NewId
) -> Found:
    """
    The call a call object states, as ``dialect``.

    Raises:
        MalformedCall: Unexpected keys, both ``arguments`` and ``parameters``, or a
            ``type`` other than function.
    """
    unexpected = sorted(set(document) - _CALL_KEYS)
    if unexpected:
        raise fail(f"unexpected keys {unexpected}", offset, dialect)
    if "arguments" in document and "parameters" in document:
        raise fail("give arguments or parameters, not both", offset, dialect)
    if document.get("type", "function") != "function":
        raise fail("a call has no type other than function", offset, dialect)
    given_id = call_id(document.get("id"), "the id", offset, dialect)
    raw = document["arguments"] if "arguments" in document else document.get("parameters")
    return Found(
        offset,
        make_call(
            call_id=given_id or new_id(),
            name=document.get("name"),
            arguments=arguments_from(raw, offset, dialect),
            dialect=dialect,
            offset=offset,
        ),
        end,
    )


def _calls_from_value(
    value: object, offset: int, end: int, dialect: Dialect, new_id: NewId
) -> list[Found] | None:
    """The calls a decoded JSON value states, or None when it is data, not calls."""
    if isinstance(value, dict):
        return [call_from_object(value, offset, end, dialect, new_id)] if is_call_object(
            value) else None
    if isinstance(value, list) and value and any(is_call_object(item) for item in value):
        if not all(is_call_object(item) for item in value):
            raise fail("a list of calls holds something that is not a call", offset, dialect)
        return [call_from_object(item, offset, end, dialect, new_id)
                for item in value]
    return None


def _decode_candidate(
    text: str, index: int, dialect: Dialect
) -> tuple[object, int] | None:
    """
    Decode the JSON value at ``index``; None when it fails and does not look like a call.

    A value that fails to decode and names a ``name`` key was meant as a call: it is
    refused with the offset where decoding stopped, never repaired.
    """
    try:
        return STRICT_DECODER.raw_decode(text, index)
    except json.JSONDecodeError as exc:
        line_end = text.find("\n", index)
        region = text[index : max(exc.pos, len(text) if line_end == -1 else line_end)]
        if _NAME_KEY.search(region):
            raise fail(f"invalid JSON ({exc.msg})", exc.pos, dialect) from exc
        return None
    except (ValueError, RecursionError) as exc:
        raise fail(f"invalid JSON ({exc})", index, dialect) from exc


def read_fenced(text: str, scan: Scan) -> Read:
    """The calls of every fenced block; it claims each block, fence to fence."""
    found: list[Found] = []
    spans: list[tuple[int, int]] = []
    position = 0
    while match := _FENCE_OPEN.search(text, position):
        index = skip_ws(text, match.end())
        # Code in another language is the model's prose, never a call.
        while match.group(1) in _CALL_FENCES and index < len(text) and text[index] in "{[":
            decoded = _decode_candidate(text, index, "json")
            if decoded is None:
                break
            value, after = decoded
            calls = _calls_from_value(value, index, after, "json", scan.new_id)
            if calls is None:
                break
            found.extend(calls)
            index = skip_ws(text, after)
        # The fence closes after the last call read: a JSON string may hold backticks.
        close = text.find(_FENCE_CLOSE, index)
        end = len(text) if close == -1 else close + len(_FENCE_CLOSE)
        spans.append((match.start(), end))
        position = end
    return Read(found, tuple(spans))


def read_bare(text: str, scan: Scan) -> Read:
    """Call objects standing at the start of a line, outside everything ``scan.taken``."""
    found: list[Found] = []
    position = 0
    while match := _LINE_JSON.search(text, position):
        index = match.start(1)
        inside = next((end for start, end in scan.taken if start <= index < end), None)
        if inside is not None:
            position = inside
            continue
        decoded = _decode_candidate(text, index, "json")
        if decoded is None:
            position = index + 1
            continue
        value, after = decoded
        calls = _calls_from_value(value, index, after, "json", scan.new_id)
        if calls is not None:
            found.extend(calls)
        position = after
    return Read.of_calls(found)


def call_object_spans(text: str) -> Spans:
    """
    Where call objects stand at line starts or after ``<|python_tag|>``: tags and call
    syntax inside their JSON strings are data, never calls of their own.
    """
    spans: list[tuple[int, int]] = []
    position = 0
    while match := _LINE_JSON.search(text, position):
        index = match.start(1)
        try:
            value, after = STRICT_DECODER.raw_decode(text, index)
        except (ValueError, RecursionError):
            position = index + 1
            continue
        if is_call_object(value) or (
            isinstance(value, list) and any(is_call_object(item) for item in value)
        ):
            spans.append((index, after))
        position = max(after, index + 1)
    return tuple(spans)
