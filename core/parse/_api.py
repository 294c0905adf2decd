"""
Messages of the chat APIs, as a whole JSON document or already decoded.

- ``openai``: a chat-completions assistant message (or a whole response, a bare
  list of ``tool_calls`` entries, or one entry) whose
  ``tool_calls[].function.arguments`` is a JSON string (the legacy ``function_call``
  too).
- ``anthropic``: a Messages API message (or its ``content`` list) whose
  ``tool_use`` blocks carry ``id``, ``name`` and an ``input`` object.
- ``openai_responses`` (in ``_responses``): the Responses API.

Invariants:

- A response the model did not finish never yields a call: OpenAI's
  ``finish_reason`` other than ``stop``/``tool_calls``/``function_call`` (``length``,
  ``content_filter``, null) and Anthropic's ``stop_reason`` other than
  ``end_turn``/``tool_use``/``stop_sequence`` (``max_tokens``, ``refusal``,
  ``pause_turn``, ``model_context_window_exceeded``) refuse the whole message,
  naming the reason. A bare message, which carries no reason, is read as given.
- A response with several ``choices`` is refused: they are alternatives, and
  reading one would silently drop the others.
- The text parts (a message's ``content`` string, Anthropic ``text`` blocks) are
  read as model text too, so calls a server left in the text are not lost; a
  message with calls both in its structure and in its text is refused.
- A document shaped like an API payload that no reader knows is refused
  (``is_api_shaped``), never read as "no calls".

A call's offset is its index in ``tool_calls`` or ``content``: the document has no
text offsets once decoded; messages name the JSON path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Final, TypeGuard

from callward.core._canonical import strict_loads
from callward.core.errors import MalformedCall
from callward.core.parse._common import (
    Found,
    NewId,
    arguments_from,
    call_id,
    fail,
    make_call,
    shown,
)

#: Reads a text part of a payload as model text; ``where`` names it in errors.
ReadText = Callable[[str, str], list[Found]]

OPENAI_FINISHED: Final = frozenset({"stop", "tool_calls", "function_call"})
ANTHROPIC_FINISHED: Final = frozenset({"end_turn", "tool_use", "stop_sequence"})
# Reasoning, and the server tools Anthropic itself ran: not calls for callward to run.
_ANTHROPIC_IGNORED_BLOCKS: Final = frozenset({"thinking", "redacted_thinking",
                                              "server_tool_use", "mcp_tool_use"})

# Keys and type names only API payloads carry; a plain JSON answer has none of them.
_API_KEYS: Final = frozenset({"choices", "tool_calls", "stop_reason", "finish_reason",
                              "incomplete_details", "candidates", "function_call"})
_API_TYPES: Final = frozenset({
    "message", "response", "function_call", "tool_use", "tool_calls", "error",
    "message_start", "message_delta", "message_stop", "content_block_start",
    "content_block_delta", "content_block_stop", "custom_tool_call", "reasoning",
})
_PAYLOAD_TEXT: Final = re.compile(
    r'"(?:choices|tool_calls|tool_use|stop_reason|finish_reason|function_call|'
    r'incomplete_details)"\s*:')


def anthropic_block_ignored(kind: object) -> bool:
    """Whether a content block is neither text nor a call (reasoning, a server tool)."""
    return isinstance(kind, str) and (
        kind in _ANTHROPIC_IGNORED_BLOCKS or kind.endswith("_tool_result"))


def decode_document(text: str) -> object | None:
    """
    The message as one JSON document, or None when it does not decode.

    Raises:
        MalformedCall: It does not decode and names a key only API payloads carry
            (``tool_calls``, ``choices``, ``stop_reason``...): a payload that was cut
            off or broken, refused at the offset where decoding stopped.
    """
    try:
        return strict_loads(text)
    except json.JSONDecodeError as exc:
        if _PAYLOAD_TEXT.search(text):
            raise fail(f"an API payload that is not valid JSON ({exc.msg})", exc.pos,
                       _payload_dialect(text)) from exc
        return None
    except ValueError as exc:
        if _PAYLOAD_TEXT.search(text):
            raise fail(f"an API payload that is not valid JSON ({exc})", None,
                       _payload_dialect(text)) from exc
        return None


def _payload_dialect(text: str) -> str:
    if '"tool_calls"' in text or '"choices"' in text or '"finish_reason"' in text:
        return "openai"
    if '"stop_reason"' in text or '"tool_use"' in text:
        return "anthropic"
    return "api"


def is_api_shaped(document: object) -> bool:
    """Whether a JSON document looks like an API payload (so unknown means refused)."""
    if isinstance(document, list):
        return any(is_api_shaped(entry) for entry in document if isinstance(entry, dict))
    if not isinstance(document, dict):
        return False
    kind = document.get("type")
    return bool(
        _API_KEYS & set(document)
        or (isinstance(kind, str) and kind in _API_TYPES)
        or isinstance(document.get("object"), str)
        or isinstance(document.get("output"), list)
        or document.get("role") == "assistant"
    )


def refuse_unknown_payload(document: object) -> MalformedCall:
    """The refusal of a payload no reader knows; it names its shape, never its content."""
    shape = (f"an object of {len(document)} keys" if isinstance(document, dict)
             else "a list" if isinstance(document, list) else type(document).__name__)
    return fail(f"an API payload callward does not read ({shape}); send a chat-"
                "completions, Messages or Responses payload", None, "api")


def _in_text(read_text: ReadText, text: object, where: str, dialect: str) -> list[Found]:
    """The calls in a text part: a string, or a list of ``text`` parts (refusals skipped)."""
    if text is None:
        return []
    if isinstance(text, list):
        found: list[Found] = []
        for number, part in enumerate(text):
            at = f"{where}[{number}]"
            if isinstance(part, dict) and part.get("type") == "refusal":
                continue
            if not isinstance(part, dict) or part.get("type") != "text":
                raise fail(f"{at} is not a text part", None, dialect)
            found += _in_text(read_text, part.get("text"), f"{at}.text", dialect)
        return found
    if not isinstance(text, str):
        raise fail(f"{where} is not a string", None, dialect)
    return read_text(text, where)


def _one_source(structured: list[Found], in_text: list[Found], dialect: str) -> list[Found]:
    if structured and in_text:
        raise fail("calls both in the message's structure and in its text; which ones "
                   "were meant is ambiguous", None, dialect)
    return structured or in_text


# --- openai -----------------------------------------------------------------


def _is_tool_call_entry(entry: object) -> bool:
    # {"type": "function", "name": ..., "parameters": ...} is Llama's call object, not this.
    return isinstance(entry, dict) and "function" in entry


def is_openai_document(document: object) -> bool:
    if isinstance(document, dict):
        return ("tool_calls" in document or "choices" in document
                or document.get("object") == "chat.completion"
                or (document.get("role") == "assistant"
                    and not isinstance(document.get("content"), list))
                or _is_tool_call_entry(document))
    return isinstance(document, list) and any(_is_tool_call_entry(entry) for entry in document)


def _openai_message(document: dict[str, object]) -> dict[str, object]:
    """The message of a whole response, checked finished; a message is itself."""
    if "choices" not in document:
        return document
    choices = document["choices"]
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        count = len(choices) if isinstance(choices, list) else "no list of"
        raise fail(f"{count} choices; callward reads a response with exactly one",
                   None, "openai")
    # An absent reason (a response put together by hand) is read like a bare message;
    # a null one is what a server sends while the model is still going.
    reason = choices[0].get("finish_reason", "stop")
    if reason not in OPENAI_FINISHED:
        raise fail(f"the model did not finish (finish_reason {shown(reason)}); nothing "
                   "in this response runs", None, "openai")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise fail("choices[0].message is missing", None, "openai")
    return message


def openai_found(tool_calls: object, new_id: NewId, where: str) -> list[Found]:
    """The calls of a ``tool_calls`` list (of a message, or assembled from a stream)."""
    if not isinstance(tool_calls, list):
        raise fail(f"{where} is not a list", None, "openai")
    found: list[Found] = []
    for index, entry in enumerate(tool_calls):
        at = f"{where}[{index}]"
        if not isinstance(entry, dict):
            raise fail(f"{at} is not an object", None, "openai")
        if entry.get("type", "function") != "function":
            raise fail(f"{at} has a type other than function", None, "openai")
        function = entry.get("function")
        if not isinstance(function, dict):
            raise fail(f"{at}.function is missing", None, "openai")
        given_id = call_id(entry.get("id"), f"{at}.id", None, "openai")
        arguments = arguments_from(function.get("arguments", "{}"), index, "openai")
        found.append(Found(index, make_call(call_id=given_id or new_id(),
                                            name=function.get("name"), arguments=arguments,
                                            dialect="openai", offset=index)))
    return found


def read_openai(document: object, new_id: NewId, read_text: ReadText) -> list[Found]:
    """The calls of an OpenAI message, response or bare ``tool_calls`` list."""
    if isinstance(document, list):
        return openai_found(document, new_id, "tool_calls")
    if not isinstance(document, dict):
        raise fail("not an OpenAI message", None, "openai")
    if _is_tool_call_entry(document) and not ({"tool_calls", "choices", "role"} & set(document)):
        return openai_found([document], new_id, "tool_calls")
    message = _openai_message(document)
    structured: list[Found] = []
    if message.get("tool_calls") is not None:
        structured = openai_found(message["tool_calls"], new_id, "tool_calls")
    legacy = message.get("function_call")
    if legacy is not None:
        if structured or not isinstance(legacy, dict):
            raise fail("function_call must be one object, and not beside tool_calls",
                       None, "openai")
        structured = openai_found([{"function": legacy}], new_id, "function_call")
    in_text = _in_text(read_text, message.get("content"), "content", "openai")
    return _one_source(structured, in_text, "openai")


# --- anthropic --------------------------------------------------------------


def _anthropic_blocks(document: object) -> list[object] | None:
    """
    The content blocks of a message, or a bare list of them; None if not that shape. A
    message's blocks are its ``content`` list of typed objects; a bare list counts when
    it holds a ``tool_use`` or ``text`` block.
    """
    if isinstance(document, dict):
        if "tool_calls" in document:
            return None
        is_message = document.get("type") == "message" or document.get("role") == "assistant"
        document = document.get("content")
        if is_message and isinstance(document, list):
            return document
        return list(document) if _typed_blocks(document) else None
    if not _typed_blocks(document):
        return None
    if not any(block.get("type") in ("tool_use", "text") for block in document):
        return None
    return list(document)


def _typed_blocks(value: object) -> TypeGuard[list[dict[str, object]]]:
    return isinstance(value, list) and bool(value) and all(
        isinstance(block, dict) and isinstance(block.get("type"), str) for block in value)


def is_anthropic_document(document: object) -> bool:
    return _anthropic_blocks(document) is not None


def anthropic_finished(reason: object, dialect: str = "anthropic",
                       offset: int | None = None) -> None:
    """Refuse a message the model did not finish; None (a bare message) is read."""
    if reason is not None and reason not in ANTHROPIC_FINISHED:
        raise fail(f"the model did not finish (stop_reason {shown(reason)}); nothing in "
                   "this message runs", offset, dialect)


def anthropic_found(blocks: list[object], new_id: NewId, read_text: ReadText,
                    dialect: str = "anthropic") -> list[Found]:
    """The calls of a list of content blocks (of a message, or assembled from a stream)."""
    structured: list[Found] = []
    in_text: list[Found] = []
    for index, block in enumerate(blocks):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise fail(f"content[{index}] is not a typed block", index, dialect)
        kind = block["type"]
        if kind == "text":
            in_text += _in_text(read_text, block.get("text"), f"content[{index}].text", dialect)
            continue
        if anthropic_block_ignored(kind):
            continue
        if kind != "tool_use":
            raise fail(f"content[{index}] is a {shown(kind)} block, which callward does not "
                       "read", index, dialect)
        given_id = call_id(block.get("id"), f"content[{index}].id", index, "anthropic")
        if "input" not in block:
            raise fail(f"content[{index}] has no input", index, dialect)
        structured.append(Found(index, make_call(call_id=given_id or new_id(),
                                                 name=block.get("name"),
                                                 arguments=block["input"],
                                                 dialect="anthropic", offset=index)))
    return _one_source(structured, in_text, dialect)


def read_anthropic(document: object, new_id: NewId, read_text: ReadText) -> list[Found]:
    """The ``tool_use`` blocks of an Anthropic message, checked finished."""
    blocks = _anthropic_blocks(document)
    if blocks is None:
        raise fail("not an Anthropic message", None, "anthropic")
    if isinstance(document, dict):
        anthropic_finished(document.get("stop_reason"))
    return anthropic_found(blocks, new_id, read_text)
