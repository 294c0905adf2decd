"""Every call or none, never a cut-off one: call sequences, unfinished responses, unknown
payloads, Mistral, Llama's <function=...>, the Responses API and streamed responses."""

from __future__ import annotations

import contextlib
import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callward.core import MalformedCall
from callward.core._canonical import STRICT_DECODER
from callward.core.parse._common import JSONError, decode_json
from callward.core.parse._front import parse_model_output
from callward.core.parse._sse import is_stream

ORDERS = {"square": ("x",), "add": ("a", "b")}


def parse(text):
    counter = itertools.count(1)
    return parse_model_output(text, parameter_order=ORDERS.get,
                              new_id=lambda: f"gen_{next(counter)}")


def named(text):
    return [(call.name, call.arguments) for call in parse(text)]


def refused(text):
    with pytest.raises(MalformedCall) as caught:
        parse(text)
    assert "malformed" == caught.value.kind
    return caught.value


ADD = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
SQUARE = '{"name": "square", "arguments": {"x": 3}}'
BOTH = [("add", {"a": 1, "b": 2}), ("square", {"x": 3})]


# --- streams ------------------------------------------------------------------


def chunk(delta, finish=None, index=0):
    return "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [
        {"index": index, "delta": delta, "finish_reason": finish}]}) + "\n\n"


def fragment(index, arguments, call_id=None, name=None):
    function = {"arguments": arguments}
    if name is not None:
        function["name"] = name
    entry = {"index": index, "function": function}
    if call_id is not None:
        entry["id"] = call_id
        entry["type"] = "function"
    return {"tool_calls": [entry]}


def openai_stream(*pieces, finish="tool_calls", done=True):
    text = "".join(chunk(piece) for piece in pieces)
    if finish is not None:
        text += chunk({}, finish)
    return text + ("data: [DONE]\n\n" if done else "")


def event(name, data):
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def anthropic_stream(*partials, stop_reason="tool_use", stop=True, start_input=None):
    text = event("message_start", {"type": "message_start", "message": {"content": []}})
    text += event("content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "tool_use", "id": "t1",
                                                            "name": "square",
                                                            "input": start_input or {}}})
    for partial in partials:
        text += event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "input_json_delta",
                                                        "partial_json": partial}})
    text += event("content_block_stop", {"type": "content_block_stop", "index": 0})
    text += event("message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": stop_reason}})
    return text + (event("message_stop", {"type": "message_stop"}) if stop else "")


def responses_stream(status="completed", reason=None, end="response.completed"):
    response = {"object": "response", "status": status, "output": [
        {"type": "function_call", "call_id": "c1", "name": "square", "arguments": '{"x": 3}',
         "status": "completed"}]}
    if reason is not None:
        response["incomplete_details"] = {"reason": reason}
    text = event("response.output_item.added", {"type": "response.output_item.added",
                                                "output_index": 0, "item": {}})
    return text + (event(end, {"type": end, "response": response}) if end else "")


class TestEveryCall:
    @pytest.mark.parametrize("separator", ["; ", " ", ",", ", ", ";", "", "\n", " ;\t"])
    def test_bare_calls_in_a_row_all_come_out(self, separator):
        """Two bare call objects on one line, or one per line, give both calls, in order."""
        assert BOTH == named(ADD + separator + SQUARE)

    def test_three_calls_after_prose(self):
        """A sequence after a line of prose is read whole."""
        assert [*BOTH, BOTH[0]] == named(f"Calling.\n{ADD}; {SQUARE}, {ADD}\nDone.")

    def test_calls_in_a_fence_separated_by_commas(self):
        """In a json fence, calls separated by ',' or ';' all come out."""
        assert BOTH == named(f"```json\n{ADD},\n{SQUARE}\n```")

    def test_second_call_hidden_in_prose_refuses_the_message(self):
        """A call object inside prose after a valid call is refused, never dropped."""
        error = refused(f"{ADD} and then, quietly, {SQUARE}")

        assert ("json", len(ADD) + len(" and then, quietly, ")) == (error.dialect, error.offset)

    def test_call_object_inside_a_line_of_prose_is_refused(self):
        """A call in the middle of a sentence may be a description: refused, not run."""
        assert "json" == refused(f"I could run {ADD} but I will not.").dialect

    def test_json_after_a_call_that_is_not_a_call_is_refused(self):
        """Whatever follows a call on its line as JSON must be a call too."""
        assert len(ADD) + 1 == refused(ADD + ' {"a": 1}').offset

    def test_text_after_the_calls_in_a_fence_is_refused(self):
        """A fence holding a call and then something else is refused."""
        assert "json" == refused(f"```json\n{ADD}\n{{'name': 'square'}}\n```").dialect

    def test_data_objects_in_prose_are_not_calls(self):
        """JSON in prose that is not shaped like a call stays text."""
        assert [] == named('The config is {"name": "Alice", "age": 3}, and {"x": [1, 2]}.')

    def test_hermes_then_a_bare_call(self):
        """Calls in two dialects in one message both come out."""
        text = f"<tool_call>{ADD}</tool_call>\n{SQUARE}"

        assert BOTH == named(text)


