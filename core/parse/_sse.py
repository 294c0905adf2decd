"""
Streamed responses: the body of a ``text/event-stream`` response, as the server sent
it, assembled into the message it streams, which the API readers then read.

The input form is the stream's text: ``event: name`` and ``data: payload`` lines,
events separated by a blank line, ``:`` comments (the WHATWG server-sent events
format; a last event without its blank line is taken as ended). A text counts as a
stream when, after blank lines and ``:`` comments, it opens with a ``data:`` line
holding JSON (or ``[DONE]``) or an ``event: name`` line followed by ``data:``; every
other line must then be a field line, a comment or blank. Prose that merely starts
with "data:" is text.

- OpenAI chat completions: ``chat.completion.chunk`` payloads, ``data: [DONE]`` last.
  ``choices[0].delta.tool_calls[i]`` fragments are joined by ``index`` in arrival
  order: the id and name once, ``function.arguments`` concatenated; ``delta.content``
  likewise.
- Anthropic Messages: ``message_start``, per block ``content_block_start`` /
  ``content_block_delta`` (``text_delta``, ``input_json_delta.partial_json``) /
  ``content_block_stop``, ``message_delta`` (``stop_reason``), ``message_stop`` last.
- OpenAI Responses: ``response.*`` events, ended by ``response.completed`` (or
  ``response.incomplete`` / ``response.failed``), whose ``response`` is read whole.

Invariants: a stream that is cut off (no ``[DONE]``, no ``message_stop``, no final
``response.*`` event, a block never stopped), that says the model did not finish
(``finish_reason: "length"``, ``stop_reason: "max_tokens"``, ...), that carries an
``error`` event, or whose joined arguments are not strict JSON, is refused with the
offset of the event (or of the end of the text) where it fails, even when the
arguments received so far happen to parse.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final

from callward.core._canonical import strict_loads
from callward.core.parse._api import (
    OPENAI_FINISHED,
    anthropic_block_ignored,
    anthropic_finished,
)
from callward.core.parse._common import fail, shown

_LINE: Final = re.compile(r"[^\r\n]*(?:\r\n|\r|\n|$)")
# Blank lines and comments (``: ping``) may come first; then a JSON (or [DONE]) data
# line, or a named event whose data follows. Prose that starts "data: the file..." is
# not a stream.
_STREAM_START: Final = re.compile(
    r"(?:[ \t]*(?::[^\r\n]*)?(?:\r\n|\r|\n))*"
    r"(?:data:[ ]?(?:\{|\[DONE\])|event:[ ]?[A-Za-z0-9_.]+[ \t]*(?:\r\n|\r|\n)data:)")
_FIELDS: Final = frozenset({"data", "event", "id", "retry"})
_ANTHROPIC_EVENTS: Final = frozenset({
    "message_start", "content_block_start", "content_block_delta", "content_block_stop",
    "message_delta", "message_stop", "ping", "error",
})
_ANTHROPIC_IGNORED_DELTAS: Final = frozenset({"thinking_delta", "signature_delta",
                                              "citations_delta"})
_RESPONSES_ENDS: Final = frozenset({"response.completed", "response.incomplete",
                                    "response.failed"})


@dataclass(frozen=True, slots=True)
class Event:
    """One server-sent event: where its first line starts, its name, its data."""

    offset: int
    name: str
    data: str


def is_stream(text: str) -> bool:
    return _STREAM_START.match(text) is not None


def sse_events(text: str) -> list[Event]:
    """
    The events of a stream, in order.

    Raises:
        MalformedCall: A line is neither a field of the format, a comment nor blank.
    """
    events: list[Event] = []
    data: list[str] = []
    name = ""
    start = -1
    for match in _LINE.finditer(text):
        line = match.group().rstrip("\r\n")
        if not line:
            if data:
                events.append(Event(start, name, "\n".join(data)))
            data, name, start = [], "", -1
            if match.end() >= len(text):
                break
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field not in _FIELDS:
            raise fail(f"not a server-sent event line (field {field[:20]!r})", match.start(),
                       "stream")
        value = value[1:] if value.startswith(" ") else value
        if start == -1:
            start = match.start()
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
        if match.end() >= len(text):
            break
    if data:
        events.append(Event(start, name, "\n".join(data)))
    return events


def _payload(event: Event, dialect: str) -> dict[str, object]:
    try:
        payload = strict_loads(event.data)
    except ValueError as exc:
        raise fail(f"an event's data is not JSON ({exc})", event.offset, dialect) from exc
    if not isinstance(payload, dict):
        raise fail("an event's data is not a JSON object", event.offset, dialect)
    return payload


def stream_family(events: list[Event]) -> str:
    """``openai``, ``anthropic`` or ``openai_responses``, from the first event."""
    if not events:
        raise fail("a stream with no events", 0, "stream")
    first = events[0]
    if first.data == "[DONE]":
        return "openai"
    payload = _payload(first, "stream")
    kind = payload.get("type")
    if "choices" in payload or payload.get("object") == "chat.completion.chunk":
        return "openai"
    if isinstance(kind, str) and kind.startswith("response."):
        return "openai_responses"
    if kind in _ANTHROPIC_EVENTS or first.name in _ANTHROPIC_EVENTS:
        return "anthropic"
    raise fail("a stream callward does not read", first.offset, "stream")


# --- openai chat completions -------------------------------------------------

_OPENAI: Final = "openai stream"


@dataclass(slots=True)
class _Slot:
    offset: int
    call_id: str | None = None
    name: str | None = None
    arguments: str = ""


def assemble_openai(events: list[Event], end: int) -> object:
    """The chat completion an OpenAI chat-completions stream streams; see the module."""
    slots: dict[int, _Slot] = {}
    content: list[str] = []
    finish: object = None
    done = False
    for event in events:
        if done:
            raise fail("an event after data: [DONE]", event.offset, _OPENAI)
        if event.data == "[DONE]":
            done = True
            continue
        finish = _openai_chunk(event, slots, content) or finish
    if not done:
        raise fail("the stream is cut off before data: [DONE]", end, _OPENAI)
    if finish not in OPENAI_FINISHED:
        raise fail(f"the model did not finish (finish_reason {shown(finish)}); nothing in "
                   "this stream runs", end, _OPENAI)
    if sorted(slots) != list(range(len(slots))):
        raise fail(f"tool call indices {sorted(slots)} are not 0..n-1: a fragment is "
                   "missing", end, _OPENAI)
    message: dict[str, object] = {"role": "assistant", "content": "".join(content) or None}
    if slots:
        message["tool_calls"] = [_tool_call(index, slots[index]) for index in range(len(slots))]
    return {"object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": finish, "message": message}]}


def _openai_chunk(event: Event, slots: dict[int, _Slot], content: list[str]) -> object:
    """Fold one chunk into the slots and the content; returns its finish_reason, if any."""
    chunk = _payload(event, _OPENAI)
    if "error" in chunk:
        raise fail("the stream carries an error event", event.offset, _OPENAI)
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise fail("a chunk without a choices list", event.offset, _OPENAI)
    finish: object = None
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            raise fail("a chunk of a choice other than the first; callward reads a "
                       "stream with exactly one", event.offset, _OPENAI)
        if choice.get("finish_reason") is not None:
            finish = choice["finish_reason"]
        _openai_delta(choice.get("delta", {}), event.offset, slots, content)
    return finish


def _tool_call(index: int, slot: _Slot) -> dict[str, object]:
    _check_json(slot.arguments, slot.offset, f"tool call {index}", _OPENAI)
    entry: dict[str, object] = {"type": "function",
                                "function": {"name": slot.name, "arguments": slot.arguments}}
    if slot.call_id is not None:
        entry["id"] = slot.call_id
    return entry


def _openai_delta(delta: object, offset: int, slots: dict[int, _Slot],
                  content: list[str]) -> None:
    if not isinstance(delta, dict):
        raise fail("a delta is not an object", offset, _OPENAI)
    if delta.get("function_call") is not None:
        raise fail("legacy function_call deltas are not read; use tool_calls", offset,
                   _OPENAI)
    text = delta.get("content")
    if text is not None:
        if not isinstance(text, str):
            raise fail("delta.content is not a string", offset, _OPENAI)
        content.append(text)
    for fragment in delta.get("tool_calls") or []:
        if not isinstance(fragment, dict):
            raise fail("a tool call fragment is not an object", offset, _OPENAI)
        index = fragment.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise fail("a tool call fragment without a valid index", offset, _OPENAI)
        slot = slots.setdefault(index, _Slot(offset))
        slot.call_id = _once(slot.call_id, fragment.get("id"), "id", offset)
        function = fragment.get("function") or {}
        if not isinstance(function, dict):
            raise fail("a tool call fragment's function is not an object", offset, _OPENAI)
        slot.name = _once(slot.name, function.get("name"), "name", offset)
        arguments = function.get("arguments")
        if arguments is not None:
            if not isinstance(arguments, str):
                raise fail("function.arguments is not a string", offset, _OPENAI)
            slot.arguments += arguments


def _once(current: str | None, given: object, label: str, offset: int) -> str | None:
    """A call's id or name is sent once; a different second one is refused."""
    if given is None or given == "":
        return current
    if not isinstance(given, str) or (current is not None and current != given):
        raise fail(f"a tool call's {label} changes within the stream", offset, _OPENAI)
    return given


