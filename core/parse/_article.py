"""
The article's syntax, ``call function("square", [3], 9)``, and its natural-language
form ``请执行square, 参数为3, 期望输出为9``.

A call gives a name, positional (or named) arguments and an expected output. The
expected output is kept apart from the arguments and compared afterwards, never
trusted. Positional arguments are mapped by the tool's parameter order; an unknown
tool's are not mapped at all (the gateway denies it by name). The natural form
takes full-width commas as often as ASCII ones, and joins arguments with ``和``.
"""

from __future__ import annotations

import re
from typing import Final

from callward.core.parse._common import (
    Found,
    ParameterOrder,
    Read,
    Scan,
    decode_at,
    decode_json,
    fail,
    inside,
    make_call,
    skip_ws,
)

_CALL: Final = re.compile(r"\bcall\s+function\s*\(")
_NATURAL: Final = re.compile(r"请执行\s*([A-Za-z_][A-Za-z0-9_]*)")
_NATURAL_ARGUMENTS: Final = re.compile(r"\s*[\uff0c,]?\s*参数为\s*")
_NATURAL_EXPECTED: Final = re.compile(r"\s*[\uff0c,]\s*期望输出为\s*")
_NATURAL_STOP: Final = "和、\uff0c,。\uff1b;\n"


def _arguments(
    name: str, values: object, offset: int, parameter_order: ParameterOrder
) -> dict[str, object]:
    if isinstance(values, dict):
        return values
    if not isinstance(values, list):
        raise fail("the second argument must be a list or an object", offset, "article")
    order = parameter_order(name)
    if order is None:
        # Unknown tool: the gateway denies it by name; the values are not mapped.
        return {}
    if len(values) > len(order):
        raise fail(
            f"{len(values)} positional arguments given, the tool takes {len(order)}",
            offset,
            "article",
        )
    return dict(zip(order, values, strict=False))


# --- call function(...) -------------------------------------------------------


def read_article(text: str, scan: Scan) -> Read:
    """Every ``call function(...)`` outside ``scan.protected``; it claims each call."""
    found: list[Found] = []
    for match in _CALL.finditer(text):
        if inside(scan.protected, match.start()):
            continue
        values: list[object] = []
        index = skip_ws(text, match.end())
        while True:
            if index >= len(text):
                raise fail("the call is cut off before its closing ')'", index, "article")
            if text[index] == ")" and not values:
                raise fail("the call names no tool", index, "article")
            value, index = decode_at(text, index, "article")
            values.append(value)
            index = skip_ws(text, index)
            if index >= len(text):
                raise fail("the call is cut off before its closing ')'", index, "article")
            if text[index] == ",":
                index = skip_ws(text, index + 1)
                continue
            if text[index] == ")":
                break
            raise fail("expected ',' or ')'", index, "article")
        if len(values) > 3:
            raise fail("a call takes a name, arguments and an expected output", index, "article")
        name = values[0]
        if not isinstance(name, str):
            raise fail(
                "the first argument must be the tool name as a string", match.end(), "article"
            )
        arguments = _arguments(
            name, values[1] if len(values) > 1 else [], match.end(), scan.parameter_order
        )
        found.append(
            Found(
                match.start(),
                make_call(
                    call_id=scan.new_id(),
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
    return Read.of_calls(found)


# --- 请执行name, 参数为..., 期望输出为... ---------------------------------------------


def _natural_value(text: str, index: int) -> tuple[object, int]:
    """A JSON value if one stands there whole, else the bare words up to the next separator."""
    if index < len(text) and text[index] in '"{[-0123456789tfn':
        try:
            value, end = decode_json(text, index)
        except (ValueError, RecursionError):
            if text[index] in '"{[':
                raise fail("a quoted or bracketed value is not valid JSON", index,
                           "article") from None
        else:
            if end >= len(text) or text[end] in _NATURAL_STOP or text[end].isspace():
                return value, end
    end = index
    while end < len(text) and text[end] not in _NATURAL_STOP:
        end += 1
    word = text[index:end].strip()
    if not word:
        raise fail("an argument is empty", index, "article")
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


def read_natural(text: str, scan: Scan) -> Read:
    """Every ``请执行name…`` outside ``scan.protected``; it claims each call."""
    found: list[Found] = []
    for match in _NATURAL.finditer(text):
        if inside(scan.protected, match.start()):
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
            Found(
                match.start(),
                make_call(
                    call_id=scan.new_id(),
                    name=name,
                    arguments=_arguments(name, values, match.start(), scan.parameter_order),
                    dialect="article",
                    offset=match.start(),
                    expected=expected,  # type: ignore[arg-type]
                    has_expected=expected_match is not None,
                ),
                index,
            )
        )
    return Read.of_calls(found)
