"""
Parsing of model output into ``ToolCall`` values, in three dialects.

- ``openai``: a chat-completions assistant message (or a whole response, or a
  bare list) whose ``tool_calls[].function.arguments`` is a JSON string.
- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  as Hermes and Qwen models write it; several per message.
- ``article``: ``call function("square", [3], 9)``: a name, positional (or
  named) arguments and an expected output that is compared afterwards, never
  trusted.

Invariants:

- Text either parses to exactly the calls it states, in order, or raises
  ``MalformedCall`` naming the character offset where reading failed. A
  message with one malformed call yields no calls at all.
- Only ``MalformedCall`` ever leaves ``parse_model_output``, whatever the text.
- JSON is read strictly: no NaN/Infinity, no duplicate keys, bounded size and depth.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from callward.core._canonical import (
    MAX_JSON_BYTES,
    STRICT_DECODER,
    CanonicalizationError,
    JSONValue,
    check_json_bounds,
    strict_loads,
)
from callward.core.errors import MalformedCall
from callward.core.types import Dialect, ToolCall

ParameterOrder = Callable[[str], tuple[str, ...] | None]
NewId = Callable[[], str]

MAX_CALLS_PER_MESSAGE: Final = 64
_HERMES_OPEN: Final = "<tool_call>"
_HERMES_CLOSE: Final = "</tool_call>"
_ARTICLE: Final = re.compile(r"\bcall\s+function\s*\(")
_WHITESPACE: Final = re.compile(r"\s*")


@dataclass(frozen=True, slots=True)
class _Found:
    offset: int
    call: ToolCall


def _fail(message: str, offset: int | None, dialect: str) -> MalformedCall:
    where = f" at offset {offset}" if offset is not None else ""
    return MalformedCall(f"{dialect} call{where}: {message}", offset=offset, dialect=dialect)


def _skip_ws(text: str, index: int) -> int:
    match = _WHITESPACE.match(text, index)
    return match.end() if match else index


def _decode_at(text: str, index: int, dialect: str) -> tuple[object, int]:
    try:
        return STRICT_DECODER.raw_decode(text, index)
    except json.JSONDecodeError as exc:
        raise _fail(f"invalid JSON ({exc.msg})", exc.pos, dialect) from exc
    except (ValueError, RecursionError) as exc:
        raise _fail(f"invalid JSON ({exc})", index, dialect) from exc


def _make_call(
    *,
    call_id: str,
    name: object,
    arguments: object,
    dialect: Dialect,
    offset: int,
    expected: JSONValue = None,
    has_expected: bool = False,
) -> ToolCall:
    if not isinstance(name, str) or not name:
        raise _fail("the tool name must be a non-empty string", offset, dialect)
    if not isinstance(arguments, dict):
        raise _fail("the arguments must be a JSON object", offset, dialect)
    try:
        return ToolCall.create(
            id=call_id,
            name=name,
            arguments=arguments,
            dialect=dialect,
            expected=expected,
            has_expected=has_expected,
        )
    except CanonicalizationError as exc:
        raise _fail(f"the arguments are not I-JSON ({exc})", offset, dialect) from exc
    except (TypeError, ValueError) as exc:
        raise _fail(str(exc), offset, dialect) from exc


def _arguments_from(value: object, offset: int, dialect: Dialect) -> object:
    """Arguments given as a JSON string (OpenAI's way) are decoded strictly."""
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            return strict_loads(value)
        except json.JSONDecodeError as exc:
            raise _fail(
                f"the arguments string is not JSON ({exc.msg} at its offset {exc.pos})",
                offset,
                dialect,
            ) from exc
        except ValueError as exc:
            raise _fail(f"the arguments string is not JSON ({exc})", offset, dialect) from exc
    return value


# --- openai -----------------------------------------------------------------


def _openai_tool_calls(document: object) -> list[object] | None:
    """The ``tool_calls`` list of a message, a response, or a bare list; None if absent."""
    if isinstance(document, list):
        return document
    if not isinstance(document, dict):
        return None
    if "choices" in document:
        choices = document["choices"]
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return None
        document = choices[0].get("message")
        if not isinstance(document, dict):
            return None
    calls = document.get("tool_calls")
    return calls if isinstance(calls, list) else None


def _parse_openai(document: object, new_id: NewId) -> list[_Found] | None:
    tool_calls = _openai_tool_calls(document)
    if tool_calls is None:
        return None
    found: list[_Found] = []
    for index, entry in enumerate(tool_calls):
        where = f"tool_calls[{index}]"
        if not isinstance(entry, dict):
            raise _fail(f"{where} is not an object", None, "openai")
        if entry.get("type", "function") != "function":
            raise _fail(f"{where} has a type other than function", None, "openai")
        function = entry.get("function")
        if not isinstance(function, dict):
            raise _fail(f"{where}.function is missing", None, "openai")
        call_id = entry.get("id")
        if call_id is not None and (not isinstance(call_id, str) or not call_id):
            raise _fail(f"{where}.id must be a non-empty string", None, "openai")
        arguments = _arguments_from(function.get("arguments", "{}"), index, "openai")
        found.append(
            _Found(
                index,
                _make_call(
                    call_id=call_id or new_id(),
                    name=function.get("name"),
                    arguments=arguments,
                    dialect="openai",
                    offset=index,
                ),
            )
        )
    return found


# --- hermes -----------------------------------------------------------------


def _parse_hermes(text: str, new_id: NewId) -> list[_Found]:
    found: list[_Found] = []
    position = 0
    while (start := text.find(_HERMES_OPEN, position)) != -1:
        _refuse_stray_close(text, position, start)
        body_start = _skip_ws(text, start + len(_HERMES_OPEN))
        if body_start >= len(text):
            raise _fail(f"{_HERMES_OPEN} is never closed", start, "hermes")
        # Decode first: a JSON string may itself contain the closing tag.
        document, after = _decode_at(text, body_start, "hermes")
        close = _skip_ws(text, after)
        if not text.startswith(_HERMES_CLOSE, close):
            if close >= len(text):
                raise _fail(f"{_HERMES_OPEN} is never closed", start, "hermes")
            raise _fail(
                f"unexpected text after the JSON object, before {_HERMES_CLOSE}", close, "hermes"
            )
        if not isinstance(document, dict):
            raise _fail("the tag must hold one JSON object", body_start, "hermes")
        unexpected = sorted(set(document) - {"name", "arguments", "id"})
        if unexpected:
            raise _fail(f"unexpected keys {unexpected}", body_start, "hermes")
        arguments = _arguments_from(document.get("arguments", {}), body_start, "hermes")
        call_id = document.get("id")
        if call_id is not None and (not isinstance(call_id, str) or not call_id):
            raise _fail("the id must be a non-empty string", body_start, "hermes")
        found.append(
            _Found(
                start,
                _make_call(
                    call_id=call_id or new_id(),
                    name=document.get("name"),
                    arguments=arguments,
                    dialect="hermes",
                    offset=body_start,
                ),
            )
        )
        position = close + len(_HERMES_CLOSE)
    _refuse_stray_close(text, position, len(text))
    return found


def _refuse_stray_close(text: str, start: int, end: int) -> None:
    """Outside the calls, a closing tag means the model lost track of its own tags."""
    stray = text.find(_HERMES_CLOSE, start, end)
    if stray != -1:
        raise _fail(f"{_HERMES_CLOSE} without an opening tag", stray, "hermes")


# --- article ----------------------------------------------------------------


def _article_arguments(
    name: str, values: object, offset: int, parameter_order: ParameterOrder
) -> dict[str, object]:
    if isinstance(values, dict):
        return values
    if not isinstance(values, list):
        raise _fail("the second argument must be a list or an object", offset, "article")
    order = parameter_order(name)
    if order is None:
        # Unknown tool: the gateway denies it by name; the values are not mapped.
        return {}
    if len(values) > len(order):
        raise _fail(
            f"{len(values)} positional arguments given, the tool takes {len(order)}",
            offset,
            "article",
        )
    return dict(zip(order, values, strict=False))


def _parse_article(text: str, new_id: NewId, parameter_order: ParameterOrder) -> list[_Found]:
    found: list[_Found] = []
    for match in _ARTICLE.finditer(text):
        values: list[object] = []
        index = _skip_ws(text, match.end())
        while True:
            if index >= len(text):
                raise _fail("the call is cut off before its closing ')'", index, "article")
            if text[index] == ")" and not values:
                raise _fail("the call names no tool", index, "article")
            value, index = _decode_at(text, index, "article")
            values.append(value)
            index = _skip_ws(text, index)
            if index >= len(text):
                raise _fail("the call is cut off before its closing ')'", index, "article")
            if text[index] == ",":
                index = _skip_ws(text, index + 1)
                continue
            if text[index] == ")":
                break
            raise _fail("expected ',' or ')'", index, "article")
        if len(values) > 3:
            raise _fail("a call takes a name, arguments and an expected output", index, "article")
        name = values[0]
        if not isinstance(name, str):
            raise _fail(
                "the first argument must be the tool name as a string", match.end(), "article"
            )
        arguments = _article_arguments(
            name, values[1] if len(values) > 1 else [], match.end(), parameter_order
        )
        found.append(
            _Found(
                match.start(),
                _make_call(
                    call_id=new_id(),
                    name=name,
                    arguments=arguments,
                    dialect="article",
                    offset=match.start(),
                    expected=values[2] if len(values) > 2 else None,  # type: ignore[arg-type]
                    has_expected=len(values) > 2,
                ),
            )
        )
    return found


# --- front ------------------------------------------------------------------


def _looks_like_json_document(text: str) -> bool:
    stripped = text.lstrip()
    return stripped.startswith(("{", "["))


def parse_model_output(
    text: str | Mapping[str, object],
    *,
    parameter_order: ParameterOrder,
    new_id: NewId,
) -> tuple[ToolCall, ...]:
    """
    Every call in one model message, in the order the model wrote them.

    Args:
        text: The model's text, or an already-decoded OpenAI-style message.
        parameter_order: A tool's property names in order (for positional arguments),
            or None for a tool the registry does not know.
        new_id: Makes an id for a call that carries none.

    Returns:
        The calls; an empty tuple when the message asks for no tool.

    Raises:
        MalformedCall: Some part of the message is a call that cannot be read.
    """
    if not isinstance(text, str):
        found = _parse_openai(dict(text), new_id)
        return tuple(item.call for item in found or [])
    try:
        check_json_bounds(text)
    except ValueError as exc:
        raise _fail(str(exc), None, "message") from exc
    if len(text) > MAX_JSON_BYTES:
        raise _fail("the message is too large", None, "message")
    if _looks_like_json_document(text):
        try:
            document = strict_loads(text)
        except json.JSONDecodeError as exc:
            if "tool_calls" in text:
                raise _fail(f"invalid JSON ({exc.msg})", exc.pos, "openai") from exc
            document = None
        except ValueError as exc:
            if "tool_calls" in text:
                raise _fail(f"invalid JSON ({exc})", None, "openai") from exc
            document = None
        if document is not None:
            openai = _parse_openai(document, new_id)
            if openai is not None:
                return _bounded(openai)
    found = _parse_hermes(text, new_id) + _parse_article(text, new_id, parameter_order)
    found.sort(key=lambda item: item.offset)
    return _bounded(found)


def _bounded(found: list[_Found]) -> tuple[ToolCall, ...]:
    if len(found) > MAX_CALLS_PER_MESSAGE:
        raise _fail(
            f"{len(found)} calls in one message, at most {MAX_CALLS_PER_MESSAGE}", None, "message"
        )
    ids = [item.call.id for item in found]
    if len(set(ids)) != len(ids):
        raise _fail("two calls in one message share an id", None, "message")
    return tuple(item.call for item in found)
