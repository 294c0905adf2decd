"""
Parsing of model output into ``ToolCall`` values, whatever the dialect.

``DIALECTS`` is the one table of the dialects read, one module per family. A
message is read in three passes, each by the rows of its form, in table order:

1. ``WholeDocument``: the message is one JSON document (or was handed over
   decoded). The first row that claims it reads it; a document no row claims,
   or one its row finds no call list in, is read as text.
2. ``WholeText``: the whole message is a list of calls. The first row that reads
   one decides, and what its strings hold is data.
3. ``InText``: calls among prose. Every row reads the text, skipping the call
   objects at line starts (their strings are data); the calls of all rows are put
   back in the order the model wrote them.

Adding a dialect is adding its module and a row in ``DIALECTS``.

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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from callward.core._canonical import MAX_JSON_BYTES, check_json_bounds
from callward.core.parse._api import (
    decode_document,
    is_anthropic_document,
    is_openai_document,
    read_anthropic,
    read_openai,
)
from callward.core.parse._article import read_article, read_natural
from callward.core.parse._common import Found, NewId, ParameterOrder, Read, Scan, fail
from callward.core.parse._hermes import read_hermes
from callward.core.parse._json import call_object_spans, read_bare, read_fenced
from callward.core.parse._llama import read_python_tag
from callward.core.parse._pythonic import read_pythonic_message
from callward.core.types import Dialect, ToolCall

MAX_CALLS_PER_MESSAGE: Final = 64


@dataclass(frozen=True, slots=True)
class WholeDocument:
    """A message that is one JSON document: ``claims`` says whose, ``read`` its calls or None."""

    claims: Callable[[object], bool]
    read: Callable[[object, NewId], list[Found] | None]


@dataclass(frozen=True, slots=True)
class WholeText:
    """A message that is wholly one list of calls: ``read`` gives them, or None if it is not."""

    read: Callable[[str, NewId], list[Found] | None]


@dataclass(frozen=True, slots=True)
class InText:
    """Calls among prose: ``read`` gives those it finds and the spans it claimed."""

    read: Callable[[str, Scan], Read]


@dataclass(frozen=True, slots=True)
class DialectRow:
    """One dialect: its name on the calls it reads, a message in it (tested), its reader."""

    dialect: Dialect
    example: str
    form: WholeDocument | WholeText | InText


# Order matters. Call ids are drawn in table order, and the bare JSON row skips what
# every row above it claimed, so it stays last.
DIALECTS: Final[tuple[DialectRow, ...]] = (
    DialectRow("openai",
               '{"tool_calls": [{"function": {"name": "square", "arguments": "{\\"x\\": 3}"}}]}',
               WholeDocument(is_openai_document, read_openai)),
    DialectRow("anthropic",
               '{"content": [{"type": "tool_use", "name": "square", "input": {"x": 3}}]}',
               WholeDocument(is_anthropic_document, read_anthropic)),
    DialectRow("llama", "[square(x=3)]", WholeText(read_pythonic_message)),
    DialectRow("hermes", '<tool_call>{"name": "square", "arguments": {"x": 3}}</tool_call>',
               InText(read_hermes)),
    DialectRow("article", 'call function("square", [3], 9)', InText(read_article)),
    DialectRow("article", "请执行square, 参数为3, 期望输出为9", InText(read_natural)),
    DialectRow("llama", "<|python_tag|>square.call(x=3)", InText(read_python_tag)),
    DialectRow("json", '```json\n{"name": "square", "arguments": {"x": 3}}\n```',
               InText(read_fenced)),
    DialectRow("json", 'Sure.\n{"name": "square", "parameters": {"x": 3}}', InText(read_bare)),
)

_WHOLE_DOCUMENT: Final = tuple(row.form for row in DIALECTS
                               if isinstance(row.form, WholeDocument))
_WHOLE_TEXT: Final = tuple(row.form for row in DIALECTS if isinstance(row.form, WholeText))
_IN_TEXT: Final = tuple(row.form for row in DIALECTS if isinstance(row.form, InText))


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
        return _bounded(_read_document(dict(text), new_id) or [])
    try:
        check_json_bounds(text)
    except ValueError as exc:
        raise fail(str(exc), None, "message") from exc
    if len(text) > MAX_JSON_BYTES:
        raise fail("the message is too large", None, "message")
    if text.lstrip().startswith(("{", "[")):
        document = decode_document(text)
        if document is not None:
            found = _read_document(document, new_id)
            if found is not None:
                return _bounded(found)
    for whole in _WHOLE_TEXT:
        found = whole.read(text, new_id)
        if found is not None:
            return _bounded(found)
    return _bounded(_read_in_text(text, new_id, parameter_order))


def _read_document(document: object, new_id: NewId) -> list[Found] | None:
    """The calls of a whole-message document; None when no row claims it or it states none."""
    for whole in _WHOLE_DOCUMENT:
        if whole.claims(document):
            return whole.read(document, new_id)
    return None


def _read_in_text(text: str, new_id: NewId, parameter_order: ParameterOrder) -> list[Found]:
    scan = Scan(new_id, parameter_order, protected=call_object_spans(text), taken=())
    found: list[Found] = []
    for reader in _IN_TEXT:
        read = reader.read(text, scan)
        found += read.found
        if read.spans:
            scan = scan._replace(taken=tuple(sorted(scan.taken + read.spans)))
    found.sort(key=lambda item: item.offset)
    return found


def _bounded(found: list[Found]) -> tuple[ToolCall, ...]:
    if len(found) > MAX_CALLS_PER_MESSAGE:
        raise fail(
            f"{len(found)} calls in one message, at most {MAX_CALLS_PER_MESSAGE}", None, "message"
        )
    ids = [item.call.id for item in found]
    if len(set(ids)) != len(ids):
        raise fail("two calls in one message share an id", None, "message")
    return tuple(item.call for item in found)
