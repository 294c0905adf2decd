"""Plans: the $ref grammar, validation before anything runs, resolution at run time."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callward.core.plans import PlanInvalid, parse_plan
from callward.core.plans._document import (
    OutputRef,
    RefUnresolved,
    build_plan,
    load_plan,
    parse_ref,
    substitute,
)

TOOLS = {"search", "clean", "summarize"}
EXAMPLE = Path(__file__).resolve().parents[3] / "core" / "examples" / "plans"


def plan_of(*steps: dict, **fields: object) -> dict:
    return {"version": 1, "steps": list(steps), **fields}


def step(step_id: str, tool: str = "search", **arguments: object) -> dict:
    return {"id": step_id, "tool": tool, "arguments": arguments}


def ref(text: str) -> dict:
    return {"$ref": text}


def problems(value: object, tools: set[str] | None = TOOLS) -> list[tuple[str, str]]:
    with pytest.raises(PlanInvalid) as caught:
        build_plan(value, tools=tools)
    assert "plan_invalid" == caught.value.kind
    return [(p.location, p.message) for p in caught.value.problems]


class TestRefGrammar:
    @pytest.mark.parametrize(("text", "step", "path"), [
        ("steps.search.output", "search", ()),
        ("steps.search.output.hits[0].text", "search", ("hits", 0, "text")),
        ("steps.s_1-b.output[12]", "s_1-b", (12,)),
        ('steps.a.output["key with.dots"][0]', "a", ("key with.dots", 0)),
        ("steps.a.output.output.x", "a", ("output", "x")),
    ])
    def test_valid_refs_parse(self, text, step, path):
        """A reference names a step, then `output`, then keys and indices."""
        parsed = parse_ref(text)

        assert (step, path) == (parsed.step, parsed.path)

    @pytest.mark.parametrize(("text", "fragment"), [
        ("search.output", "starts with 'steps.'"),
        ("steps..output", "step id is expected at offset 6"),
        ("steps.search", "'.output' is expected"),
        ("steps.search.outputs", "'.output' is expected"),
        ("steps.search.result.x", "'.output' is expected"),
        ("steps.search.output.", "a key is expected at offset 20"),
        ("steps.search.output.hits[-1]", "an index"),
        ("steps.search.output.hits[01]", "an index"),
        ("steps.search.output.hits[0", "an index"),
        ("steps.search.output.hits[*]", "an index"),
        ("steps.search.output.hits x", "'.' or '[' is expected at offset 24"),
        ("steps.search.output.9lives", "a key is expected"),
        ('steps.search.output["x"', "']' is expected"),
        ("steps.search.output['x']", "an index"),
        ("steps.search.output[1e3]", "an index"),
        ("steps.search.output[1234567890]", "an index"),
    ])
    def test_anything_else_is_refused_with_where(self, text, fragment):
        """Text outside the grammar is refused, and the message says where."""
        with pytest.raises(ValueError, match=r"expected|starts") as caught:
            parse_ref(text)

        assert fragment in str(caught.value)

    @given(st.lists(st.one_of(st.integers(0, 10**6), st.text(min_size=0, max_size=8)),
                    max_size=6))
    def test_output_path_round_trips(self, path):
        """Every path prints as text that parses back to the same path."""
        original = OutputRef("step_1", tuple(path))

        assert original == parse_ref(original.text)

    @given(st.text(max_size=40))
    def test_parser_raises_only_value_error(self, text):
        """On any text, the parser returns a reference or raises ValueError."""
        with contextlib.suppress(ValueError):
            parse_ref(text)


class TestResolve:
    OUTPUT: ClassVar = {"hits": [{"text": "one"}, {"text": "two"}], "count": 2}

    def test_path_walks_keys_and_indices(self):
        """A path reads through objects by key and lists by index."""
        assert "two" == parse_ref("steps.s.output.hits[1].text").resolve(self.OUTPUT)

    @pytest.mark.parametrize(("text", "message"), [
        ("steps.s.output.hits[2]", "output.hits has 2 items, no index 2"),
        ("steps.s.output.missing", 'output has no key "missing"'),
        ("steps.s.output.count.x", "output.count is a number, not an object"),
        ("steps.s.output[0]", "output is an object, not a list"),
        ("steps.s.output.hits[0].text[0]", "output.hits[0].text is a string, not a list"),
    ])
    def test_a_path_that_does_not_resolve_says_where_it_stopped(self, text, message):
        """A missing key, an index past the end or a wrong type names where the walk stopped."""
        with pytest.raises(RefUnresolved) as caught:
            parse_ref(text).resolve(self.OUTPUT)

        assert message == str(caught.value)

    def test_substitute_replaces_refs_at_their_pointers(self):
        """Each $ref object is replaced by its value; every other value stays."""
        arguments = {"a": [1, ref("x")], "b/c": ref("y"), "d": {"e": 2}}

        assert {"a": [1, "X"], "b/c": "Y", "d": {"e": 2}} == substitute(
            arguments, {"/a/1": "X", "/b~1c": "Y"})


class TestValidation:
    def test_valid_plan_has_an_order_and_dependencies(self):
        """Steps come in an order where each follows what it takes data from."""
        plan = build_plan(plan_of(
            step("sum", "summarize", texts=ref("steps.clean.output.texts")),
            step("clean", "clean", texts=[ref("steps.a.output.hits[0].text"),
                                          ref("steps.b.output.hits[0].text")]),
            step("a", query="x"),
            {**step("b", query="y"), "after": ["a"]},
        ), tools=TOOLS)

        assert ("a", "b", "clean", "sum") == plan.order
        assert ("a", "b") == plan.step("clean").depends_on
        assert (("/texts/0", "steps.a.output.hits[0].text"),
                ("/texts/1", "steps.b.output.hits[0].text")) == tuple(
            (pointer, r.text) for pointer, r in plan.step("clean").refs)

    def test_unknown_step_is_refused_with_its_location(self):
        """A $ref to a step the plan does not have names the argument that holds it."""
        assert [("steps[1].arguments.texts[0]", "$ref names unknown step 'serch'")] == problems(
            plan_of(step("search", query="x"),
                    step("clean", "clean", texts=[ref("steps.serch.output.hits")])))

    def test_duplicate_ids_are_refused(self):
        """Two steps with one id are refused, naming both."""
        assert [("steps[1].id", "duplicate step id 'a' (first at steps[0])")] == problems(
            plan_of(step("a", query="x"), step("a", query="y")))

    def test_cycle_is_refused_as_a_path(self):
        """Steps that wait for each other are refused, with the cycle spelled out."""
        assert [("steps[0]", "the steps form a cycle: a -> c -> b -> a")] == problems(plan_of(
            step("a", x=ref("steps.c.output")),
            step("b", x=ref("steps.a.output")),
            step("c", x=ref("steps.b.output")),
        ))

    def test_self_reference_is_refused(self):
        """A step cannot take its own output."""
        assert [("steps[0].arguments.x", "a step cannot refer to its own output")] == problems(
            plan_of(step("a", x=ref("steps.a.output"))))

    def test_unknown_tool_is_refused(self):
        """A tool the registry does not know is refused before anything runs."""
        assert [("steps[0].tool", "no tool 'delete_everything' is registered")] == problems(
            plan_of(step("a", "delete_everything")))

    def test_every_problem_is_listed_in_one_error(self):
        """One error lists every problem, each with its location."""
        found = problems({"steps": [step("a", "nope"), {"id": "9bad", "tool": "search"},
                                    {**step("c"), "extra": 1},
                                    step("d", x={"$ref": "steps.a.output", "also": 1}),
                                    step("e", x=ref("steps.a.result"))],
                          "max_parallel": 0, "colour": "blue"})

        assert {"colour", "max_parallel", "steps[1].id", "steps[2].extra",
                "steps[3].arguments.x", "steps[4].arguments.x",
                "steps[0].tool"} == {location for location, _ in found}

    @pytest.mark.parametrize("value", [
        [], {}, {"steps": []}, {"steps": "a"}, {"steps": [1]}, {"version": 2, "steps": [1]},
        {"steps": [{"id": "a", "tool": "search", "arguments": ref("steps.b.output")}]},
        {"steps": [{"id": "a", "tool": "search", "arguments": [1]}]},
        {"steps": [{"id": "a", "tool": "search", "after": "b"}]},
        {"steps": [{"id": "a", "tool": "search", "arguments": {"x": ref(["steps"])}}]},
        {"steps": [{"id": "a", "tool": "search", "arguments": {"x": float("nan")}}]},
    ])
    def test_malformed_plans_are_refused(self, value):
        """Shapes that are not a plan are refused, never half-run."""
        assert problems(value)

    def test_too_many_steps_are_refused(self):
        """A plan has at most 256 steps."""
        assert [("steps", "a plan has at most 256 steps")] == problems(
            plan_of(*(step(f"s{i}") for i in range(257))))

    def test_digest_depends_on_content_not_layout(self):
        """The same plan in YAML and JSON has one digest; another argument changes it."""
        as_yaml = parse_plan("steps:\n  - {id: a, tool: search, arguments: {query: x}}\n")
        as_json = parse_plan(json.dumps(plan_of(step("a", query="x"))), json_only=True)
        other = parse_plan(json.dumps(plan_of(step("a", query="y"))), json_only=True)

        assert as_yaml.digest == as_json.digest != other.digest


class TestHostileText:
    @given(st.text(max_size=200))
    def test_any_text_is_a_plan_or_plan_invalid(self, text):
        """On any text, parse_plan returns a plan or raises PlanInvalid, nothing else."""
        with contextlib.suppress(PlanInvalid):
            parse_plan(text)

    @given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                        lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.sampled_from(["$ref", "steps", "id", "tool", "x"]),
                                          inner, max_size=3), max_leaves=12))
    def test_any_value_is_a_plan_or_plan_invalid(self, value):
        """On any JSON-like value, build_plan returns a plan or raises PlanInvalid."""
        with contextlib.suppress(PlanInvalid):
            build_plan(value, tools=TOOLS)

    def test_refs_inside_a_value_are_data_not_references(self):
        """A $ref object inside a substituted value is never resolved again."""
        value = {"$ref": "steps.secret.output"}

        assert {"x": value} == substitute({"x": ref("steps.a.output")}, {"/x": value})


class TestFiles:
    def test_duplicate_yaml_key_is_refused(self):
        """A YAML mapping with a key twice is refused (PyYAML would keep the last)."""
        with pytest.raises(PlanInvalid, match="not valid YAML"):
            parse_plan("steps:\n  - {id: a, tool: search, tool: clean}\n")

    def test_yaml_aliases_are_refused(self):
        """An alias (the seed of a billion-laughs expansion) is refused before it expands."""
        text = ("a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
                "steps:\n  - {id: s, tool: search, arguments: {q: *b}}\n")

        with pytest.raises(PlanInvalid, match="not valid YAML"):
            parse_plan(text)

    def test_json_file_is_strict(self, tmp_path):
        """A .json plan is strict JSON: a duplicate key is refused."""
        path = tmp_path / "plan.json"
        path.write_text('{"steps": [{"id": "a", "id": "b", "tool": "search"}]}')

        with pytest.raises(PlanInvalid, match="not valid JSON"):
            load_plan(path)

    def test_missing_file_is_a_plan_error(self, tmp_path):
        """A file that cannot be read is refused like any bad plan."""
        with pytest.raises(PlanInvalid, match="cannot be read"):
            load_plan(tmp_path / "absent.yaml")

    def test_oversized_plan_is_refused_before_parsing(self):
        """More than 1 MiB of plan text is refused before it is parsed."""
        with pytest.raises(PlanInvalid, match="over 1048576 bytes"):
            parse_plan("#" * (1 << 20 + 1))

    def test_shipped_news_summary_plan_is_valid(self):
        """The example plan validates against its example tools."""
        plan = load_plan(EXAMPLE / "news_summary.yaml",
                         tools={"search_articles", "clean_text", "summarize_extractive"})

        assert ("search", "background", "clean", "summarize") == plan.order