def _check_json(arguments: str, offset: int, what: str, dialect: str) -> None:
    if not arguments.strip():
        return
    try:
        strict_loads(arguments)
    except json.JSONDecodeError as exc:
        raise fail(f"the joined arguments of {what} are not JSON ({exc.msg} at their "
                   f"offset {exc.pos})", offset, dialect) from exc
    except ValueError as exc:
        raise fail(f"the joined arguments of {what} are not JSON ({exc})", offset,
                   dialect) from exc


# --- anthropic messages ------------------------------------------------------

_ANTHROPIC: Final = "anthropic stream"


@dataclass(slots=True)
class _Block:
    offset: int
    start: dict[str, object]
    parts: list[str]
    stopped: bool = False


@dataclass(slots=True)
class _Message:
    blocks: list[_Block]
    stop_reason: object = None
    started: bool = False
    ended: bool = False


def assemble_anthropic(events: list[Event], end: int) -> object:
    """The message an Anthropic Messages stream streams; see the module."""
    message = _Message([])
    for event in events:
        payload = _payload(event, _ANTHROPIC)
        kind = payload.get("type")
        if event.name and event.name != kind:
            raise fail(f"event {shown(event.name)} carries data of type {shown(kind)}",
                       event.offset, _ANTHROPIC)
        if message.ended:
            raise fail("an event after message_stop", event.offset, _ANTHROPIC)
        _anthropic_event(kind, payload, event.offset, message)
    if not message.ended:
        raise fail("the stream is cut off before message_stop", end, _ANTHROPIC)
    if any(not block.stopped for block in message.blocks):
        raise fail("a content block was never stopped", end, _ANTHROPIC)
    if message.stop_reason is None:
        raise fail("the stream never says why the model stopped (no stop_reason)", end,
                   _ANTHROPIC)
    anthropic_finished(message.stop_reason, _ANTHROPIC, end)
    return {"type": "message", "role": "assistant", "stop_reason": message.stop_reason,
            "content": [_finished_block(index, block)
                        for index, block in enumerate(message.blocks)]}


