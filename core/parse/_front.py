"""
Parsing of model output into ``ToolCall`` values, whatever the dialect.

- ``openai``: a chat-completions assistant message (or a whole response, or a
  bare list) whose ``tool_calls[].function.arguments`` is a JSON string.
- ``anthropic``: a Messages API message (or its ``content`` list) whose
  ``tool_use`` blocks carry ``id``, ``name`` and an ``input`` object.
- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  as Hermes and Qwen models write it; several per message.
- ``json``: the same object without the tags, as small models write it: in a
  fenced ```` ```json ```` block, or bare at the start of a line (one or several,
  or a list of them). ``parameters`` is read as ``arguments`` (Llama's spelling).
- ``llama``: ``<|python_tag|>`` followed by JSON calls or ``name.call(k=v, ...)``
  calls (JSON values), separated by ``;``; and Llama 3.2+/4's "pythonic" list
  ``[get_weather(city="Paris"), square(x=3)]`` when it is the whole message (or
  follows the tag), read by ``ast`` with literal values only (see ``_pythonic``).
- ``article``: ``call function("square", [3], 9)``: a name, positional (or
  named) arguments and an expected output that is compared afterwards, never
  trusted; and its natural-language form ``请执行square, 参数为3, 期望输出为9``
  (full-width commas as often as ASCII ones; arguments joined by ``和``).

Invariants:

- Text either parses to exactly the calls it states, in order, or raises
  ``MalformedCall`` naming the character offset where reading failed. A
  message with one malformed call yields no calls at all.
- Only ``MalformedCall`` ever leaves ``parse_model_output``, whatever the text.
- JSON is read strictly: no NaN/Infinity, no duplicate keys, no trailing
  commas, bounded size and depth. Nothing is repaired: a truncated or
  ill-formed call is refused, so the model can correct it.
- JSON that is not shaped like a call (no ``name`` with ``arguments``) is text,
  not a call; JSON that fails to decode but names a ``name`` key is a call that
  cannot be read, and is refused.
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
from callward.core.parse._pythonic import parse_pythonic, pythonic_span
from callward.core.types import Dialect, ToolCall

ParameterOrder = Callable[[str], tuple[str, ...] | None]
Spans = tuple[tuple[int, int], ...]
NewId = Callable[[], str]

MAX_CALLS_PER_MESSAGE: Final = 64
_HERMES_OPEN: Final = "<tool_call>"
_HERMES_CLOSE: Final = "</tool_call>"
_ARTICLE: Final = re.compile(r"\bcall\s+function\s*\(")
_WHITESPACE: Final = re.compile(r"\s*")
_PYTHON_TAG: Final = "<|python_tag|>"
_LLAMA_END: Final = re.compile(r"<\|eom_id\|>|<\|eot_id\|>|<\|python_tag\|>")
_LLAMA_CALL: Final = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\.call)?\s*\(")
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FENCE_OPEN: Final = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\r?\n")
_CALL_FENCES: Final = frozenset({"", "json", "JSON", "tool_call", "tool_code"})
_FENCE_CLOSE: Final = "```"
# A JSON value at a line start, or right after Llama's <|python_tag|>.
_LINE_JSON: Final = re.compile(r"(?:^[ \t]*|<\|python_tag\|>\s*)([{\[])", re.MULTILINE)
_NAME_KEY: Final = re.compile(r"""["']name["']\s*:""")
_NATURAL: Final = re.compile(r"请执行\s*([A-Za-z_][A-Za-z0-9_]*)")
_NATURAL_ARGUMENTS: Final = re.compile(r"\s*[\uff0c,]?\s*参数为\s*")
_NATURAL_EXPECTED: Final = re.compile(r"\s*[\uff0c,]\s*期望输出为\s*")
_NATURAL_STOP: Final = "和、\uff0c,。\uff1b;\n"
_CALL_KEYS: Final = frozenset({"name", "arguments", "parameters", "id", "type"})


@dataclass(frozen=True, slots=True)
class _Found:
    offset: int
    call: ToolCall
    end: int = -1


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


def _call_id(value: object, label: str, offset: int | None, dialect: Dialect) -> str | None:
    """A call id the model gave, or None when it gave none; anything else is refused."""
    if value is not None and (not isinstance(value, str) or not value):
        raise _fail(f"{label} must be a non-empty string", offset, dialect)
    return value


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
        call_id = _call_id(entry.get("id"), f"{where}.id", None, "openai")
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


def _parse_hermes(text: str, new_id: NewId, protected: Spans = ()) -> list[_Found]:
    found: list[_Found] = []
    position = 0
    while (start := text.find(_HERMES_OPEN, position)) != -1:
        _refuse_stray_close(text, position, start, protected)
        if _inside(protected, start):
            position = start + len(_HERMES_OPEN)
            continue
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
        call_id = _call_id(document.get("id"), "the id", body_start, "hermes")
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
                close + len(_HERMES_CLOSE),
            )
        )
        position = close + len(_HERMES_CLOSE)
    _refuse_stray_close(text, position, len(text), protected)
    return found