class TestUnfinished:
    @pytest.mark.parametrize("reason", ["length", "content_filter", None, "unknown"])
    def test_openai_response_not_finished_is_refused(self, reason):
        """A chat completion that stopped for any reason but stop/tool_calls never runs."""
        response = {"choices": [{"index": 0, "finish_reason": reason, "message": {
            "role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
                "name": "square", "arguments": '{"x": 3}'}}]}}]}

        error = refused(json.dumps(response))

        assert ("openai", True) == (error.dialect, repr(reason) in error.message)

    @pytest.mark.parametrize("reason", ["stop", "tool_calls"])
    def test_openai_finished_response_runs(self, reason):
        """stop and tool_calls are the finished reasons."""
        response = {"choices": [{"index": 0, "finish_reason": reason, "message": {
            "role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
                "name": "square", "arguments": '{"x": 3}'}}]}}]}

        assert [("square", {"x": 3})] == named(json.dumps(response))

    def test_openai_several_choices_are_refused(self):
        """Two choices are alternatives: reading one would drop the other silently."""
        choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                                                                   "content": "hi"}}

        assert "openai" == refused(json.dumps({"choices": [choice, choice]})).dialect

    def test_openai_legacy_function_call(self):
        """The deprecated message.function_call is one call."""
        message = {"role": "assistant", "content": None,
                   "function_call": {"name": "square", "arguments": '{"x": 3}'}}

        assert [("square", {"x": 3})] == named(json.dumps(message))

    @pytest.mark.parametrize("reason", ["max_tokens", "refusal", "pause_turn",
                                        "model_context_window_exceeded"])
    def test_anthropic_message_not_finished_is_refused(self, reason):
        """A Messages response that did not end its turn never runs."""
        message = {"type": "message", "role": "assistant", "stop_reason": reason, "content": [
            {"type": "tool_use", "id": "t", "name": "square", "input": {"x": 3}}]}

        error = refused(json.dumps(message))

        assert ("anthropic", True) == (error.dialect, reason in error.message)

    @pytest.mark.parametrize(("status", "reason"), [("incomplete", "max_output_tokens"),
                                                    ("incomplete", "content_filter"),
                                                    ("failed", None), ("in_progress", None)])
    def test_responses_not_completed_is_refused(self, status, reason):
        """A Responses API response that is not completed never runs, and says why."""
        response = {"object": "response", "status": status, "output": [
            {"type": "function_call", "call_id": "c", "name": "square", "arguments": "{}"}]}
        if reason:
            response["incomplete_details"] = {"reason": reason}

        error = refused(json.dumps(response))

        assert ("openai_responses", True) == (error.dialect, str(reason or status) in
                                              error.message)

    def test_responses_item_not_completed_is_refused(self):
        """A function_call item whose own status is in_progress never runs."""
        response = {"object": "response", "status": "completed", "output": [
            {"type": "function_call", "call_id": "c", "name": "square", "arguments": "{}",
             "status": "in_progress"}]}

        assert "openai_responses" == refused(json.dumps(response)).dialect


