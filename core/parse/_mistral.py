"""
Mistral's ``[TOOL_CALLS]``, as ``mistral-common`` renders it, read as dialect ``mistral``:

- tokenizer v3/v7 (Mistral-7B-Instruct-v0.3, Mixtral, Nemo): one JSON list,
  ``[TOOL_CALLS] [{"name": ..., "arguments": {...}, "id": "abcDEF123"}, ...]``;
- v11 (Mistral-Small-3.2): ``[TOOL_CALLS]name[CALL_ID]abcDEF123[ARGS]{...}`` per call;
- v13+ (Magistral, Ministral-3, Devstral-2, Mistral-Medium-3.5):
  ``[TOOL_CALLS]name[ARGS]{...}`` per call, with nothing between calls.

Text before the first marker (prose, ``[THINK]…[/THINK]``) is the model's prose.
After the calls only ``</s>`` or the end of the message may follow: text after the
arguments (a known failure of other parsers, which fold it into the arguments) is
refused, as is a marker followed by anything that is not a call.
"""

from __future__ import annotations

import re
from typing import Final

from callward.core.parse._common import (
    Found,
    Read,
    Scan,
    call_id,
    decode_at,
    fail,
    inside,
    make_call,
    skip_ws,
)

_DIALECT: Final = "mistral"
_MARKER: Final = "[TOOL_CALLS]"
_END: Final = "</s>"
_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CALL_ID: Final = re.compile(r"\[CALL_ID\]([A-Za-z0-9]{1,64})")
_ARGS: Final = "[ARGS]"
_LIST_KEYS: Final = frozenset({"name", "arguments", "id"})


def read_mistral(text: str, scan: Scan) -> Read:
    """Every ``[TOOL_CALLS]`` outside the protected and taken spans; it claims each run."""
    found: list[Found] = []
    spans: list[tuple[int, int]] = []
    position = 0
    while (start := text.find(_MARKER, position)) != -1:
        if inside(scan.protected, start) or inside(scan.taken, start):
            position = start + len(_MARKER)
            continue
        index = start
        while True:
            marker = index
            body = skip_ws(text, index + len(_MARKER))
            if text.startswith("[", body):
                index = _read_list(text, body, found, scan)
            else:
                index = _read_compact(text, marker, body, found, scan)
            if not text.startswith(_MARKER, skip_ws(text, index)):
                break
            index = skip_ws(text, index)
        index = skip_ws(text, index)
        if text.startswith(_END, index):
            index = skip_ws(text, index + len(_END))
        if index < len(text):
            raise fail("unexpected text after the calls", index, _DIALECT)
        spans.append((start, len(text)))
        position = len(text)
    return Read(found, tuple(spans))


def _read_list(text: str, index: int, found: list[Found], scan: Scan) -> int:
    value, after = decode_at(text, index, _DIALECT)
    if not isinstance(value, list) or not value:
        raise fail("expected a non-empty list of calls", index, _DIALECT)
    for item in value:
        if not isinstance(item, dict) or "name" not in item:
            raise fail("each item must be a call object with a name", index, _DIALECT)
        unexpected = sorted(set(item) - _LIST_KEYS)
        if unexpected:
            raise fail(f"unexpected keys {unexpected}", index, _DIALECT)
        given_id = call_id(item.get("id"), "the id", index, _DIALECT)
        found.append(Found(index, make_call(call_id=given_id or scan.new_id(),
                                            name=item["name"],
                                            arguments=item.get("arguments", {}),
                                            dialect=_DIALECT, offset=index), after))
    return after


def _read_compact(text: str, start: int, index: int, found: list[Found], scan: Scan) -> int:
    """``name[CALL_ID]id[ARGS]{...}`` (``[CALL_ID]`` optional) at ``index``."""
    name = _NAME.match(text, index)
    if name is None:
        raise fail(f"{_MARKER} is followed by neither a list of calls nor a tool name",
                   index, _DIALECT)
    index = name.end()
    given_id = None
    if identifier := _CALL_ID.match(text, index):
        given_id = identifier.group(1)
        index = identifier.end()
    if not text.startswith(_ARGS, index):
        raise fail(f"expected {_ARGS} after the tool name", index, _DIALECT)
    body = skip_ws(text, index + len(_ARGS))
    arguments, after = decode_at(text, body, _DIALECT)
    if not isinstance(arguments, dict):
        raise fail("the arguments must be a JSON object", body, _DIALECT)
    found.append(Found(start, make_call(call_id=given_id or scan.new_id(), name=name.group(),
                                        arguments=arguments, dialect=_DIALECT, offset=body),
                       after))
    return after
