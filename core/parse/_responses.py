"""
OpenAI's Responses API: a response object (``"object": "response"``), its ``output``
list, or one output item, read as dialect ``openai_responses``.

Each ``function_call`` item gives one call: ``call_id`` is its id, ``arguments`` a
JSON string, decoded strictly. ``message`` items are model text (their
``output_text`` parts are read as text); ``reasoning`` items are skipped. Any other
item type (a built-in or custom tool callward cannot run) is refused, as is a
response whose ``status`` is not ``completed`` (``incomplete`` names
``incomplete_details.reason``, e.g. ``max_output_tokens`` or ``content_filter``) or
an item whose own ``status`` is not ``completed``.
"""

from __future__ import annotations

from typing import Final

from callward.core.parse._api import ReadText
from callward.core.parse._common import (
    Found,
    NewId,
    arguments_from,
    call_id,
    fail,
    make_call,
    shown,
)

_DIALECT: Final = "openai_responses"
_ITEM_TYPES: Final = frozenset({"function_call", "message", "reasoning"})


def is_responses_document(document: object) -> bool:
    if isinstance(document, dict):
        return document.get("object") == "response" or document.get("type") == "function_call"
    return (isinstance(document, list) and bool(document)
            and all(isinstance(item, dict) and isinstance(item.get("type"), str)
                    for item in document)
            and any(item.get("type") == "function_call" for item in document)
            and not any(item.get("type") == "tool_use" for item in document))


def responses_finished(response: dict[str, object]) -> None:
    """Refuse a response that is not ``completed``, naming why."""
    status = response.get("status")
    if status == "completed":
        return
    details = response.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, dict) else None
    why = f"status {shown(status)}" + (f", reason {shown(reason)}" if reason is not None
                                       else "")
    raise fail(f"the model did not finish ({why}); nothing in this response runs",
               None, _DIALECT)


def responses_found(items: object, new_id: NewId, read_text: ReadText) -> list[Found]:
    """The calls of an ``output`` list."""
    if not isinstance(items, list):
        raise fail("output is not a list", None, _DIALECT)
    structured: list[Found] = []
    in_text: list[Found] = []
    for index, item in enumerate(items):
        where = f"output[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise fail(f"{where} is not a typed item", index, _DIALECT)
        kind = item["type"]
        if kind not in _ITEM_TYPES:
            raise fail(f"{where} is a {shown(kind)} item, which callward does not read",
                       index, _DIALECT)
        if item.get("status", "completed") != "completed":
            raise fail(f"{where} has status {shown(item.get('status'))}; the model did not "
                       "finish it", index, _DIALECT)
        if kind == "message":
            in_text += _message_text(item, where, read_text)
        elif kind == "function_call":
            given_id = call_id(item.get("call_id"), f"{where}.call_id", index, _DIALECT)
            structured.append(Found(index, make_call(
                call_id=given_id or new_id(), name=item.get("name"),
                arguments=arguments_from(item.get("arguments", "{}"), index, _DIALECT),
                dialect=_DIALECT, offset=index)))
    if structured and in_text:
        raise fail("calls both as function_call items and in the text; which ones were "
                   "meant is ambiguous", None, _DIALECT)
    return structured or in_text


def _message_text(item: dict[str, object], where: str, read_text: ReadText) -> list[Found]:
    parts = item.get("content", [])
    if not isinstance(parts, list):
        raise fail(f"{where}.content is not a list", None, _DIALECT)
    found: list[Found] = []
    for number, part in enumerate(parts):
        at = f"{where}.content[{number}]"
        if not isinstance(part, dict):
            raise fail(f"{at} is not an object", None, _DIALECT)
        if part.get("type") == "refusal":
            continue
        if part.get("type") != "output_text" or not isinstance(part.get("text"), str):
            raise fail(f"{at} is not output_text", None, _DIALECT)
        found += read_text(str(part["text"]), at)
    return found


def read_responses(document: object, new_id: NewId, read_text: ReadText) -> list[Found]:
    """The calls of a Responses API response, ``output`` list or single item."""
    if isinstance(document, list):
        return responses_found(document, new_id, read_text)
    if not isinstance(document, dict):
        raise fail("not a Responses API payload", None, _DIALECT)
    if document.get("object") != "response":
        return responses_found([document], new_id, read_text)
    responses_finished(document)
    return responses_found(document.get("output"), new_id, read_text)