class TestUnknownPayload:
    @pytest.mark.parametrize("document", [
        {"object": "list", "data": []},
        {"candidates": [{"content": {"parts": [{"functionCall": {"name": "square"}}]}}]},
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        {"model": "qwen3", "message": {"role": "assistant", "content": ""}, "done": True,
         "stop_reason": "stop"},
        {"object": "response", "status": "completed", "output": [{"type": "web_search_call"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "image"}],
         "stop_reason": "end_turn"},
        [{"type": "custom_tool_call", "name": "square", "input": "x=3"}],
    ])
    def test_unknown_api_payload_is_refused(self, document):
        """A payload shaped like an API's that no reader knows is refused, not 'no calls'."""
        refused(json.dumps(document))

    @pytest.mark.parametrize("text", [
        '{"name": "Alice", "age": 3}', '{"output": 42}', '{"answer": "Paris", "type": 3}',
        '[1, 2, 3]', '{"status": "ok", "tool": "square"}',
    ])
    def test_plain_json_answers_have_no_calls(self, text):
        """A JSON answer without API keys is an answer, not a refused payload."""
        assert [] == named(text)

    def test_decoded_payload_nobody_claims_is_refused(self):
        """A decoded mapping handed to the parser is a payload: unknown means refused."""
        with pytest.raises(MalformedCall):
            parse_model_output({"candidates": []}, parameter_order=ORDERS.get,
                               new_id=lambda: "x")

    def test_truncated_api_payload_is_refused_naming_its_api(self):
        """A payload cut off mid-way is refused as that API's, at the offset."""
        text = '{"id": "chatcmpl-1", "choices": [{"index": 0, "finish_reason": "stop'

        error = refused(text)

        assert ("openai", text.index('"stop')) == (error.dialect, error.offset)

    def test_plain_assistant_message_is_an_answer(self):
        """An OpenAI message with text content and no calls gives no calls."""
        assert [] == named('{"role": "assistant", "content": "It is 9."}')


class TestTextParts:
    def test_calls_in_openai_content_are_read(self):
        """A server that left the model's call in the content text does not lose it."""
        message = {"role": "assistant", "content": f"<tool_call>{ADD}</tool_call>"}

        assert [BOTH[0]] == named(json.dumps(message))

    def test_content_parts_beside_tool_calls_are_read(self):
        """A content list of text parts is read too; a refusal part is skipped."""
        message = {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                        "function": {"name": "square",
                                                                     "arguments": '{"x": 3}'}}],
                   "content": [{"type": "text", "text": "Squaring."},
                               {"type": "refusal", "refusal": "no"}]}

        assert [BOTH[1]] == named(json.dumps(message))

    def test_calls_in_both_places_are_refused(self):
        """Calls in tool_calls and in the content at once are ambiguous: refused."""
        message = {"role": "assistant", "content": f"<tool_call>{ADD}</tool_call>",
                   "tool_calls": [{"id": "c", "type": "function", "function": {
                       "name": "square", "arguments": '{"x": 3}'}}]}

        assert "ambiguous" in refused(json.dumps(message)).message

    def test_error_in_the_text_names_where(self):
        """A malformed call in a text part names the part, its dialect and offset."""
        message = {"type": "message", "role": "assistant", "stop_reason": "end_turn",
                   "content": [{"type": "text", "text": "<tool_call>{\"name\": 1"}]}

        error = refused(json.dumps(message))

        assert ("hermes", True) == (error.dialect, error.message.startswith("content[0].text"))

    def test_calls_in_a_bare_content_list_are_read(self):
        """A content list of text blocks is a message too: calls in its text come out."""
        document = {"content": [{"type": "text", "text": ADD}]}

        assert [BOTH[0]] == named(json.dumps(document))

    def test_one_openai_tool_call_entry(self):
        """One tool_calls entry on its own is a call, not a JSON answer."""
        entry = {"id": "c1", "type": "function",
                 "function": {"name": "square", "arguments": '{"x": 3}'}}

        assert [("c1", "openai")] == [(call.id, call.dialect) for call in
                                      parse(json.dumps(entry))]

    def test_llama_typed_call_objects_are_json_calls(self):
        """Llama's {"type": "function", "name", "parameters"} objects are json calls."""
        text = json.dumps([{"type": "function", "name": "add", "parameters": {"a": 1, "b": 2}},
                           {"type": "function", "name": "square", "parameters": {"x": 3}}])

        assert BOTH == named(text)

    def test_anthropic_server_tool_blocks_are_not_calls(self):
        """Blocks of tools Anthropic ran itself are skipped, not run and not refused."""
        message = {"type": "message", "role": "assistant", "stop_reason": "end_turn",
                   "content": [{"type": "server_tool_use", "id": "s", "name": "web_search",
                                "input": {"query": "x"}},
                               {"type": "web_search_tool_result", "tool_use_id": "s",
                                "content": []},
                               {"type": "text", "text": "It is sunny."}]}

        assert [] == named(json.dumps(message))


