"""
Hermes and Qwen tags: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
several per message, among prose.

The JSON inside a tag is decoded before the closing tag is looked for, since a
JSON string may itself hold ``</tool_call>``. A closing tag outside every call
means the model lost track of its own tags, and is refused.
"""

from __future__ import annotations

from typing import Final

from callward.core.parse._common import (
    Found,
    Read,
    Scan,
    Spans,
    arguments_from,
    call_id,
    decode_at,
    fail,
    inside,
    make_call,
    skip_ws,
)

_OPEN: Final = "<tool_call>"
_CLOSE: Final = "</tool_call>"


def read_hermes(text: str, scan: Scan) -> Read:
    """Every tagged call outside ``scan.protected``; it claims each tag, open to close."""
    found: list[Found] = []
    position = 0
    while (start := text.find(_OPEN, position)) != -1:
        _refuse_stray_close(text, position, start, scan.protected)
        if inside(scan.protected, start):
            position = start + len(_OPEN)
            continue
        body_start = skip_ws(text, start + len(_OPEN))
        if body_start >= len(text):
            raise fail(f"{_OPEN} is never closed", start, "hermes")
        # Decode first: a JSON string may itself contain the closing tag.
        document, after = decode_at(text, body_start, "hermes")
        close = skip_ws(text, after)
        if not text.startswith(_CLOSE, close):
            if close >= len(text):
                raise fail(f"{_OPEN} is never closed", start, "hermes")
            raise fail(f"unexpected text after the JSON object, before {_CLOSE}", close, "hermes")
        if not isinstance(document, dict):
            raise fail("the tag must hold one JSON object", body_start, "hermes")
        unexpected = sorted(set(document) - {"name", "arguments", "id"})
        if unexpected:
            raise fail(f"unexpected keys {unexpected}", body_start, "hermes")
        arguments = arguments_from(document.get("arguments", {}), body_start, "hermes")
        given_id = call_id(document.get("id"), "the id", body_start, "hermes")
        found.append(
            Found(
                start,
                make_call(
                    call_id=given_id or scan.new_id(),
                    name=document.get("name"),
                    arguments=arguments,
                    dialect="hermes",
                    offset=body_start,
                ),
                close + len(_CLOSE),
            )
        )
        position = close + len(_CLOSE)
    _refuse_stray_close(text, position, len(text), scan.protected)
    return Read.of_calls(found)


def _refuse_stray_close(text: str, start: int, end: int, protected: Spans) -> None:
    """Outside the calls, a closing tag means the model lost track of its own tags."""
    while (stray := text.find(_CLOSE, start, end)) != -1:
        if not inside(protected, stray):
            raise fail(f"{_CLOSE} without an opening tag", stray, "hermes")
        start = stray + len(_CLOSE)
