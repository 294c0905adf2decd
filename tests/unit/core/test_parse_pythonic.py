"""Llama 3.2+/4 "pythonic" tool calls: a whole message that is a list of keyword calls."""

from __future__ import annotations

import contextlib
import itertools
import keyword
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callward.core import MalformedCall
from callward.core.parse._front import parse_model_output

ORDERS = {"square": ("x",), "add": ("a", "b"), "capital": ("country",)}


@pytest.fixture(name="parse")
def _parse():
    counter = itertools.count(1)

    def parse(text):
        return parse_model_output(
            text, parameter_order=ORDERS.get, new_id=lambda: f"gen_{next(counter)}"
        )

    return parse


def named(calls):
    return [(call.name, call.arguments, call.dialect) for call in calls]


class TestPythonicLists:
    def test_two_calls_in_order(self, parse):
        """Llama 3.2's form: every call of the list, in order, as llama calls."""
        calls = parse('[get_weather(city="Paris"), square(x=3)]')

        assert [("get_weather", {"city": "Paris"}, "llama"), ("square", {"x": 3}, "llama")] == (
            named(calls)
        )

    def test_python_literals_become_json_values(self, parse):
        """None, True, False, nested lists and dicts, negative and float numbers."""
        (call,) = parse("[f(a=None, b=True, c=False, d=[1, {'k': 'v'}], e=-1.5, g='x')]")

        assert {"a": None, "b": True, "c": False, "d": [1, {"k": "v"}], "e": -1.5,
                "g": "x"} == call.arguments

    def test_no_arguments_and_whitespace(self, parse):
        """A call without arguments, spread over lines, surrounded by blank space."""
        (call,) = parse("\n  [ capital(\n    country = 'Peru',\n  ) ]  \n")

        assert ("capital", {"country": "Peru"}) == (call.name, call.arguments)
        assert {} == parse("[now()]")[0].arguments

    @pytest.mark.parametrize(
        "text",
        [
            "<|python_start|>[square(x=3)]<|python_end|>",
            "<|python_start|>[square(x=3)]<|python_end|><|eot|>",
            "[square(x=3)]<|eot_id|>",
            "<|python_tag|>[square(x=3)]<|eom_id|>",
        ],
    )
    def test_llama_wrappers_and_end_tokens(self, parse, text):
        """Llama 4's python_start/end wrapper, end-of-turn tokens, and the 3.1 tag."""
        assert [("square", {"x": 3}, "llama")] == named(parse(text))

    def test_tags_inside_strings_are_data(self, parse):
        """A <tool_call> tag or a JSON call inside an argument string is not a call."""
        text = ('[capital(country="<tool_call>{\\"name\\": \\"add\\", \\"arguments\\": {}}'
                '</tool_call>")]')

        (call,) = parse(text)

        assert "capital" == call.name
        assert call.arguments["country"].startswith("<tool_call>")

    @pytest.mark.parametrize(
        "text",
        [
            "Sure: [square(x=3)]",
            "[square(x=3)] is what I would call next.",
            "See [1] and [2].",
            "[1, 2, 3]",
            "[]",
            "The list [a, b(c)] is Python.",
            "I could run [square(x=3)], but I will not.",
        ],
    )
    def test_prose_with_brackets_is_not_a_call(self, parse, text):
        """Only a message that is wholly a list of calls counts."""
        assert () == parse(text)

    def test_json_lists_keep_their_dialect(self, parse):
        """A JSON list of call objects is still the json dialect, not a pythonic list."""
        calls = parse('[{"name": "square", "arguments": {"x": 2}}]')

        assert [("square", {"x": 2}, "json")] == named(calls)

    def test_nothing_is_evaluated(self, parse, tmp_path):
        """Code in an argument is refused, never run."""
        marker = tmp_path / "pwned"
        text = f'[square(x=__import__("os").system("touch {marker}"))]'

        with pytest.raises(MalformedCall):
            parse(text)

        assert not marker.exists()


