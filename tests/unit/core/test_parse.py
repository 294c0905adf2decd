"""Parsing model output in every dialect into the same ToolCall."""

from __future__ import annotations

import contextlib
import itertools
import json
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from callward.core import MalformedCall
from callward.core.parse._front import DIALECTS, MAX_CALLS_PER_MESSAGE, parse_model_output

ORDERS = {"square": ("x",), "add": ("a", "b"), "capital": ("country",)}


@pytest.fixture(name="parse")
def _parse():
    counter = itertools.count(1)

    def parse(text):
        return parse_model_output(
            text, parameter_order=ORDERS.get, new_id=lambda: f"gen_{next(counter)}"
        )

    return parse


def openai_message(*calls):
    return json.dumps(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(arguments)},
                }
                for call_id, name, arguments in calls
            ],
        }
    )


class TestDialects:
    def test_each_dialect_gives_the_same_call(self, parse):
        """The article, OpenAI and Hermes forms of one call parse to the same name and arguments."""
        article = parse('call function("add", [2, 40], 42)')
        openai = parse(openai_message(("c1", "add", {"a": 2, "b": 40})))
        hermes = parse('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 40}}</tool_call>')

        assert [("add", {"a": 2, "b": 40})] * 3 == [
            (calls[0].name, calls[0].arguments) for calls in (article, openai, hermes)
        ]
        assert ["article", "openai", "hermes"] == [
            calls[0].dialect for calls in (article, openai, hermes)
        ]

    def test_article_expected_output_is_kept_apart(self, parse):
        """The article's third argument is the expected output, not an argument."""
        (call,) = parse('call function("square", [3], 9)')

        assert {"x": 3} == call.arguments
        assert 9 == call.expected

    def test_article_without_expected_output(self, parse):
        """The expected output is optional."""
        (call,) = parse('Sure. call function("square", [5])')

        assert (None, None) == (call.expected_json, call.expected)

    def test_article_named_arguments(self, parse):
        """An object in place of the positional list is taken as named arguments."""
        (call,) = parse('call function("add", {"b": 1, "a": 2})')

        assert {"a": 2, "b": 1} == call.arguments

    def test_article_unknown_tool_keeps_no_arguments(self, parse):
        """Positional values for an unknown tool cannot be mapped; the gateway denies by name."""
        (call,) = parse('call function("rm_rf", ["/"])')

        assert ("rm_rf", {}) == (call.name, call.arguments)

    def test_openai_whole_response_and_ids(self, parse):
        """A full chat-completions response works too, and the model's call ids are kept."""
        message = json.loads(openai_message(("call_a", "square", {"x": 2})))
        response = json.dumps({"id": "r", "choices": [{"index": 0, "message": message}]})

        (call,) = parse(response)

        assert "call_a" == call.id

    def test_openai_empty_arguments_string_is_no_arguments(self, parse):
        """OpenAI sends "" for a call without arguments."""
        text = json.dumps(
            {"tool_calls": [{"id": "c", "type": "function",
                             "function": {"name": "square", "arguments": ""}}]}
        )

        (call,) = parse(text)

        assert {} == call.arguments

    def test_decoded_openai_message(self):
        """An already-decoded message (a dict) is accepted as well as text."""
        message = json.loads(openai_message(("c1", "square", {"x": 2})))

        (call,) = parse_model_output(message, parameter_order=ORDERS.get, new_id=lambda: "x")

        assert "square" == call.name

    def test_parallel_calls_come_out_in_order(self, parse):
        """Several calls in one message, mixing dialects, come out in the order written."""
        text = (
            '<tool_call>{"name": "square", "arguments": {"x": 1}}</tool_call>\n'
            'call function("add", [1, 2])\n'
            '<tool_call>\n{"name": "capital", "arguments": {"country": "Peru"}}\n</tool_call>'
        )

        calls = parse(text)

        assert ["square", "add", "capital"] == [call.name for call in calls]
        assert 3 == len({call.id for call in calls})

    def test_closing_tag_inside_a_string_is_data(self, parse):
        """A JSON string may contain the closing tag; it is read as data, not as the end."""
        (call,) = parse('<tool_call>{"name": "t", "arguments": {"s": "</tool_call>"}}</tool_call>')

        assert {"s": "</tool_call>"} == call.arguments

    def test_plain_answer_has_no_calls(self, parse):
        """Text that asks for no tool gives no calls."""
        assert () == parse("The answer is 9. {not a call}")