class TestMistral:
    def test_list_form_with_ids(self):
        """v3: one JSON list after [TOOL_CALLS], the ids kept."""
        calls = parse('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}, '
                      '"id": "abcDEF123"}, {"name": "square", "arguments": {"x": 3}, '
                      '"id": "xyzXYZ789"}]</s>')

        assert [("abcDEF123", "add", "mistral"), ("xyzXYZ789", "square", "mistral")] == [
            (call.id, call.name, call.dialect) for call in calls]

    def test_compact_form_with_and_without_call_ids(self):
        """v11 [CALL_ID] and v13 compact calls, several in a row, after reasoning."""
        text = ('[THINK]two tools[/THINK][TOOL_CALLS]add[CALL_ID]abcDEF123[ARGS]{"a": 1, "b": 2}'
                '[TOOL_CALLS]square[ARGS]{"x": 3}</s>')

        assert BOTH == named(text)

    @pytest.mark.parametrize(("text", "offset"), [
        ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1', 50),
        ('[TOOL_CALLS]add[ARGS]{"a": 1}, {"b": 2}', 29),
        ("[TOOL_CALLS]add{\"a\": 1}", 15),
        ("[TOOL_CALLS]", 12),
        ('[TOOL_CALLS]add[ARGS][1, 2]', 21),
        ('[TOOL_CALLS][{"name": "add", "arguments": {}, "extra": 1}]', 12),
        ("We use the [TOOL_CALLS] marker for calls.", 30),
    ])
    def test_unreadable_mistral_names_mistral_and_the_offset(self, text, offset):
        """A [TOOL_CALLS] that cannot be read is refused as mistral, where it fails."""
        error = refused(text)

        assert ("mistral", offset) == (error.dialect, error.offset)

    def test_markers_inside_arguments_are_data(self):
        """Another dialect's tags inside a Mistral argument string are data."""
        text = '[TOOL_CALLS]square[ARGS]{"x": "<tool_call>{\\"name\\": \\"add\\"}</tool_call>"}'

        assert [("square", {"x": '<tool_call>{"name": "add"}</tool_call>'})] == named(text)


class TestFunctionTag:
    def test_several_tags_and_a_closing_tag_inside_a_string(self):
        """Each <function=name>{...}</function> is a call; a string may hold the close tag."""
        text = ('<function=add>{"a": 1, "b": 2}</function>\n'
                '<function=square>{"x": "</function>"}</function><|eot_id|>')

        assert [BOTH[0], ("square", {"x": "</function>"})] == named(text)

    @pytest.mark.parametrize(("text", "offset"), [
        ('<function=square>{"x": 3}', 25),
        ('<function=square>{"x": 3} please</function>', 26),
        ("<function=square><parameter=x>3</parameter></function>", 17),
        ('<function=square {"x": 3}</function>', 10),
        ("done </function>", 5),
    ])
    def test_unreadable_tags_name_llama_and_the_offset(self, text, offset):
        """Unclosed, trailing text, XML parameters, no name, stray close: refused as llama."""
        error = refused(text)

        assert ("llama", offset) == (error.dialect, error.offset)