class TestPythonicRefusals:
    @pytest.mark.parametrize(
        ("text", "where"),
        [
            ("[square(x=y)]", 10),  # a name
            ("[square(x=len('ab'))]", 10),  # a call in an argument
            ("[square(x=os.sep)]", 10),  # attribute access
            ("[square(x=1 + 2)]", 10),  # an operator
            ("[square(x=[1, y])]", 14),  # a name deep inside
            ("[square(*args)]", 8),  # starred
            ("[square(**kwargs)]", 8),  # ** arguments
            ("[square(3)]", 8),  # positional
            ("[os.system(x=1)]", 1),  # a dotted tool name
            ("[square(x=(1, 2))]", 10),  # a tuple
            ("[square(x={1, 2})]", 10),  # a set
            ("[square(x=b'ab')]", 10),  # bytes
            ("[square(x=2j)]", 10),  # complex
            ("[square(x=f'{y}')]", 10),  # an f-string
            ("[square(x=lambda: 1)]", 10),  # a lambda
            ("[square(x=1e999)]", 10),  # not finite
            ("[square(x={1: 2})]", 10),  # a non-string key
            ("[square(x={'a': 1, 'a': 2})]", 10),  # a key twice
            ("[square(x=1, x=2)]", 13),  # an argument twice
            ("[square(x=1), 3]", 14),  # not a call
            ("[square(x=1)", 0),  # never closed (and so not a whole list: prose)
            ("[square(x=1]", 11),  # bracket mismatch
            ("[square(x=1) square(y=2)]", 1),  # a missing comma
            ("[square(x='é'), f(y=z)]", 20),  # offsets count characters, not UTF-8 bytes
            ("[f(a=1),\n g(b=zz)]", 14),  # and lines
            ("  <|python_start|>[square(x=y)]", 28),  # offsets are in the message
        ],
    )
    def test_refusal_says_where(self, parse, text, where):
        """Whatever is not a keyword call with literal JSON values is refused at its offset."""
        if not text.endswith("]"):
            assert () == parse(text)
            return
        with pytest.raises(MalformedCall) as caught:
            parse(text)

        assert ("malformed", "llama", where) == (
            caught.value.kind, caught.value.dialect, caught.value.offset
        )
        assert f"offset {where}" in caught.value.message

    def test_one_bad_call_rejects_the_whole_list(self, parse):
        """A list with one bad call yields no calls at all."""
        with pytest.raises(MalformedCall):
            parse("[square(x=2), add(a=1, b=c)]")


identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda word: not keyword.iskeyword(word)
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
calls_strategy = st.lists(
    st.tuples(identifiers, st.dictionaries(identifiers, json_values, max_size=4)),
    min_size=1, max_size=4,
)


def render(calls, separator=", "):
    return "[" + separator.join(
        f"{name}(" + ", ".join(f"{key}={value!r}" for key, value in arguments.items()) + ")"
        for name, arguments in calls
    ) + "]"


class TestPythonicProperties:
    @settings(max_examples=200, deadline=None)
    @given(calls=calls_strategy, separator=st.sampled_from([", ", ",", ",\n  ", " ,\t"]))
    def test_round_trip(self, calls, separator):
        """Any JSON arguments, written as Python literals, come back exactly, in order."""
        counter = itertools.count()
        parsed = parse_model_output(render(calls, separator), parameter_order=ORDERS.get,
                                    new_id=lambda: f"c{next(counter)}")

        assert [(name, arguments) for name, arguments in calls] == [
            (call.name, call.arguments) for call in parsed
        ]

    @settings(max_examples=200, deadline=None)
    @given(
        prose=st.text(alphabet="abcdefghij XYZ.,!?:;'-\n", min_size=1, max_size=60).filter(
            lambda text: text.strip() != ""
        ),
        calls=calls_strategy,
        after=st.booleans(),
    )
    def test_prose_around_a_list_is_never_a_call(self, prose, calls, after):
        """The same list with any prose before or after it gives no call."""
        text = render(calls) + " " + prose if after else prose + " " + render(calls)

        with contextlib.suppress(MalformedCall):  # a string may look like a JSON call
            assert () == parse_model_output(text, parameter_order=ORDERS.get,
                                            new_id=lambda: "x")

    @settings(max_examples=300, deadline=None)
    @given(
        name=identifiers,
        text=st.text(alphabet="()[]{}'\",:=.*+-_ \nabcxyz0123456789jJeE\\", max_size=80),
    )
    def test_list_shaped_noise_raises_only_malformed(self, name, text):
        """Noise after '[name(' ends in calls or MalformedCall, nothing else."""
        with contextlib.suppress(MalformedCall):
            parse_model_output(f"[{name}({text}", parameter_order=ORDERS.get,
                               new_id=lambda: "x")


CORPUS = Path(__file__).resolve().parents[2] / "corpus" / "model_outputs.jsonl"


def test_corpus_has_pythonic_entries():
    """The shared corpus (run by test_parse.py) holds the pythonic forms too."""
    assert CORPUS.read_text(encoding="utf-8").count("pythonic") >= 4
