"""
Llama's "pythonic" tool calls: a Python list of keyword-argument calls.

Llama 3.2 (1B/3B), Llama 3.3 and Llama 4 answer a tool request with the whole
message set to ``[get_weather(city="Paris"), square(x=3)]``, without
``<|python_tag|>`` (Llama 4 may wrap it in ``<|python_start|>``…``<|python_end|>``).
The list is read with Python's own parser, ``ast``, and nothing of it is ever
evaluated except literals: each argument value goes through ``ast.literal_eval``
and must then be a JSON value (str, int, float, bool, None, list, dict with str
keys). Names, calls, attribute access, operators, starred and ``**`` arguments,
positional arguments, sets, tuples and bytes are refused with the character
offset where they stand.

Only a message that is *wholly* such a list counts (or a list right after
``<|python_tag|>``, see ``_llama``), so prose that contains brackets is never
taken for a call.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from typing import Final

from callward.core.errors import MalformedCall
from callward.core.parse._common import Found, NewId, fail, make_call

_DIALECT: Final = "llama"
_START: Final = re.compile(r"\[\s*[A-Za-z_][A-Za-z0-9_.]*\s*\(")
_WRAPPERS: Final = (("<|python_start|>", "<|python_end|>"),)
_END_TOKENS: Final = ("<|eot_id|>", "<|eom_id|>", "<|eot|>", "<|eom|>")
_LINE: Final = re.compile(r"[^\r\n]*(?:\r\n|\r|\n|$)")  # as Python's tokenizer splits lines


@dataclass(frozen=True, slots=True)
class PythonicCall:
    """One call of the list: where it starts in the text, its name and its arguments."""

    offset: int
    name: str
    arguments: dict[str, object]


def _fail(message: str, offset: int | None) -> MalformedCall:
    return fail(message, offset, _DIALECT)


def pythonic_span(text: str) -> tuple[int, int] | None:
    """
    Where the list stands when the whole message (stripped, wrappers and end
    tokens removed) is a bracket list that opens with ``name(``; None otherwise.
    """
    start, end = 0, len(text)
    while True:
        start, end = _strip(text, start, end)
        changed = False
        for token in _END_TOKENS:
            if text.endswith(token, start, end):
                end -= len(token)
                changed = True
        for opening, closing in _WRAPPERS:
            if text.startswith(opening, start, end):
                start += len(opening)
                changed = True
                if text.endswith(closing, start, end):
                    end -= len(closing)
        if not changed:
            break
    if end - start < 2 or text[end - 1] != "]" or not _START.match(text, start, end):
        return None
    return start, end


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


class _Offsets:
    """Maps ``ast`` positions (line from 1, UTF-8 byte column) to character offsets."""

    def __init__(self, source: str, base: int) -> None:
        self._lines = _LINE.findall(source) or [""]
        self._starts = [0]
        for line in self._lines:
            self._starts.append(self._starts[-1] + len(line))
        self._base = base

    def of_node(self, node: ast.expr | ast.keyword) -> int:
        line = self._lines[node.lineno - 1]
        column = len(line.encode("utf-8")[: node.col_offset].decode("utf-8", errors="ignore"))
        return self._base + self._starts[node.lineno - 1] + column

    def of_error(self, exc: SyntaxError) -> int:
        if exc.lineno is None:
            return self._base
        line = min(max(exc.lineno, 1), len(self._lines))
        return self._base + self._starts[line - 1] + max((exc.offset or 1) - 1, 0)


def _json_value(value: object, offset: int) -> object:
    """The literal as a JSON value; anything JSON cannot hold is refused."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail("a number is not finite", offset)
        return value
    if isinstance(value, list):
        return [_json_value(item, offset) for item in value]
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise _fail("a dict key is not a string", offset)
        return {key: _json_value(item, offset) for key, item in value.items()}
    raise _fail(f"a {type(value).__name__} is not a JSON value", offset)


def _literal(node: ast.expr, offsets: _Offsets) -> object:
    offset = offsets.of_node(node)
    for inner in ast.walk(node):
        # literal_eval would take these; JSON has no such values.
        if isinstance(inner, ast.Tuple | ast.Set) or (
            isinstance(inner, ast.Constant) and isinstance(inner.value, bytes | complex)
        ):
            raise _fail("a tuple, set, bytes or complex value is not a JSON value",
                        offsets.of_node(inner))
        if isinstance(inner, ast.Dict):
            keys = [key.value for key in inner.keys if isinstance(key, ast.Constant)]
            if len(set(map(repr, keys))) != len(keys):
                raise _fail("a dict gives one key twice", offsets.of_node(inner))
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        where = next(
            (offsets.of_node(inner) for inner in ast.walk(node)
             if isinstance(inner, ast.Name | ast.Call | ast.Attribute | ast.Starred
                           | ast.BinOp | ast.Subscript | ast.Lambda | ast.JoinedStr)),
            offset,
        )
        raise _fail("an argument value must be a literal (no names, calls or operators)",
                    where) from None
    return _json_value(value, offset)


def _call(node: ast.expr, offsets: _Offsets) -> PythonicCall:
    offset = offsets.of_node(node)
    if not isinstance(node, ast.Call):
        raise _fail("each item of the list must be a call name(key=value, ...)", offset)
    if not isinstance(node.func, ast.Name):
        raise _fail("the tool must be named by a plain identifier", offsets.of_node(node.func))
    if node.args:
        raise _fail("arguments must be given by keyword (key=value)",
                    offsets.of_node(node.args[0]))
    arguments: dict[str, object] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise _fail("'**' arguments are not allowed", offsets.of_node(keyword))
        if keyword.arg in arguments:
            raise _fail("an argument is given twice", offsets.of_node(keyword))
        arguments[keyword.arg] = _literal(keyword.value, offsets)
    return PythonicCall(offset, node.func.id, arguments)


def parse_pythonic(text: str, start: int, end: int) -> list[PythonicCall]:
    """
    The calls of the list ``text[start:end]``, in order.

    Raises:
        MalformedCall: The list is not valid Python, or holds something other than
            keyword calls with literal JSON values; the offset is in ``text``.
    """
    source = text[start:end]
    offsets = _Offsets(source, start)
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise _fail(f"not a valid call list ({exc.msg})", offsets.of_error(exc)) from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise _fail(f"not a valid call list ({type(exc).__name__})", start) from None
    if not isinstance(tree.body, ast.List):
        raise _fail("expected one list of calls", start)
    return [_call(item, offsets) for item in tree.body.elts]


def pythonic_found(text: str, start: int, end: int, new_id: NewId) -> list[Found]:
    """The calls of a pythonic list ``[name(k=v), ...]`` standing at ``text[start:end]``."""
    return [
        Found(item.offset, make_call(call_id=new_id(), name=item.name,
                                     arguments=item.arguments, dialect=_DIALECT,
                                     offset=item.offset), end)
        for item in parse_pythonic(text, start, end)
    ]


def read_pythonic_message(text: str, new_id: NewId) -> list[Found] | None:
    """The calls of a message that is wholly a pythonic list; None when it is not one."""
    span = pythonic_span(text)
    if span is None:
        return None
    # The whole message is a list of calls: what its strings hold is data.
    return pythonic_found(text, *span, new_id)
