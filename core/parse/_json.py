"""
Call objects without tags, as small models write them: ``{"name": ..., "arguments": {...}}``
in a fenced ```` ```json ```` block, or bare at the start of a line (one or several, or a
list of them). ``parameters`` is read as ``arguments`` (Llama's spelling).

Several call objects in a row are all read, in order: one per line, or on one line
separated by nothing, ``;`` or ``,`` (``{…}; {…}``, ``{…} {…}``, ``{…},{…}``). A call
object standing inside a line of prose (not at its start, not after a call) is
refused: reading it could run a call the model was only describing, and dropping it
would lose a call the model meant. In a call fence, anything after the calls but
before the closing fence is refused for the same reason.

JSON that is not shaped like a call (no ``name`` with ``arguments``) is text, not a
call; JSON that fails to decode but names a ``name`` key is a call that cannot be
read, and is refused.
"""

from __future__ import annotations

import re
from typing import Final

from callward.core.parse._common import (
    Found,
    JSONError,
    NewId,
    Read,
    Scan,
    Spans,
    arguments_from,
    call_id,
    decode_json,
    fail,
    make_call,
    skip_ws,
)
from callward.core.types import Dialect

_FENCE_OPEN: Final = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\r?\n")
_CALL_FENCES: Final = frozenset({"", "json", "JSON", "tool_call", "tool_code"})
_FENCE_CLOSE: Final = "```"
_NAME_KEY: Final = re.compile(r"""["']name["']\s*:""")
# Where another JSON value may follow a call on the same line: blanks, then ';' or ','.
_SEQUENCE_GAP: Final = re.compile(r"[ \t]*(?:[;,][ \t]*)?")
# A line-start JSON value, or an object opening with a key anywhere else.
_ANY_JSON: Final = re.compile(
    r"(?:^[ \t]*|<\|python_tag\|>\s*)([{\[])|(\{)(?=\s*\")", re.MULTILINE)
# The markers after which a JSON body stands, in the order they are looked for.
_MARKED_JSON: Final = re.compile(
    r"<tool_call>\s*|\[TOOL_CALLS\]\s*|\[ARGS\]\s*|<function=[^>\n]{0,256}>\s*"
    r"|<\|python_tag\|>\s*|^[ \t]*(?=[{\[])",
    re.MULTILINE,
)
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
        return decode_json(text, index)
    except JSONError as exc:
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
        read_any = False
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
            read_any = True
            index = skip_ws(text, after)
            if index < len(text) and text[index] in ";,":
                index = skip_ws(text, index + 1)
        # The fence closes after the last call read: a JSON string may hold backticks.
        close = text.find(_FENCE_CLOSE, index)
        if read_any and text[index : len(text) if close == -1 else close].strip():
            raise fail("unexpected text after the calls in a fenced block", index, "json")
        end = len(text) if close == -1 else close + len(_FENCE_CLOSE)
        spans.append((match.start(), end))
        position = end
    return Read(found, tuple(spans))


def read_bare(text: str, scan: Scan) -> Read:
    """
    Call objects at the start of a line (and those following one on its line), outside
    everything ``scan.taken``; a call object elsewhere in prose is refused.
    """
    found: list[Found] = []
    position = 0
    while match := _ANY_JSON.search(text, position):
        index = match.start(1) if match.group(1) else match.start(2)
        inside = next((end for start, end in scan.taken if start <= index < end), None)
        if inside is not None:
            position = inside
            continue
        if not match.group(1):
            position = _refuse_call_in_prose(text, index)
            continue
        decoded = _decode_candidate(text, index, "json")
        if decoded is None:
            position = index + 1
            continue
        value, after = decoded
        calls = _calls_from_value(value, index, after, "json", scan.new_id)
        if calls is not None:
            found.extend(calls)
            after = _read_sequence(text, after, found, scan)
        position = after
    return Read.of_calls(found)


def _read_sequence(text: str, after: int, found: list[Found], scan: Scan) -> int:
    """The calls that follow a call on its line (``{…}; {…}``); returns where they end."""
    while True:
        gap = _SEQUENCE_GAP.match(text, after)
        index = gap.end() if gap else after
        if index >= len(text) or text[index] not in "{[":
            return after
        decoded = _decode_candidate(text, index, "json")
        if decoded is None:
            raise fail("a call is followed by JSON that cannot be read", index, "json")
        value, end = decoded
        calls = _calls_from_value(value, index, end, "json", scan.new_id)
        if calls is None:
            raise fail("a call is followed by JSON that is not a call", index, "json")
        found.extend(calls)
        after = end


def _refuse_call_in_prose(text: str, index: int) -> int:
    """An object inside a line of prose is data unless it is a call, which is refused."""
    try:
        value, after = decode_json(text, index)
    except (ValueError, RecursionError):
        return index + 1
    if is_call_object(value):
        raise fail("a call object inside a line of prose; write each call at the start of "
                   "a line", index, "json")
    return after


def call_object_spans(text: str) -> Spans:
    """
    The JSON bodies of calls, found in text order before any reader runs: call objects
    at line starts, and the JSON after ``<tool_call>``, ``[TOOL_CALLS]``, ``[ARGS]``,
    ``<function=name>`` and ``<|python_tag|>``. Tags and call syntax inside their JSON
    strings are data, never calls of their own. A body that does not decode is not
    protected; its reader refuses it.
    """
    spans: list[tuple[int, int]] = []
    position = 0
    while match := _MARKED_JSON.search(text, position):
        index = match.end()
        if index >= len(text) or text[index] not in "{[":
            position = max(index, match.start() + 1)
            continue
        try:
            value, after = decode_json(text, index)
        except (ValueError, RecursionError):
            position = index + 1
            continue
        at_line_start = not match.group().strip()
        if not at_line_start or is_call_object(value) or (
            isinstance(value, list) and any(is_call_object(item) for item in value)
        ):
            spans.append((index, after))
        position = max(after, index + 1)
    return tuple(spans)
