"""
Llama's ``<|python_tag|>``: after the tag, JSON call objects, ``name.call(k=v, ...)``
calls with JSON values, or a pythonic list (see ``_pythonic``), separated by ``;``,
up to ``<|eom_id|>``, ``<|eot_id|>``, the next tag or the end of the message; and
Llama 3.1's user-defined ``<function=name>{...}</function>`` tags.
"""

from __future__ import annotations

import re
from typing import Final

from callward.core.parse._common import (
    Found,
    Read,
    Scan,
    decode_at,
    fail,
    inside,
    make_call,
    skip_ws,
)
from callward.core.parse._json import call_from_object, is_call_object
from callward.core.parse._pythonic import pythonic_found

_PYTHON_TAG: Final = "<|python_tag|>"
_END: Final = re.compile(r"<\|eom_id\|>|<\|eot_id\|>|<\|python_tag\|>")
_CALL: Final = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\.call)?\s*\(")
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _keywords(text: str, index: int) -> tuple[dict[str, object], int]:
    """``k=v, ...)`` with JSON values; returns the arguments and the index after ')'."""
    arguments: dict[str, object] = {}
    index = skip_ws(text, index)
    if index < len(text) and text[index] == ")":
        return arguments, index + 1
    while True:
        key = _IDENTIFIER.match(text, index)
        if key is None:
            raise fail("expected an argument name", index, "llama")
        index = skip_ws(text, key.end())
        if index >= len(text) or text[index] != "=":
            raise fail("expected '=' after the argument name", index, "llama")
        if key.group() in arguments:
            raise fail("an argument is given twice", key.start(), "llama")
        value, index = decode_at(text, skip_ws(text, index + 1), "llama")
        arguments[key.group()] = value
        index = skip_ws(text, index)
        if index < len(text) and text[index] == ",":
            index = skip_ws(text, index + 1)
            continue
        if index < len(text) and text[index] == ")":
            return arguments, index + 1
        raise fail("expected ',' or ')'", index, "llama")


def read_python_tag(text: str, scan: Scan) -> Read:
    """The calls after every tag outside ``scan.protected``; it claims each tag's region."""
    found: list[Found] = []
    spans: list[tuple[int, int]] = []
    position = 0
    while (start := text.find(_PYTHON_TAG, position)) != -1:
        if inside(scan.protected, start):
            position = start + len(_PYTHON_TAG)
            continue
        end_match = _END.search(text, start + len(_PYTHON_TAG))
        end = len(text) if end_match is None else end_match.start()
        spans.append((start, end))
        index = skip_ws(text, start + len(_PYTHON_TAG))
        if index >= end:
            raise fail(f"{_PYTHON_TAG} is followed by no call", index, "llama")
        while index < end:
            if text[index] == "[":
                after = len(text[:end].rstrip())
                found.extend(pythonic_found(text, index, after, scan.new_id))
            elif text[index] == "{":
                value, after = decode_at(text, index, "llama")
                if not isinstance(value, dict) or not is_call_object(value):
                    raise fail("expected an object with name and parameters", index, "llama")
                found.append(call_from_object(value, index, after, "llama", scan.new_id))
            else:
                call = _CALL.match(text, index)
                if call is None:
                    raise fail("expected a JSON call or name(key=value, ...)", index, "llama")
                arguments, after = _keywords(text, call.end())
                found.append(Found(index, make_call(call_id=scan.new_id(), name=call.group(1),
                                                    arguments=arguments, dialect="llama",
                                                    offset=index), after))
            index = skip_ws(text, after)
            if index < end and text[index] == ";":
                index = skip_ws(text, index + 1)
            elif index < end:
                raise fail("expected ';' between calls", index, "llama")
        position = end
    return Read(found, tuple(spans))


# --- <function=name>{...}</function> ------------------------------------------

_FUNCTION_OPEN: Final = "<function="
_FUNCTION_CLOSE: Final = "</function>"
_FUNCTION_NAME: Final = re.compile(r"([A-Za-z_][A-Za-z0-9_.-]{0,127})>")


def read_function_tag(text: str, scan: Scan) -> Read:
    """
    Llama 3.1's user-defined format, ``<function=name>{"k": v}</function>``, as Meta's
    prompt-format guide defines it and ``ToolUtils.encode_tool_call`` writes it: one
    JSON object of arguments per tag, several tags per message. The JSON is decoded
    before the closing tag is looked for (a string may hold ``</function>``); a tag
    that is not closed, holds anything but one JSON object (Qwen3-Coder's
    ``<parameter=...>`` form included), or a stray closing tag, is refused.
    """
    found: list[Found] = []
    position = 0
    while (start := text.find(_FUNCTION_OPEN, position)) != -1:
        _refuse_stray_function_close(text, position, start, scan)
        if inside(scan.protected, start) or inside(scan.taken, start):
            position = start + len(_FUNCTION_OPEN)
            continue
        name = _FUNCTION_NAME.match(text, start + len(_FUNCTION_OPEN))
        if name is None:
            raise fail("expected a tool name and '>' after <function=",
                       start + len(_FUNCTION_OPEN), "llama")
        body = skip_ws(text, name.end())
        if not text.startswith("{", body):
            raise fail("expected a JSON object of arguments after <function=name>", body,
                       "llama")
        arguments, after = decode_at(text, body, "llama")
        close = skip_ws(text, after)
        if not text.startswith(_FUNCTION_CLOSE, close):
            reason = "is never closed" if close >= len(text) else "holds text after its JSON"
            raise fail(f"<function={name.group(1)}> {reason}", close, "llama")
        found.append(Found(start, make_call(call_id=scan.new_id(), name=name.group(1),
                                            arguments=arguments, dialect="llama",
                                            offset=body), close + len(_FUNCTION_CLOSE)))
        position = close + len(_FUNCTION_CLOSE)
    _refuse_stray_function_close(text, position, len(text), scan)
    return Read.of_calls(found)


def _refuse_stray_function_close(text: str, start: int, end: int, scan: Scan) -> None:
    while (stray := text.find(_FUNCTION_CLOSE, start, end)) != -1:
        if not (inside(scan.protected, stray) or inside(scan.taken, stray)):
            raise fail(f"{_FUNCTION_CLOSE} without an opening tag", stray, "llama")
        start = stray + len(_FUNCTION_CLOSE)