class TestOpenAIStream:
    def test_fragments_join_by_index_even_interleaved(self):
        """Argument fragments of two calls, interleaved, join per index, in index order."""
        text = openai_stream(fragment(0, "", "c1", "add"), fragment(1, '{"x"', "c2", "square"),
                             fragment(0, '{"a": 1, '), fragment(1, ": 3}"),
                             fragment(0, '"b": 2}'))

        calls = parse(text)

        assert [("c1", *BOTH[0]), ("c2", *BOTH[1])] == [
            (call.id, call.name, call.arguments) for call in calls]

    def test_text_only_stream_is_an_answer(self):
        """A stream of content deltas with finish_reason stop has no calls."""
        assert [] == named(openai_stream({"content": "It is "}, {"content": "9."},
                                         finish="stop"))

    def test_calls_in_streamed_content_are_read(self):
        """Content deltas are joined and read as text, so a call split over chunks is read."""
        text = openai_stream({"content": "<tool_call>" + ADD[:10]},
                             {"content": ADD[10:] + "</tool_call>"}, finish="stop")

        assert [BOTH[0]] == named(text)

    def test_cut_off_stream_whose_arguments_parse_is_refused(self):
        """Arguments complete so far, then the connection drops: nothing runs."""
        text = openai_stream(fragment(0, '{"x": 3}', "c1", "square"), finish=None, done=False)

        error = refused(text)

        assert ("openai stream", len(text), True) == (error.dialect, error.offset,
                                                       "cut off" in error.message)

    @pytest.mark.parametrize("finish", ["length", "content_filter", None])
    def test_unfinished_stream_is_refused_naming_the_reason(self, finish):
        """finish_reason length or content_filter, or none at all, before [DONE]: refused."""
        text = openai_stream(fragment(0, '{"x": 3}', "c1", "square"), finish=finish)

        assert repr(finish) in refused(text).message

    def test_unterminated_arguments_are_refused_at_their_first_chunk(self):
        """Joined arguments that are not JSON are refused at the call's first event."""
        text = openai_stream(fragment(0, "", "c1", "square"), fragment(0, '{"x": 3'))

        error = refused(text)

        assert ("openai stream", 0) == (error.dialect, error.offset)

    @pytest.mark.parametrize("pieces", [
        (fragment(0, "{}", "c1", "add"), fragment(2, "{}", "c3", "square")),
        (fragment(0, "{}", "c1", "add"), fragment(0, "", None, "square")),
        (fragment(0, "{}", "c1", "add"), fragment(0, "", "c9")),
        ({"tool_calls": [{"function": {"name": "add", "arguments": "{}"}}]},),
        ({"function_call": {"name": "add", "arguments": "{}"}},),
    ])
    def test_inconsistent_fragments_are_refused(self, pieces):
        """A missing index, a changing name or id, no index, legacy deltas: refused."""
        assert "openai stream" == refused(openai_stream(*pieces)).dialect

    def test_second_choice_error_event_and_late_events_are_refused(self):
        """Chunks of another choice, an error event, events after [DONE]: refused."""
        other = chunk(fragment(0, "{}", "c", "add"), index=1) + chunk({}, "stop") + \
            "data: [DONE]\n\n"
        error = 'data: {"error": {"message": "overloaded"}}\n\n'
        late = openai_stream({"content": "hi"}, finish="stop") + chunk({"content": "more"})

        for text in (other, error, late):
            assert refused(text).dialect.endswith("stream")

    def test_comments_and_no_final_blank_line(self):
        """': keep-alive' comments are skipped; the last event needs no blank line."""
        text = ": keep-alive\n\n" + openai_stream(fragment(0, '{"x": 3}', "c1", "square"))

        assert [("square", {"x": 3})] == named(text.rstrip("\n"))

    @pytest.mark.parametrize("text", ["data: the file has 3 rows.", "event: the party is at 5",
                                      "data:\nmore prose"])
    def test_prose_that_starts_like_a_field_is_text(self, text):
        """Only a data line holding JSON (or a named event then data) opens a stream."""
        assert [] == named(text)

    def test_a_line_that_is_not_server_sent_events_is_refused(self):
        """Once a text is a stream, every line must be a field, a comment or blank."""
        text = openai_stream(fragment(0, '{"x": 3}', "c1", "square")) + "Hello there\n"

        assert "stream" == refused(text).dialect