class TestDialectTable:
    @pytest.mark.parametrize(
        "row", DIALECTS, ids=[f"{index}-{row.dialect}" for index, row in enumerate(DIALECTS)]
    )
    def test_each_row_reads_its_example(self, parse, row):
        """Each row of the dialect table reads its example, through the front, as its dialect."""
        calls = parse(row.example)

        assert [(row.dialect, "square", {"x": 3})] == [
            (call.dialect, call.name, call.arguments) for call in calls
        ]


class TestMalformed:
    @pytest.mark.parametrize(
        ("text", "where"),
        [
            ('call function("square", [3]', 27),
            ('call function("square", [3,], 9)', 27),
            ('call function(square, [3])', 14),
            ('<tool_call>{"name": "square", "arguments": {"x": 3}</tool_call>', 51),
            ('<tool_call>{"name": "square", "arguments": {"x": 3}}', 0),
            ('<tool_call>{"name": "square", "arguments": {"x": NaN}}</tool_call>', None),
            ('<tool_call>{"name": "a", "name": "b", "arguments": {}}</tool_call>', None),
            ('<tool_call>{"name": "square", "arguments": [3]}</tool_call>', 11),
            ('<tool_call>{"name": "square", "args": {"x": 3}}</tool_call>', 11),
            ('<tool_call>{"name": "square", "arguments": {}} trailing</tool_call>', 47),
            ('{"tool_calls": [{"function": {"name": "square", "arguments": "{\\"x\\": 3"}}]}',
             None),
            ('{"tool_calls": [', 16),
            ('call function("square", [1, 2])', 14),
            ('done </tool_call>', 5),
            ('call function("square", [1], 1, 2)', None),
        ],
    )
    def test_malformed_text_says_where(self, parse, text, where):
        """Each malformed call raises MalformedCall of kind malformed, naming the offset."""
        with pytest.raises(MalformedCall) as caught:
            parse(text)

        assert "malformed" == caught.value.kind
        if where is not None:
            assert where == caught.value.offset

    def test_one_bad_call_rejects_the_whole_message(self, parse):
        """A message with a good and a bad call yields nothing to run."""
        text = (
            '<tool_call>{"name": "square", "arguments": {"x": 1}}</tool_call>'
            'call function("add", [1,'
        )

        with pytest.raises(MalformedCall):
            parse(text)

    def test_too_many_calls(self, parse):
        """A message cannot fan out into unbounded calls."""
        text = 'call function("square", [1])' * (MAX_CALLS_PER_MESSAGE + 1)

        with pytest.raises(MalformedCall, match="at most"):
            parse(text)

    def test_deep_json_is_refused_before_parsing(self, parse):
        """Deeply nested JSON is bounded before it reaches the decoder."""
        text = '<tool_call>{"name": "square", "arguments": {"x": ' + "[" * 5000 + "]" * 5000 + "}}"

        with pytest.raises(MalformedCall, match="nested"):
            parse(text + "</tool_call>")

    def test_duplicate_ids_are_refused(self, parse):
        """Two calls with one id would make receipts ambiguous."""
        text = openai_message(("same", "square", {"x": 1}), ("same", "square", {"x": 2}))

        with pytest.raises(MalformedCall, match="share an id"):
            parse(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


class TestProperties:
    @settings(max_examples=300, deadline=None)
    @given(text=st.text(max_size=300))
    def test_any_text_raises_only_malformed(self, text):
        """Whatever the text, the parser returns calls or raises MalformedCall, nothing else."""
        with contextlib.suppress(MalformedCall):
            parse_model_output(text, parameter_order=ORDERS.get, new_id=lambda: "x")

    @settings(max_examples=300, deadline=None)
    @given(
        prefix=st.sampled_from(["", "call function(", "<tool_call>", '{"tool_calls": [']),
        text=st.text(alphabet='{}[]",:0123456789 \nabcxyz<>/()_', max_size=120),
    )
    def test_call_shaped_noise_raises_only_malformed(self, prefix, text):
        """Noise that starts like a call still ends in a call list or MalformedCall."""
        with contextlib.suppress(MalformedCall):
            parse_model_output(prefix + text, parameter_order=ORDERS.get, new_id=lambda: "x")

    @settings(max_examples=200, deadline=None)
    @given(arguments=st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=5))
    def test_hermes_round_trip(self, arguments):
        """Any JSON arguments object survives a Hermes round trip exactly."""
        text = "<tool_call>" + json.dumps({"name": "t", "arguments": arguments}) + "</tool_call>"

        (call,) = parse_model_output(text, parameter_order=ORDERS.get, new_id=lambda: "x")

        assert arguments == call.arguments


