"""
What a call's records hold when its input is hostile: a huge argument is recorded as
its digest (denied or allowed), and an integer I-JSON cannot hold names its tool and path.
"""

from __future__ import annotations

import json

from callward.core import ToolCall, ToolRegistry, canonical_bytes, sha256_hex, tool
from callward.core._canonical import ELIDED_KEY
from callward.policies import Policy


@tool(version="1.0.0", parameters={"type": "object", "properties": {"text": {"type": "string"}},
                                   "required": ["text"], "additionalProperties": False})
def echo(text: str) -> str:
    return text


ECHO_POLICY = """
version: 1
default: deny
rules:
  - {id: anyone-echoes, effect: allow, principals: ["*"], tools: [echo]}
"""


def body_of(record) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(record.body_json)


class TestBoundedArguments:
    def test_a_denied_call_with_a_megabyte_argument_records_its_digest(self, gateway, store):
        """
        A 1,000,000-character argument of a denied call puts a few hundred bytes in
        the log, and the digest there is the SHA-256 of the value's canonical bytes.
        """
        huge = "A" * 1_000_000
        call = ToolCall.create(id="c1", name="drop_table", arguments={"table": huge},
                               dialect="api")

        result = gateway.handle(call, principal="mallory")

        record = store.last()
        elided = body_of(record)["call"]["arguments"]["table"][ELIDED_KEY]
        expected = (False, "call.denied", ["$.table"], sha256_hex(canonical_bytes(huge)),
                    1_000_002, "A" * 64, True)
        assert expected == (result.ok, record.kind,
                            body_of(record)["call"]["arguments_elided"], elided["sha256"],
                            elided["bytes"], elided["prefix"], len(record.record_bytes) < 4096)

    def test_an_allowed_call_is_bounded_the_same_way(self, make_gateway, store, runner):
        """An allowed call's authorized record elides the argument; the tool got it whole."""
        registry = ToolRegistry()
        registry.register(echo)
        gateway = make_gateway(registry=registry, policy=Policy.from_text(ECHO_POLICY))
        call = ToolCall.create(id="c1", name="echo", arguments={"text": "x" * 10_000},
                               dialect="api")

        gateway.handle(call, principal="alice")

        authorized = next(r for r in store.records() if r.kind == "call.authorized")
        expected = (["$.text"], 10_002, 10_000)
        assert expected == (body_of(authorized)["call"]["arguments_elided"],
                            body_of(authorized)["call"]["arguments"]["text"][ELIDED_KEY]
                            ["bytes"], len(runner.calls[0].arguments["text"]))

    def test_small_arguments_are_recorded_whole(self, gateway, store):
        """Arguments within the bound are recorded as they are, with no elision list."""
        gateway.handle(ToolCall.create(id="c1", name="square", arguments={"x": 7},
                                       dialect="api"), principal="alice")

        authorized = next(r for r in store.records() if r.kind == "call.authorized")
        expected = ({"x": 7}, False)
        assert expected == (body_of(authorized)["call"]["arguments"],
                            "arguments_elided" in body_of(authorized)["call"])


class TestNonIJsonArguments:
    def test_an_integer_beyond_i_json_names_the_tool_and_path(self, gateway, store, runner):
        """The refusal and its record name the tool and the JSON path; nothing ran."""
        text = '{"name": "square", "arguments": {"x": 99999999999999999999}}'

        (result,) = gateway.handle_text(text, principal="alice")

        record = store.last()
        expected = ("malformed", "square", "$.x", "call.rejected", "square", "$.x", [])
        assert expected == (result.kind, result.tool, result.content["json_path"], record.kind,
                            body_of(record)["tool"], body_of(record)["json_path"], runner.calls)