class TestAnthropicStream:
    def test_partial_json_joins_into_the_input(self):
        """input_json_delta fragments join into the tool_use input; the id is kept."""
        (call,) = parse(anthropic_stream("", '{"x"', ": 3}"))

        assert ("t1", "square", {"x": 3}, "anthropic") == (call.id, call.name, call.arguments,
                                                          call.dialect)

    def test_cut_off_before_message_stop_is_refused(self):
        """Input complete and block stopped, but no message_stop: refused as cut off."""
        text = anthropic_stream('{"x": 3}', stop=False)

        error = refused(text)

        assert ("anthropic stream", len(text)) == (error.dialect, error.offset)

    def test_max_tokens_is_refused_even_when_the_input_parses(self):
        """stop_reason max_tokens: the model did not finish, nothing runs."""
        assert "max_tokens" in refused(anthropic_stream('{"x": 3}',
                                                        stop_reason="max_tokens")).message

    def test_unterminated_input_is_refused(self):
        """Joined partial_json that is not JSON is refused at the block's start event."""
        text = anthropic_stream('{"x": 3')

        assert text.index("event: content_block_start") == refused(text).offset

    @pytest.mark.parametrize("mutate", [
        lambda text: text.replace("event: content_block_stop\ndata: "
                                  '{"type": "content_block_stop", "index": 0}\n\n', ""),
        lambda text: text.replace('"index": 0, "delta"', '"index": 5, "delta"'),
        lambda text: text.replace("event: message_delta", "event: message_stop", 1),
        lambda text: text.replace('"input_json_delta"', '"text_delta"'),
        lambda text: text.replace("event: message_start\ndata: "
                                  '{"type": "message_start", "message": {"content": []}}\n\n',
                                  ""),
        lambda text: text + 'event: error\ndata: {"type": "error"}\n\n',
    ])
    def test_broken_streams_are_refused(self, mutate):
        """A block never stopped, a delta for no block, mismatched names, wrong delta type,
        no message_start, an error event: refused."""
        assert "anthropic stream" == refused(mutate(anthropic_stream('{"x": 3}'))).dialect

    def test_start_input_and_deltas_together_are_refused(self):
        """An input in content_block_start and input deltas would be two inputs."""
        assert "anthropic stream" == refused(anthropic_stream('{"x": 3}',
                                                              start_input={"x": 4})).dialect


class TestResponsesStream:
    def test_completed_stream_is_read(self):
        """The response of response.completed gives the calls."""
        assert [("square", {"x": 3})] == named(responses_stream())

    def test_incomplete_stream_is_refused_naming_the_reason(self):
        """response.incomplete with max_output_tokens: refused, the reason named."""
        text = responses_stream("incomplete", "max_output_tokens", end="response.incomplete")

        assert "max_output_tokens" in refused(text).message

    def test_cut_off_stream_is_refused(self):
        """No terminal response.* event: refused as cut off."""
        text = responses_stream(end=None)

        assert ("openai_responses stream", len(text)) == (refused(text).dialect,
                                                          refused(text).offset)


calls = st.builds(
    lambda name, value: json.dumps({"name": name, "arguments": {"v": value}}),
    st.sampled_from(["add", "square", "t"]),
    st.integers(-1000, 1000) | st.text(alphabet="abc{}[];, \"", max_size=8),
)