class TestMoreDialects:
    def test_anthropic_tool_use_blocks(self, parse):
        """Anthropic tool_use blocks give calls with the model's ids; text blocks are ignored."""
        message = json.dumps({"role": "assistant", "content": [
            {"type": "text", "text": "Let me add."},
            {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 1, "b": 2}},
            {"type": "tool_use", "id": "toolu_2", "name": "square", "input": {"x": 3}},
        ]})

        calls = parse(message)

        assert [("toolu_1", "add", {"a": 1, "b": 2}, "anthropic"),
                ("toolu_2", "square", {"x": 3}, "anthropic")] == [
            (call.id, call.name, call.arguments, call.dialect) for call in calls
        ]

    def test_decoded_anthropic_content_list(self):
        """An already-decoded Anthropic message is accepted like an OpenAI one."""
        message = {"content": [{"type": "tool_use", "id": "t", "name": "square",
                                "input": {"x": 2}}]}

        (call,) = parse_model_output(message, parameter_order=ORDERS.get, new_id=lambda: "x")

        assert ("t", {"x": 2}) == (call.id, call.arguments)

    def test_fenced_json_block(self, parse):
        """A fenced json block holding a call object is a call (small models write these)."""
        (call,) = parse('Here:\n```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```')

        assert ("add", {"a": 1, "b": 2}, "json") == (call.name, call.arguments, call.dialect)

    def test_bare_json_objects_one_per_line(self, parse):
        """Bare call objects, one per line, all come out in order; parameters reads as arguments."""
        calls = parse(
            'I will call two tools.\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
            '  {"name": "square", "parameters": {"x": 3}}\nDone.'
        )

        assert [("add", {"a": 1, "b": 2}), ("square", {"x": 3})] == [
            (call.name, call.arguments) for call in calls
        ]

    def test_list_of_call_objects(self, parse):
        """A JSON list of call objects is parallel calls."""
        calls = parse('[{"name": "square", "arguments": {"x": 1}}, '
                      '{"name": "square", "arguments": {"x": 2}}]')

        assert [{"x": 1}, {"x": 2}] == [call.arguments for call in calls]

    def test_hermes_body_is_not_read_twice(self, parse):
        """The JSON line inside a <tool_call> tag is one call, not a hermes and a json call."""
        calls = parse('<tool_call>\n{"name": "square", "arguments": {"x": 1}}\n</tool_call>')

        assert ["hermes"] == [call.dialect for call in calls]

    def test_llama_python_tag_json_and_builtin_calls(self, parse):
        """<|python_tag|> holds JSON calls and name.call(k=v) calls separated by ';'."""
        calls = parse('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                      'square.call(x=4)<|eom_id|>')

        assert [("add", {"a": 1, "b": 2}, "llama"), ("square", {"x": 4}, "llama")] == [
            (call.name, call.arguments, call.dialect) for call in calls
        ]

    def test_natural_language_article_form(self, parse):
        """The Chinese form maps A和B onto the parameters and keeps the expected output."""
        (call,) = parse("请执行add\uff0c参数为2和40\uff0c期望输出为42")

        assert ("add", {"a": 2, "b": 40}, 42, "article") == (
            call.name, call.arguments, call.expected, call.dialect
        )

    def test_natural_language_bare_words_are_strings(self, parse):
        """A bare word is a string argument; a quoted one may hold separators."""
        (bare,) = parse("请执行capital\uff0c参数为France。")
        (quoted,) = parse('请执行capital, 参数为"Kenya和Peru"')

        assert [{"country": "France"}, {"country": "Kenya和Peru"}] == [
            bare.arguments, quoted.arguments
        ]

    def test_json_that_is_data_is_not_a_call(self, parse):
        """JSON without name and arguments, or in a python fence, is text, not a call."""
        for text in ('{"name": "Alice", "age": 3}', "[1, 2]", '```json\n{"a": 1}\n```',
                     '```python\n{"name": "x"\n```', "The set {1, 2} has two items."):
            assert () == parse(text), text

    def test_mixed_dialects_in_one_message_keep_order(self, parse):
        """Calls in several dialects in one message come out in the order written."""
        text = (
            '请执行square\uff0c参数为2\n'
            '{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
            '<tool_call>{"name": "capital", "arguments": {"country": "Peru"}}</tool_call>'
        )

        assert ["square", "add", "capital"] == [call.name for call in parse(text)]


class TestMoreMalformed:
    @pytest.mark.parametrize(
        ("text", "where"),
        [
            ('{"name": "add", "arguments": {"a": 1, "b": 2,}}', 45),
            ('{"name": "add", "arguments": {"a": 1', 36),
            ("{'name': 'add', 'arguments': {}}", 1),
            ('```json\n{"name": "add", "arguments": {"a": 1\n```', 45),
            ('{"name": "add", "arguments": {}, "extra": 1}', 0),
            ('{"name": "add", "arguments": "not json"}', 0),
            ('[{"name": "add", "arguments": {}}, 3]', 0),
            ("<|python_tag|>square(x=True)", 23),
            ("<|python_tag|>", 14),
            ("<|python_tag|>square(x=1) square(x=2)", 26),
            ('{"content": [{"type": "tool_use", "id": "t", "name": "add"}]}', 0),
            ('请执行capital\uff0c参数为"Kenya', 14),
        ],
    )
    def test_refusal_says_where(self, parse, text, where):
        """Truncated JSON, trailing commas, Python literals, stray text: refused at an offset."""
        with pytest.raises(MalformedCall) as caught:
            parse(text)

        assert "malformed" == caught.value.kind
        assert where == caught.value.offset
        assert f"offset {where}" in caught.value.message


class TestMoreProperties:
    @settings(max_examples=300, deadline=None)
    @given(
        prefix=st.sampled_from(["```json\n", "<|python_tag|>", "请执行add\uff0c参数为", "\n{",
                                '{"content": [', "[{"]),
        text=st.text(alphabet='{}[]",:0123456789 \nabcnamesrgtx<>/()_;=和\uff0c。`', max_size=120),
    )
    def test_new_dialect_noise_raises_only_malformed(self, prefix, text):
        """Noise that starts like a new-dialect call ends in calls or MalformedCall, only."""
        with contextlib.suppress(MalformedCall):
            parse_model_output(prefix + text, parameter_order=ORDERS.get, new_id=lambda: "x")

    @settings(max_examples=200, deadline=None)
    @given(arguments=st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=5),
           form=st.sampled_from(["fence", "bare", "python_tag", "anthropic"]))
    # Found by this property: a tag or call syntax in a string after <|python_tag|>.
    @example(arguments={"0": ["<tool_call>"]}, form="python_tag")
    @example(arguments={"00": [["<tool_call>"]], "0": None}, form="python_tag")
    @example(arguments={"q": 'call function("square", [3], 9)'}, form="python_tag")
    @example(arguments={"q": "请执行add\uff0c参数为{}"}, form="python_tag")
    def test_untagged_round_trip(self, arguments, form):
        """Any JSON arguments object survives each untagged form exactly."""
        body = json.dumps({"name": "t", "arguments": arguments})
        text = {
            "fence": f"```json\n{body}\n```",
            "bare": f"Calling.\n{body}\n",
            "python_tag": "<|python_tag|>" + json.dumps({"name": "t", "parameters": arguments}),
            "anthropic": json.dumps({"content": [{"type": "tool_use", "id": "i", "name": "t",
                                                  "input": arguments}]}),
        }[form]

        (call,) = parse_model_output(text, parameter_order=ORDERS.get, new_id=lambda: "x")

        assert arguments == call.arguments


CORPUS = Path(__file__).resolve().parents[2] / "corpus"


def _corpus_entries():
    return [json.loads(line) for path in sorted(CORPUS.glob("*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines()]


class TestCorpus:
    @pytest.mark.parametrize("entry", _corpus_entries(), ids=lambda entry: entry["text"][:40])
    def test_real_outputs_parse_to_what_was_meant(self, parse, entry):
        """Each recorded output gives exactly its calls, or is refused at its offset."""
        if "error_offset" in entry:
            with pytest.raises(MalformedCall) as caught:
                parse(entry["text"])
            assert entry["error_offset"] == caught.value.offset
            if "error_dialect" in entry:
                assert entry["error_dialect"] == caught.value.dialect
            return

        calls = parse(entry["text"])

        assert [tuple(pair) for pair in entry["calls"]] == [
            (call.name, call.arguments) for call in calls
        ]

    def test_every_corpus_entry_cites_its_source(self):
        """A corpus entry without a source cannot be checked against the real thing."""
        assert [] == [entry["text"][:40] for entry in _corpus_entries()
                      if not entry.get("source")]