def _anthropic_event(kind: object, payload: dict[str, object], offset: int,
                     message: _Message) -> None:
    if kind == "ping":
        return
    if kind == "error":
        raise fail("the stream carries an error event", offset, _ANTHROPIC)
    if kind == "message_start":
        if message.started:
            raise fail("a second message_start", offset, _ANTHROPIC)
        message.started = True
        return
    if not message.started:
        raise fail(f"{shown(kind)} before message_start", offset, _ANTHROPIC)
    if kind == "content_block_start":
        _start_block(payload, offset, message.blocks)
    elif kind == "content_block_delta":
        _block_delta(payload, offset, message.blocks)
    elif kind == "content_block_stop":
        _open_block(payload, offset, message.blocks).stopped = True
    elif kind == "message_delta":
        delta = payload.get("delta")
        if isinstance(delta, dict) and delta.get("stop_reason") is not None:
            message.stop_reason = delta["stop_reason"]
    elif kind == "message_stop":
        message.ended = True
    else:
        raise fail(f"an event of type {shown(kind)}, which callward does not read", offset,
                   _ANTHROPIC)


def _start_block(payload: dict[str, object], offset: int, blocks: list[_Block]) -> None:
    block = payload.get("content_block")
    if payload.get("index") != len(blocks) or not isinstance(block, dict):
        raise fail("content_block_start out of order or without a content_block", offset,
                   _ANTHROPIC)
    blocks.append(_Block(offset, block, []))


