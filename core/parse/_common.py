"""
What every dialect reader shares: the error, JSON decoded at an offset, the checked
``ToolCall``, and the spans of text a reader has claimed.

A reader reports each call as a ``Found`` (where it starts, the call, where it ends),
so the front can put the calls of all dialects back in the order the model wrote them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NamedTuple

from callward.core._canonical import (
    STRICT_DECODER,
    CanonicalizationError,
    JSONValue,
    non_ijson_path,
    strict_loads,
)
from callward.core.errors import MalformedCall
from callward.core.types import Dialect, ToolCall

#: A tool's property names in order (for positional arguments); None for an unknown tool.
ParameterOrder = Callable[[str], tuple[str, ...] | None]
#: Makes an id for a call that carries none.
NewId = Callable[[], str]
#: Half-open ``(start, end)`` character ranges of the message.
Spans = tuple[tuple[int, int], ...]

_WHITESPACE: Final = re.compile(r"\s*")


@dataclass(frozen=True, slots=True)
class Found:
    """One call read from the message: its first character, the call, and its end (or -1)."""

    offset: int
    call: ToolCall
    end: int = -1


class Scan(NamedTuple):
    """
    What a reader of calls among prose is handed besides the text.

    ``protected`` holds the call objects standing at line starts: tags and call syntax
    inside their JSON strings are data, never calls of their own. ``taken`` holds what
    the readers before this one claimed, sorted.
    """

    new_id: NewId
    parameter_order: ParameterOrder
    protected: Spans
    taken: Spans


class Read(NamedTuple):
    """The calls one reader found among prose, and the spans of text it claimed."""

    found: list[Found]
    spans: Spans

    @classmethod
    def of_calls(cls, found: list[Found]) -> Read:
        """A reader that claims exactly the text of the calls it found."""
        return cls(found, tuple([(item.offset, item.end) for item in found]))


def fail(message: str, offset: int | None, dialect: str) -> MalformedCall:
    """The error of a call that cannot be read; ``offset`` is where reading failed."""
    where = f" at offset {offset}" if offset is not None else ""
    return MalformedCall(f"{dialect} call{where}: {message}", offset=offset, dialect=dialect)


def shown(value: object) -> str:
    """A value from a payload as an error may quote it: its repr, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def inside(spans: Spans, index: int) -> bool:
    return any(start <= index < end for start, end in spans)


def skip_ws(text: str, index: int) -> int:
    match = _WHITESPACE.match(text, index)
    return match.end() if match else index


class JSONError(ValueError):
    """JSON that does not decode: the decoder's reason and the offset in the whole text."""

    def __init__(self, msg: str, pos: int) -> None:
        super().__init__(f"{msg} at offset {pos}")
        self.msg = msg
        self.pos = pos


_FIRST_WINDOW: Final = 4096
# An error this close to the window's end may be the window's doing (a cut escape).
_WINDOW_MARGIN: Final = 16


def decode_json(text: str, index: int) -> tuple[object, int]:
    """
    ``STRICT_DECODER.raw_decode(text, index)`` at a cost that grows with the JSON read,
    not with ``index``.

    json's own error counts the lines of everything before it, so each refused
    candidate deep in a long message cost the whole text before it: quadratic over a
    message of many candidates. The value is decoded in a window that grows until the
    outcome cannot depend on what lies past it.

    Raises:
        JSONError: No valid JSON value starts at ``index``.
        ValueError: The strict decoder's own refusals (NaN, duplicate keys).
        RecursionError: Nesting beyond the interpreter's limit.
    """
    window = _FIRST_WINDOW
    while True:
        end = min(len(text), index + window)
        piece = text[index:end]
        whole = end == len(text)
        try:
            value, after = STRICT_DECODER.raw_decode(piece)
        except json.JSONDecodeError as exc:
            if whole or (exc.pos < len(piece) - _WINDOW_MARGIN
                         and not exc.msg.startswith("Unterminated string")):
                raise JSONError(exc.msg, index + exc.pos) from None
        else:
            if whole or after < len(piece):
                return value, index + after
        window *= 4


def decode_at(text: str, index: int, dialect: str) -> tuple[object, int]:
    """
    The JSON value starting at ``text[index]`` and the index after it, read strictly.

    Raises:
        MalformedCall: No valid JSON value starts there.
    """
    try:
        return decode_json(text, index)
    except JSONError as exc:
        raise fail(f"invalid JSON ({exc.msg})", exc.pos, dialect) from exc
    except (ValueError, RecursionError) as exc:
        raise fail(f"invalid JSON ({exc})", index, dialect) from exc


def make_call(
    *,
    call_id: str,
    name: object,
    arguments: object,
    dialect: Dialect,
    offset: int,
    expected: JSONValue = None,
    has_expected: bool = False,
) -> ToolCall:
    """
    The ``ToolCall`` of a name and arguments as the model gave them.

    Raises:
        MalformedCall: The name is not a non-empty string, the arguments are not a JSON
            object, or the call is otherwise not a valid ``ToolCall``.
    """
    if not isinstance(name, str) or not name:
        raise fail("the tool name must be a non-empty string", offset, dialect)
    if not isinstance(arguments, dict):
        raise fail("the arguments must be a JSON object", offset, dialect)
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
        json_path = non_ijson_path(arguments)
        where = f" at offset {offset}" if offset is not None else ""
        raise MalformedCall(
            f"{dialect} call{where}: {name}: the argument at {json_path or '$'} is not I-JSON "
            "(an integer beyond +-(2**53 - 1), or text that is not Unicode)",
            offset=offset, dialect=dialect, tool=name, json_path=json_path or "$") from exc
    except (TypeError, ValueError) as exc:
        raise fail(str(exc), offset, dialect) from exc


def call_id(value: object, label: str, offset: int | None, dialect: Dialect) -> str | None:
    """A call id the model gave, or None when it gave none; anything else is refused."""
    if value is not None and (not isinstance(value, str) or not value):
        raise fail(f"{label} must be a non-empty string", offset, dialect)
    return value


def arguments_from(value: object, offset: int, dialect: Dialect) -> object:
    """Arguments given as a JSON string (OpenAI's way) are decoded strictly."""
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            return strict_loads(value)
        except json.JSONDecodeError as exc:
            raise fail(
                f"the arguments string is not JSON ({exc.msg} at its offset {exc.pos})",
                offset,
                dialect,
            ) from exc
        except ValueError as exc:
            raise fail(f"the arguments string is not JSON ({exc})", offset, dialect) from exc
    return value
