"""
Messages of the chat APIs, as a whole JSON document or already decoded.

- ``openai``: a chat-completions assistant message (or a whole response, or a
  bare list) whose ``tool_calls[].function.arguments`` is a JSON string.
- ``anthropic``: a Messages API message (or its ``content`` list) whose
  ``tool_use`` blocks carry ``id``, ``name`` and an ``input`` object.

A call's offset is its index in ``tool_calls`` or ``content``: the document has no
text offsets once decoded.
"""

from __future__ import annotations

import json

from callward.core._canonical import strict_loads
from callward.core.parse._common import Found, NewId, arguments_from, call_id, fail, make_call


def decode_document(text: str) -> object | None:
    """
    The message as one JSON document, or None when it does not decode.

    Raises:
        MalformedCall: It does not decode and mentions ``tool_calls``: an OpenAI
            message that cannot be read.
    """
    try:
        return strict_loads(text)
    except json.JSONDecodeError as exc:
        if "tool_calls" in text:
            raise fail(f"invalid JSON ({exc.msg})", exc.pos, "openai") from exc
        return None
    except ValueError as exc:
        if "tool_calls" in text:
            raise fail(f"invalid JSON ({exc})", None, "openai") from exc
        return None


# --- openai -----------------------------------------------------------------


def is_openai_document(document: object) -> bool:
    if isinstance(document, dict):
        return "tool_calls" in document or "choices" in document
    return isinstance(document, list) and any(
        isinstance(entry, dict) and ("function" in entry or entry.get("type") == "function")
        for entry in document
    )


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


def read_openai(document: object, new_id: NewId) -> list[Found] | None:
    """The calls of an OpenAI message; None when it holds no ``tool_calls`` list."""
    tool_calls = _openai_tool_calls(document)
    if tool_calls is None:
        return None
    found: list[Found] = []
    for index, entry in enumerate(tool_calls):
        where = f"tool_calls[{index}]"
        if not isinstance(entry, dict):
            raise fail(f"{where} is not an object", None, "openai")
        if entry.get("type", "function") != "function":
            raise fail(f"{where} has a type other than function", None, "openai")
        function = entry.get("function")
        if not isinstance(function, dict):
            raise fail(f"{where}.function is missing", None, "openai")
        given_id = call_id(entry.get("id"), f"{where}.id", None, "openai")
        arguments = arguments_from(function.get("arguments", "{}"), index, "openai")
        found.append(
            Found(
                index,
                make_call(
                    call_id=given_id or new_id(),
                    name=function.get("name"),
                    arguments=arguments,
                    dialect="openai",
                    offset=index,
                ),
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


def is_anthropic_document(document: object) -> bool:
    return _anthropic_blocks(document) is not None


def read_anthropic(document: object, new_id: NewId) -> list[Found] | None:
    """The ``tool_use`` blocks of an Anthropic message; None when it is not one."""
    blocks = _anthropic_blocks(document)
    if blocks is None:
        return None
    found: list[Found] = []
    for index, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise fail(f"content[{index}] is not an object", index, "anthropic")
        if block.get("type") != "tool_use":
            continue
        given_id = call_id(block.get("id"), f"content[{index}].id", index, "anthropic")
        if "input" not in block:
            raise fail(f"content[{index}] has no input", index, "anthropic")
        found.append(
            Found(
                index,
                make_call(
                    call_id=given_id or new_id(),
                    name=block.get("name"),
                    arguments=block["input"],
                    dialect="anthropic",
                    offset=index,
                ),
            )
        )
    return found