def _refuse_stray_close(text: str, start: int, end: int, protected: Spans = ()) -> None:
    """Outside the calls, a closing tag means the model lost track of its own tags."""
    while (stray := text.find(_HERMES_CLOSE, start, end)) != -1:
        if not _inside(protected, stray):
            raise _fail(f"{_HERMES_CLOSE} without an opening tag", stray, "hermes")
        start = stray + len(_HERMES_CLOSE)


def _inside(spans: Spans, index: int) -> bool:
    return any(start <= index < end for start, end in spans)


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


def _parse_article(
    text: str, new_id: NewId, parameter_order: ParameterOrder, protected: Spans = ()
) -> list[_Found]:
    found: list[_Found] = []
    for match in _ARTICLE.finditer(text):
        if _inside(protected, match.start()):
            continue
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
                index + 1,
            )
        )
    return found


# --- article, natural-language form ---------------------------------------------


def _natural_value(text: str, index: int) -> tuple[object, int]:
    """A JSON value if one stands there whole, else the bare words up to the next separator."""
    if index < len(text) and text[index] in '"{[-0123456789tfn':
        try:
            value, end = STRICT_DECODER.raw_decode(text, index)
        except (ValueError, RecursionError):
            if text[index] in '"{[':
                raise _fail("a quoted or bracketed value is not valid JSON", index,
                            "article") from None
        else:
            if end >= len(text) or text[end] in _NATURAL_STOP or text[end].isspace():
                return value, end
    end = index
    while end < len(text) and text[end] not in _NATURAL_STOP:
        end += 1
    word = text[index:end].strip()
    if not word:
        raise _fail("an argument is empty", index, "article")
    return word, end


def _natural_values(text: str, index: int) -> tuple[list[object], int]:
    values: list[object] = []
    while True:
        value, index = _natural_value(text, index)
        values.append(value)
        index = _skip_inline_ws(text, index)
        if index < len(text) and text[index] in "和、":
            index = _skip_inline_ws(text, index + 1)
            continue
        return values, index