def _open_block(payload: dict[str, object], offset: int, blocks: list[_Block]) -> _Block:
    index = payload.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(blocks):
        raise fail("an event for a content block that was never started", offset, _ANTHROPIC)
    block = blocks[index]
    if block.stopped:
        raise fail("an event for a content block already stopped", offset, _ANTHROPIC)
    return block


def _block_delta(payload: dict[str, object], offset: int, blocks: list[_Block]) -> None:
    block = _open_block(payload, offset, blocks)
    delta = payload.get("delta")
    if not isinstance(delta, dict) or not isinstance(delta.get("type"), str):
        raise fail("a content_block_delta without a typed delta", offset, _ANTHROPIC)
    kind = delta["type"]
    if kind in _ANTHROPIC_IGNORED_DELTAS or anthropic_block_ignored(block.start.get("type")):
        return
    expected = {"text_delta": ("text", "text"), "input_json_delta": ("tool_use", "partial_json")}
    if kind not in expected or block.start.get("type") != expected[kind][0]:
        raise fail(f"a {shown(kind)} delta for a {shown(block.start.get('type'))} block",
                   offset, _ANTHROPIC)
    part = delta.get(expected[kind][1])
    if not isinstance(part, str):
        raise fail(f"a {shown(kind)} delta without its string", offset, _ANTHROPIC)
    block.parts.append(part)


def _finished_block(index: int, block: _Block) -> dict[str, object]:
    joined = "".join(block.parts)
    kind = block.start.get("type")
    if kind == "text":
        return {"type": "text", "text": str(block.start.get("text") or "") + joined}
    if kind != "tool_use":
        return dict(block.start)
    finished = dict(block.start)
    if joined.strip():
        if finished.get("input") not in (None, {}):
            raise fail("a tool_use block with both a start input and input deltas",
                       block.offset, _ANTHROPIC)
        _check_json(joined, block.offset, f"tool_use block {index}", _ANTHROPIC)
        finished["input"] = strict_loads(joined)
    elif "input" not in finished:
        finished["input"] = {}
    return finished


# --- openai responses --------------------------------------------------------

_RESPONSES: Final = "openai_responses stream"


def assemble_responses(events: list[Event], end: int) -> object:
    final: dict[str, object] | None = None
    for event in events:
        payload = _payload(event, _RESPONSES)
        kind = payload.get("type")
        if final is not None:
            raise fail("an event after the response ended", event.offset, _RESPONSES)
        if kind == "error":
            raise fail("the stream carries an error event", event.offset, _RESPONSES)
        if kind in _RESPONSES_ENDS:
            response = payload.get("response")
            if not isinstance(response, dict):
                raise fail(f"{kind} without its response", event.offset, _RESPONSES)
            final = {**response, "object": "response"}
    if final is None:
        raise fail("the stream is cut off before response.completed", end, _RESPONSES)
    return final