class TestProperties:
    @settings(max_examples=200, deadline=None)
    @given(items=st.lists(calls, min_size=1, max_size=6),
           separators=st.lists(st.sampled_from([";", " ", ",", "; ", "\n", ", ", ""]),
                               min_size=6, max_size=6))
    def test_n_bare_calls_give_n_calls_in_order(self, items, separators):
        """Any concatenation of N bare call objects gives exactly those N calls, in order."""
        text = items[0] + "".join(sep + item for sep, item in zip(separators, items[1:],
                                                                   strict=False))

        assert [json.loads(item)["arguments"] for item in items] == [
            call.arguments for call in parse(text)]

    @settings(max_examples=300, deadline=None)
    @given(prefix=st.sampled_from(["data: ", "event: message_start\ndata: ", "[TOOL_CALLS]",
                                   "<function=", '{"choices": [', '{"object": "response", ',
                                   "data: [DONE]\n", ": c\n"]),
           text=st.text(alphabet='{}[]",:0123456789 \nabcdefnamesrgtx<>/()_;=', max_size=150))
    def test_marker_noise_raises_only_malformed(self, prefix, text):
        """Noise after any new marker ends in calls or MalformedCall, nothing else."""
        with contextlib.suppress(MalformedCall):
            parse(prefix + text)

    @settings(max_examples=150, deadline=None)
    @given(value=st.dictionaries(st.text(max_size=6),
                                 st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=6),
                                 max_size=4),
           cuts=st.lists(st.integers(0, 200), max_size=6))
    def test_fragmented_arguments_give_the_same_call(self, value, cuts):
        """However the arguments are split into fragments, the joined call is the same."""
        arguments = json.dumps(value)
        points = sorted({cut % (len(arguments) + 1) for cut in cuts} | {0, len(arguments)})
        pieces = [arguments[start:end] for start, end in itertools.pairwise(points)]
        openai = openai_stream(fragment(0, "", "c1", "t"),
                               *[fragment(0, piece) for piece in pieces])
        anthropic = anthropic_stream(*pieces).replace('"square"', '"t"')

        assert [value, value] == [parse(openai)[0].arguments, parse(anthropic)[0].arguments]

    @settings(max_examples=150, deadline=None)
    @given(cut=st.integers(0, 10_000), family=st.sampled_from(["openai", "anthropic",
                                                                "responses"]))
    def test_every_prefix_of_a_stream_is_refused_or_the_whole(self, cut, family):
        """A stream cut anywhere gives MalformedCall or exactly the full stream's calls."""
        text = {"openai": openai_stream(fragment(0, '{"a": 1', "c1", "add"),
                                        fragment(0, ', "b": 2}'), fragment(1, '{"x": 3}',
                                                                           "c2", "square")),
                "anthropic": anthropic_stream('{"x"', ": 3}"),
                "responses": responses_stream()}[family]
        whole = named(text)
        prefix = text[: cut % (len(text) + 1)]

        try:
            result = named(prefix)
        except MalformedCall:
            return
        # Only a prefix too short to be a stream yet ("dat") reads as text without calls.
        assert result == whole or ([] == result and not is_stream(prefix))


class TestDecodeJson:
    """decode_json is STRICT_DECODER.raw_decode, without the cost of json's error offsets."""

    @staticmethod
    def outcome(decode, text, index):
        try:
            return decode(text, index)
        except json.JSONDecodeError as exc:
            return ("error", exc.pos)
        except JSONError as exc:
            return ("error", exc.pos)
        except ValueError:
            return ("refused",)

    @pytest.mark.parametrize("cut", [*range(4080, 4120), 8190, 16390, 20000])
    def test_values_across_the_window_edge_decode_as_the_decoder_does(self, cut):
        """A value cut near the first window's end, or longer than it, reads the same."""
        document = json.dumps({"s": "x" * 4085 + "\\u00e9" + "y" * 12000, "n": 12345678,
                               "list": list(range(800))})
        for text in (document[:cut], document[:cut] + " tail", "pre " + document):
            index = 4 if text.startswith("pre ") else 0

            assert self.outcome(STRICT_DECODER.raw_decode, text, index) == self.outcome(
                decode_json, text, index)

    @settings(max_examples=300, deadline=None)
    @given(text=st.text(alphabet='{}[]",:0123456789 \\nuetrfalsx-.e', max_size=60),
           index=st.integers(0, 60))
    def test_any_text_decodes_as_the_decoder_does(self, text, index):
        """On any text, the value, its end, or the error offset are the decoder's."""
        index = min(index, len(text))

        assert self.outcome(STRICT_DECODER.raw_decode, text, index) == self.outcome(
            decode_json, text, index)