def _skip_inline_ws(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t":
        index += 1
    return index


def _parse_natural(
    text: str, new_id: NewId, parameter_order: ParameterOrder, protected: Spans = ()
) -> list[_Found]:
    found: list[_Found] = []
    for match in _NATURAL.finditer(text):
        if _inside(protected, match.start()):
            continue
        name = match.group(1)
        index = match.end()
        values: list[object] = []
        arguments_match = _NATURAL_ARGUMENTS.match(text, index)
        if arguments_match:
            values, index = _natural_values(text, arguments_match.end())
        expected: object = None
        expected_match = _NATURAL_EXPECTED.match(text, index)
        if expected_match:
            expected, index = _natural_value(text, expected_match.end())
        found.append(
            _Found(
                match.start(),
                _make_call(
                    call_id=new_id(),
                    name=name,
                    arguments=_article_arguments(name, values, match.start(), parameter_order),
                    dialect="article",
                    offset=match.start(),
                    expected=expected,  # type: ignore[arg-type]
                    has_expected=expected_match is not None,
                ),
                index,
            )
        )
    return found


# --- anthropic --------------------------------------------------------------


def _anthropic_blocks(document: object) -> list[object] | None:
    """The content blocks of a message, or a bare list of them; None if not that shape."""
    if isinstance(document, dict):
        if "tool_calls" in document:
            return None
        document = document.get("content")
    if not isinstance(document, list) or not document:
        return None
    if not all(isinstance(block, dict) and isinstance(block.get("type"), str)
               for block in document):
        return None
    if not any(block.get("type") == "tool_use" for block in document):
        return None
    return document


def _parse_anthropic(blocks: list[object], new_id: NewId) -> list[_Found]:
    found: list[_Found] = []
    for index, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise _fail(f"content[{index}] is not an object", index, "anthropic")
        if block.get("type") != "tool_use":
            continue
        call_id = _call_id(block.get("id"), f"content[{index}].id", index, "anthropic")
        if "input" not in block:
            raise _fail(f"content[{index}] has no input", index, "anthropic")
        found.append(
            _Found(
                index,
                _make_call(
                    call_id=call_id or new_id(),
                    name=block.get("name"),
                    arguments=block["input"],
                    dialect="anthropic",
                    offset=index,
                ),
            )
        )
    return found


# --- json: call objects without tags -----------------------------------------


def _is_call_object(value: object) -> bool:
    return isinstance(value, dict) and "name" in value and (
        "arguments" in value or "parameters" in value
    )


def _call_from_object(
    document: dict[str, object], offset: int, end: int, dialect: Dialect, new_id: NewId
) -> _Found:
    unexpected = sorted(set(document) - _CALL_KEYS)
    if unexpected:
        raise _fail(f"unexpected keys {unexpected}", offset, dialect)
    if "arguments" in document and "parameters" in document:
        raise _fail("give arguments or parameters, not both", offset, dialect)
    if document.get("type", "function") != "function":
        raise _fail("a call has no type other than function", offset, dialect)
    call_id = _call_id(document.get("id"), "the id", offset, dialect)
    raw = document["arguments"] if "arguments" in document else document.get("parameters")
    return _Found(
        offset,
        _make_call(
            call_id=call_id or new_id(),
            name=document.get("name"),
            arguments=_arguments_from(raw, offset, dialect),
            dialect=dialect,
            offset=offset,
        ),
        end,
    )


def _calls_from_value(
    value: object, offset: int, end: int, dialect: Dialect, new_id: NewId
) -> list[_Found] | None:
    """The calls a decoded JSON value states, or None when it is data, not calls."""
    if isinstance(value, dict):
        return [_call_from_object(value, offset, end, dialect, new_id)] if _is_call_object(
            value) else None
    if isinstance(value, list) and value and any(_is_call_object(item) for item in value):
        if not all(_is_call_object(item) for item in value):
            raise _fail("a list of calls holds something that is not a call", offset, dialect)
        return [_call_from_object(item, offset, end, dialect, new_id)
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
            raise _fail(f"invalid JSON ({exc.msg})", exc.pos, dialect) from exc
        return None
    except (ValueError, RecursionError) as exc:
        raise _fail(f"invalid JSON ({exc})", index, dialect) from exc


def _parse_fenced(text: str, new_id: NewId) -> tuple[list[_Found], list[tuple[int, int]]]:
    found: list[_Found] = []
    spans: list[tuple[int, int]] = []
    position = 0
    while match := _FENCE_OPEN.search(text, position):
        index = _skip_ws(text, match.end())
        # Code in another language is the model's prose, never a call.
        while match.group(1) in _CALL_FENCES and index < len(text) and text[index] in "{[":
            decoded = _decode_candidate(text, index, "json")
            if decoded is None:
                break
            value, after = decoded
            calls = _calls_from_value(value, index, after, "json", new_id)
            if calls is None:
                break
            found.extend(calls)
            index = _skip_ws(text, after)
        # The fence closes after the last call read: a JSON string may hold backticks.
        close = text.find(_FENCE_CLOSE, index)
        end = len(text) if close == -1 else close + len(_FENCE_CLOSE)
        spans.append((match.start(), end))
        position = end
    return found, spans


def _parse_bare_json(
    text: str, new_id: NewId, taken: list[tuple[int, int]]
) -> list[_Found]:
    """Call objects standing at the start of a line, outside every span already read."""
    found: list[_Found] = []
    position = 0
    while match := _LINE_JSON.search(text, position):
        index = match.start(1)
        inside = next((end for start, end in taken if start <= index < end), None)
        if inside is not None:
            position = inside
            continue
        decoded = _decode_candidate(text, index, "json")
        if decoded is None:
            position = index + 1
            continue
        value, after = decoded
        calls = _calls_from_value(value, index, after, "json", new_id)
        if calls is not None:
            found.extend(calls)
        position = after
    return found


# --- llama ------------------------------------------------------------------


def _llama_keywords(text: str, index: int) -> tuple[dict[str, object], int]:
    """``k=v, ...)`` with JSON values; returns the arguments and the index after ')'."""
    arguments: dict[str, object] = {}
    index = _skip_ws(text, index)
    if index < len(text) and text[index] == ")":
        return arguments, index + 1
    while True:
        key = _IDENTIFIER.match(text, index)
        if key is None:
            raise _fail("expected an argument name", index, "llama")
        index = _skip_ws(text, key.end())
        if index >= len(text) or text[index] != "=":
            raise _fail("expected '=' after the argument name", index, "llama")
        if key.group() in arguments:
            raise _fail("an argument is given twice", key.start(), "llama")
        value, index = _decode_at(text, _skip_ws(text, index + 1), "llama")
        arguments[key.group()] = value
        index = _skip_ws(text, index)
        if index < len(text) and text[index] == ",":
            index = _skip_ws(text, index + 1)
            continue
        if index < len(text) and text[index] == ")":
            return arguments, index + 1
        raise _fail("expected ',' or ')'", index, "llama")


def _parse_llama(
    text: str, new_id: NewId, protected: Spans = ()
) -> tuple[list[_Found], list[tuple[int, int]]]:
    found: list[_Found] = []
    spans: list[tuple[int, int]] = []
    position = 0
    while (start := text.find(_PYTHON_TAG, position)) != -1:
        if _inside(protected, start):
            position = start + len(_PYTHON_TAG)
            continue
        end_match = _LLAMA_END.search(text, start + len(_PYTHON_TAG))
        end = len(text) if end_match is None else end_match.start()
        spans.append((start, end))
        index = _skip_ws(text, start + len(_PYTHON_TAG))
        if index >= end:
            raise _fail(f"{_PYTHON_TAG} is followed by no call", index, "llama")
        while index < end:
            if text[index] == "[":
                after = len(text[:end].rstrip())
                found.extend(_pythonic_found(text, index, after, new_id))
            elif text[index] == "{":
                value, after = _decode_at(text, index, "llama")
                if not isinstance(value, dict) or not _is_call_object(value):
                    raise _fail("expected an object with name and parameters", index, "llama")
                found.append(_call_from_object(value, index, after, "llama", new_id))
            else:
                call = _LLAMA_CALL.match(text, index)
                if call is None:
                    raise _fail("expected a JSON call or name(key=value, ...)", index, "llama")
                arguments, after = _llama_keywords(text, call.end())
                found.append(_Found(index, _make_call(call_id=new_id(), name=call.group(1),
                                                      arguments=arguments, dialect="llama",
                                                      offset=index), after))
            index = _skip_ws(text, after)
            if index < end and text[index] == ";":
                index = _skip_ws(text, index + 1)
            elif index < end:
                raise _fail("expected ';' between calls", index, "llama")
        position = end
    return found, spans


def _pythonic_found(text: str, start: int, end: int, new_id: NewId) -> list[_Found]:
    """The calls of a pythonic list ``[name(k=v), ...]`` standing at ``text[start:end]``."""
    return [
        _Found(item.offset, _make_call(call_id=new_id(), name=item.name,
                                       arguments=item.arguments, dialect="llama",
                                       offset=item.offset), end)
        for item in parse_pythonic(text, start, end)
    ]


# --- front ------------------------------------------------------------------


def _looks_like_json_document(text: str) -> bool:
    stripped = text.lstrip()
    return stripped.startswith(("{", "["))


def _is_openai_document(document: object) -> bool:
    if isinstance(document, dict):
        return "tool_calls" in document or "choices" in document
    return isinstance(document, list) and any(
        isinstance(entry, dict) and ("function" in entry or entry.get("type") == "function")
        for entry in document
    )


def _parse_document(document: object, new_id: NewId) -> list[_Found] | None:
    """The calls of a whole-message JSON document; None when it states none in any API form."""
    if _is_openai_document(document):
        return _parse_openai(document, new_id)
    blocks = _anthropic_blocks(document)
    if blocks is not None:
        return _parse_anthropic(blocks, new_id)
    return None


def _json_call_spans(text: str) -> Spans:
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
        if _is_call_object(value) or (
            isinstance(value, list) and any(_is_call_object(item) for item in value)
        ):
            spans.append((index, after))
        position = max(after, index + 1)
    return tuple(spans)


def _parse_text(text: str, new_id: NewId, parameter_order: ParameterOrder) -> list[_Found]:
    protected = _json_call_spans(text)
    found = (
        _parse_hermes(text, new_id, protected)
        + _parse_article(text, new_id, parameter_order, protected)
        + _parse_natural(text, new_id, parameter_order, protected)
    )
    llama, llama_spans = _parse_llama(text, new_id, protected)
    fenced, fence_spans = _parse_fenced(text, new_id)
    taken = [(item.offset, item.end) for item in found] + llama_spans + fence_spans
    found += llama + fenced + _parse_bare_json(text, new_id, sorted(taken))
    found.sort(key=lambda item: item.offset)
    return found


def parse_model_output(
    text: str | Mapping[str, object],
    *,
    parameter_order: ParameterOrder,
    new_id: NewId,
) -> tuple[ToolCall, ...]:
    """
    Every call in one model message, in the order the model wrote them.

    Args:
        text: The model's text, or an already-decoded OpenAI- or Anthropic-style message.
        parameter_order: A tool's property names in order (for positional arguments),
            or None for a tool the registry does not know.
        new_id: Makes an id for a call that carries none.

    Returns:
        The calls; an empty tuple when the message asks for no tool.

    Raises:
        MalformedCall: Some part of the message is a call that cannot be read.
    """
    if not isinstance(text, str):
        return _bounded(_parse_document(dict(text), new_id) or [])
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
            found = _parse_document(document, new_id)
            if found is not None:
                return _bounded(found)
    span = pythonic_span(text)
    if span is not None:
        # The whole message is a list of calls: what its strings hold is data.
        return _bounded(_pythonic_found(text, *span, new_id))
    return _bounded(_parse_text(text, new_id, parameter_order))


def _bounded(found: list[_Found]) -> tuple[ToolCall, ...]:
    if len(found) > MAX_CALLS_PER_MESSAGE:
        raise _fail(
            f"{len(found)} calls in one message, at most {MAX_CALLS_PER_MESSAGE}", None, "message"
        )
    ids = [item.call.id for item in found]
    if len(set(ids)) != len(ids):
        raise _fail("two calls in one message share an id", None, "message")
    return tuple(item.call for item in found)
