"""
Parsing of model output into ``ToolCall`` values, whatever the dialect.

``DIALECTS`` is the one table of the dialects read, one module per family. A
message is read in four passes, each by the rows of its form, in table order:

1. ``Stream``: the message is a server-sent event stream (its first non-blank line
   is ``data:`` or ``event:``). It is assembled into the message it streams, by the
   row of its family, and read as pass 2 reads a document; a stream no row reads is
   refused.
2. ``WholeDocument``: the message is one JSON document (or was handed over
   decoded). The first row that claims it reads it, text parts included; a
   document no row claims but shaped like an API payload is refused; any other
   document is read as text.
3. ``WholeText``: the whole message is a list of calls. The first row that reads
   one decides, and what its strings hold is data.
4. ``InText``: calls among prose. Every row reads the text, skipping the JSON
   bodies of calls (their strings are data, see ``call_object_spans``) and what the
   rows before it claimed; the calls of all rows are put back in the order the
   model wrote them.

Adding a dialect is adding its module and a row in ``DIALECTS``.

Invariants:

- Text either parses to exactly the calls it states, in order, or raises
  ``MalformedCall`` naming the dialect and the character offset where reading
  failed (for a JSON document, the call's index and its JSON path). A message
  with one malformed call yields no calls at all; so does one with a call the
  parser would otherwise skip (a call object inside a line of prose).
- A response the model did not finish (``finish_reason`` ``length`` or
  ``content_filter``, ``stop_reason`` ``max_tokens`` or ``refusal``, a Responses
  ``status`` other than ``completed``, a cut-off stream) yields no calls: it is
  refused naming the reason.
- The markers of a known dialect (``<tool_call>``, ``[TOOL_CALLS]``,
  ``<function=``, ``<|python_tag|>``, ``call function(``) are claims: wherever
  they stand, even in prose, they are read as calls or refused.
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
from callward.core.errors import MalformedCall
from callward.core.parse._api import (
    ReadText,
    decode_document,
    is_anthropic_document,
    is_api_shaped,
    is_openai_document,
    read_anthropic,
    read_openai,
    refuse_unknown_payload,
)
from callward.core.parse._article import read_article, read_natural
from callward.core.parse._common import Found, NewId, ParameterOrder, Read, Scan, fail
from callward.core.parse._hermes import read_hermes
from callward.core.parse._json import call_object_spans, read_bare, read_fenced
from callward.core.parse._llama import read_function_tag, read_python_tag
from callward.core.parse._mistral import read_mistral
from callward.core.parse._pythonic import read_pythonic_message
from callward.core.parse._responses import is_responses_document, read_responses
from callward.core.parse._sse import (
    Event,
    assemble_anthropic,
    assemble_openai,
    assemble_responses,
    is_stream,
    sse_events,
    stream_family,
)
from callward.core.types import Dialect, ToolCall

MAX_CALLS_PER_MESSAGE: Final = 64


@dataclass(frozen=True, slots=True)
class Stream:
    """A server-sent event stream of ``family``: ``assemble`` gives the message it streams."""

    family: str
    assemble: Callable[[list[Event], int], object]


@dataclass(frozen=True, slots=True)
class WholeDocument:
    """A message that is one JSON document: ``claims`` says whose, ``read`` its calls."""

    claims: Callable[[object], bool]
    read: Callable[[object, NewId, ReadText], list[Found]]


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
    form: Stream | WholeDocument | WholeText | InText


# Order matters. Call ids are drawn in table order, and the bare JSON row skips what
# every row above it claimed, so it stays last.
DIALECTS: Final[tuple[DialectRow, ...]] = (
    DialectRow("openai",
               'data: {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": '
               '{"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": '
               '{"name": "square", "arguments": "{\\"x\\""}}]}}]}\n\n'
               'data: {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": '
               '{"tool_calls": [{"index": 0, "function": {"arguments": ": 3}"}}]}}]}\n\n'
               'data: {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, '
               '"finish_reason": "tool_calls"}]}\n\ndata: [DONE]\n\n',
               Stream("openai", assemble_openai)),
    DialectRow("anthropic",
               'event: message_start\ndata: {"type": "message_start", "message": {}}\n\n'
               'event: content_block_start\ndata: {"type": "content_block_start", "index": 0, '
               '"content_block": {"type": "tool_use", "id": "t1", "name": "square", '
               '"input": {}}}\n\nevent: content_block_delta\ndata: {"type": '
               '"content_block_delta", "index": 0, "delta": {"type": "input_json_delta", '
               '"partial_json": "{\\"x\\": 3}"}}\n\nevent: content_block_stop\ndata: '
               '{"type": "content_block_stop", "index": 0}\n\nevent: message_delta\ndata: '
               '{"type": "message_delta", "delta": {"stop_reason": "tool_use"}}\n\n'
               'event: message_stop\ndata: {"type": "message_stop"}\n\n',
               Stream("anthropic", assemble_anthropic)),
    DialectRow("openai_responses",
               'event: response.completed\ndata: {"type": "response.completed", "response": '
               '{"object": "response", "status": "completed", "output": [{"type": '
               '"function_call", "call_id": "c1", "name": "square", "arguments": '
               '"{\\"x\\": 3}"}]}}\n\n',
               Stream("openai_responses", assemble_responses)),
    DialectRow("openai",
               '{"tool_calls": [{"function": {"name": "square", "arguments": "{\\"x\\": 3}"}}]}',
               WholeDocument(is_openai_document, read_openai)),
    DialectRow("anthropic",
               '{"content": [{"type": "tool_use", "name": "square", "input": {"x": 3}}]}',
               WholeDocument(is_anthropic_document, read_anthropic)),
    DialectRow("openai_responses",
               '{"object": "response", "status": "completed", "output": [{"type": '
               '"function_call", "call_id": "c1", "name": "square", '
               '"arguments": "{\\"x\\": 3}"}]}',
               WholeDocument(is_responses_document, read_responses)),
    DialectRow("llama", "[square(x=3)]", WholeText(read_pythonic_message)),
    DialectRow("hermes", '<tool_call>{"name": "square", "arguments": {"x": 3}}</tool_call>',
               InText(read_hermes)),
    DialectRow("mistral", '[TOOL_CALLS] [{"name": "square", "arguments": {"x": 3}}]',
               InText(read_mistral)),
    DialectRow("mistral", '[TOOL_CALLS]square[ARGS]{"x": 3}', InText(read_mistral)),
    DialectRow("llama", '<function=square>{"x": 3}</function>', InText(read_function_tag)),
    DialectRow("article", 'call function("square", [3], 9)', InText(read_article)),
    DialectRow("article", "请执行square, 参数为3, 期望输出为9", InText(read_natural)),
    DialectRow("llama", "<|python_tag|>square.call(x=3)", InText(read_python_tag)),
    DialectRow("json", '```json\n{"name": "square", "arguments": {"x": 3}}\n```',
               InText(read_fenced)),
    DialectRow("json", 'Sure.\n{"name": "square", "parameters": {"x": 3}}', InText(read_bare)),
)

# A reader with two rows (two examples) runs once: dict.fromkeys keeps the first.
_STREAMS: Final = tuple(dict.fromkeys(row.form for row in DIALECTS
                                      if isinstance(row.form, Stream)))
_WHOLE_DOCUMENT: Final = tuple(dict.fromkeys(row.form for row in DIALECTS
                                             if isinstance(row.form, WholeDocument)))
_WHOLE_TEXT: Final = tuple(dict.fromkeys(row.form for row in DIALECTS
                                         if isinstance(row.form, WholeText)))
_IN_TEXT: Final = tuple(dict.fromkeys(row.form for row in DIALECTS
                                      if isinstance(row.form, InText)))


def parse_model_output(
    text: str | Mapping[str, object],
    *,
    parameter_order: ParameterOrder,
    new_id: NewId,
) -> tuple[ToolCall, ...]:
    """
    Every call in one model message, in the order the model wrote them.

    Args:
        text: The model's text (a server-sent event stream's text included), or an
            already-decoded OpenAI, Anthropic or Responses API message.
        parameter_order: A tool's property names in order (for positional arguments),
            or None for a tool the registry does not know.
        new_id: Makes an id for a call that carries none.

    Returns:
        The calls; an empty tuple when the message asks for no tool.

    Raises:
        MalformedCall: Some part of the message is a call that cannot be read.
    """
    if not isinstance(text, str):
        return _bounded(_read_document(dict(text), new_id, parameter_order))
    try:
        check_json_bounds(text)
    except ValueError as exc:
        raise fail(str(exc), None, "message") from exc
    if len(text) > MAX_JSON_BYTES:
        raise fail("the message is too large", None, "message")
    if is_stream(text):
        return _bounded(_read_stream(text, new_id, parameter_order))
    if text.lstrip().startswith(("{", "[")):
        document = decode_document(text)
        if document is not None and (_claimed(document) or is_api_shaped(document)):
            return _bounded(_read_document(document, new_id, parameter_order))
    return _bounded(_read_text(text, new_id, parameter_order))


def _read_stream(text: str, new_id: NewId, parameter_order: ParameterOrder) -> list[Found]:
    events = sse_events(text)
    family = stream_family(events)
    stream = next(row for row in _STREAMS if row.family == family)
    return _read_document(stream.assemble(events, len(text)), new_id, parameter_order)


def _claimed(document: object) -> bool:
    return any(whole.claims(document) for whole in _WHOLE_DOCUMENT)


def _read_document(
    document: object, new_id: NewId, parameter_order: ParameterOrder
) -> list[Found]:
    """The calls of a whole-message document, its text parts read as model text."""

    def read_text(text: str, where: str) -> list[Found]:
        try:
            return _read_text(text, new_id, parameter_order)
        except MalformedCall as exc:
            raise MalformedCall(f"{where}: {exc}", offset=exc.offset, dialect=exc.dialect,
                                tool=exc.tool, json_path=exc.json_path) from exc

    for whole in _WHOLE_DOCUMENT:
        if whole.claims(document):
            return whole.read(document, new_id, read_text)
    raise refuse_unknown_payload(document)


def _read_text(text: str, new_id: NewId, parameter_order: ParameterOrder) -> list[Found]:
    for whole in _WHOLE_TEXT:
        found = whole.read(text, new_id)
        if found is not None:
            return found
    return _read_in_text(text, new_id, parameter_order)


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
