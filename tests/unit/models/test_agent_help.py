"""
How the loop helps a small model: folded results in which success and refusal read
differently, and one more turn when the answer leaves a named part of the question
uncovered (bounded: once a run, and only within the step budget).
"""

from __future__ import annotations

import pytest

from callward.core.agent._coverage import mentions, uncovered
from callward.core.agent._loop import Agent, AgentLimits
from callward.core.testing import StubRunner, failed_execution, kinds

SQUARE_13 = '{"name": "square", "arguments": {"x": 13}}'
CAPITAL_FRANCE = '{"name": "capital", "arguments": {"country": "France"}}'
TWO_PARTS = "What is 13 squared, and what is the capital of France?"


class TestFoldedResults:
    def test_a_success_reads_as_a_success(self, stub_model, gateway):
        """A succeeded call: its value, the word succeeded, and nothing about refusals."""
        model = stub_model(['{"name": "add", "arguments": {"a": 2, "b": 40}}', "42."],
                           tool_role="user")

        Agent(gateway=gateway, model=model, principal="alice").run("What is 2 + 40?")

        folded = model.seen[1][-1].content
        assert 'add({"a": 2, "b": 40}) succeeded. Result: 42' in folded
        assert not any(word in folded.lower()
                       for word in ("refused", "denied", "not allowed", "failed"))

    def test_a_refusal_reads_as_a_refusal(self, stub_model, gateway):
        """A denied call: REFUSED, did not run, and the closing asks to say it is not allowed."""
        model = stub_model(['{"name": "drop_table", "arguments": {"table": "users"}}',
                            "Not allowed."], tool_role="user")

        Agent(gateway=gateway, model=model, principal="mallory").run("Drop users")

        folded = model.seen[1][-1].content
        assert (True, True, False) == ("was REFUSED by the policy (permission)" in folded,
                                       "did not run" in folded, "succeeded" in folded)
        assert folded.endswith("say that it is not allowed.")

    def test_a_failure_reads_as_a_failure(self, stub_model, make_gateway):
        """A call that ran and broke: FAILED with its kind, neither success nor refusal."""
        gateway = make_gateway(StubRunner(failed_execution("tool_error")))
        model = stub_model(['{"name": "square", "arguments": {"x": 3}}', "It failed."],
                           tool_role="user")

        Agent(gateway=gateway, model=model, principal="alice").run("What is 3 squared?")

        folded = model.seen[1][-1].content
        assert (True, False, False) == ("ran and FAILED (tool_error)" in folded,
                                        "REFUSED" in folded, "succeeded" in folded)

    def test_the_system_prompt_does_not_prime_a_refusal(self):
        """The system prompt no longer tells the model what to say when denied."""
        from callward.core.agent._loop import SYSTEM_PROMPT

        assert "not allowed" not in SYSTEM_PROMPT


class TestFollowUp:
    def test_an_answer_missing_a_named_part_gets_another_turn(self, stub_model, gateway,
                                                              store, runner):
        """
        Asked two things, the model calls one tool and answers: it is asked once more,
        naming what is uncovered, calls the other tool, and answers both.
        """
        model = stub_model([SQUARE_13, "13 squared is 169.", CAPITAL_FRANCE,
                            "169, and the capital is Paris."])

        run = Agent(gateway=gateway, model=model, principal="alice").run(TWO_PARTS)

        assert ("answered", "169, and the capital is Paris.", ["square", "capital"]) == (
            run.stop, run.answer, [call.name for call in runner.calls])
        follow_up = model.seen[2][-1]
        assert ("user", True, False) == (follow_up.role, "'France'" in follow_up.content,
                                         "'13'" in follow_up.content)
        (record,) = [r.body for r in store.records() if r.kind == "model.follow_up"]
        assert (2, 1, "question_parts_uncovered") == (
            record["turn"], record["uncovered"], record["reason"])

    def test_no_new_call_after_the_follow_up_keeps_the_earlier_answer(self, stub_model,
                                                                      gateway, store):
        """Asked once (only once), the model answers again without a call: its first stands."""
        model = stub_model([SQUARE_13, "169.", "Just 169."])

        run = Agent(gateway=gateway, model=model, principal="alice").run(TWO_PARTS)

        assert ("answered", "169.", 3) == (run.stop, run.answer, len(run.steps))
        assert 1 == kinds(store).count("model.follow_up")

    def test_after_the_follow_up_the_fold_shows_every_part(self, stub_model, gateway):
        """The last folded turn holds the earlier square result beside the new capital one."""
        model = stub_model([SQUARE_13, "169.", CAPITAL_FRANCE, "169 and Paris."],
                           tool_role="user")

        run = Agent(gateway=gateway, model=model, principal="alice").run(TWO_PARTS)

        folded = model.seen[3][-1].content
        assert ("169 and Paris.", True, True) == (
            run.answer, 'square({"x": 13}) succeeded. Result: 169' in folded,
            'capital({"country": "France"}) succeeded' in folded)

    def test_the_follow_up_turn_must_be_a_call_and_does_not_see_the_earlier_answer(
            self, stub_model, gateway, store):
        """
        Folded: the follow-up takes the place of the cue to answer after the results, the
        prose answer is kept aside (not shown to the model), only the follow-up turn is
        asked to be a call, and its model.turn record says so.
        """
        model = stub_model([SQUARE_13, "13 squared is 169.", CAPITAL_FRANCE, "169 and Paris."],
                           tool_role="user")

        Agent(gateway=gateway, model=model, principal="alice").run(TWO_PARTS)

        asked = model.seen[2]
        assert [False, False, True, False] == model.required
        assert ["system", "user", "assistant", "user"] == [m.role for m in asked]
        assert all("13 squared is 169." not in m.content for m in asked)
        assert asked[-1].content.startswith("Tool results")
        assert 'square({"x": 13}) succeeded. Result: 169' in asked[-1].content
        assert asked[-1].content.endswith("Reply with the tool call for it.")
        assert "Now answer" not in asked[-1].content
        turns = [r.body for r in store.records() if r.kind == "model.turn"]
        assert [False, False, True, False] == [body.get("call_required", False)
                                               for body in turns]

    def test_in_the_tool_role_the_follow_up_comes_after_the_results(self, stub_model,
                                                                     gateway):
        """Native tool messages: the follow-up is one more user turn after them, no prose."""
        model = stub_model([SQUARE_13, "169.", CAPITAL_FRANCE, "169 and Paris."])

        Agent(gateway=gateway, model=model, principal="alice").run(TWO_PARTS)

        assert ["system", "user", "assistant", "tool", "user"] == [
            m.role for m in model.seen[2]]
        assert "'France'" in model.seen[2][-1].content

    @pytest.mark.parametrize("follow_up_output", [
        SQUARE_13,  # the call already made: a repeat, not run again
        '{"name": "square", "arguments": {"x": ',  # a call that cannot be read
    ])
    def test_a_follow_up_with_nothing_new_keeps_the_earlier_answer(
            self, stub_model, gateway, runner, follow_up_output):
        """A required call that repeats or cannot be read adds nothing: the answer stands."""
        model = stub_model([SQUARE_13, "169.", follow_up_output])

        run = Agent(gateway=gateway, model=model, principal="alice").run(TWO_PARTS)

        assert ("answered", "169.", 3, ["square"]) == (
            run.stop, run.answer, len(run.steps), [call.name for call in runner.calls])

    def test_no_follow_up_past_the_step_budget(self, stub_model, gateway, store):
        """The last turn the budget allows: its answer is taken, not thrown away."""
        model = stub_model([SQUARE_13, "169."])

        run = Agent(gateway=gateway, model=model, principal="alice",
                    limits=AgentLimits(max_steps=2)).run(TWO_PARTS)

        assert ("answered", "169.") == (run.stop, run.answer)
        assert "model.follow_up" not in kinds(store)

    def test_a_budget_spent_after_the_follow_up_keeps_the_earlier_answer(
            self, stub_model, gateway, runner):
        """The follow-up's call uses the last turn: the answer given before it stands."""
        model = stub_model([SQUARE_13, "169.", CAPITAL_FRANCE])

        run = Agent(gateway=gateway, model=model, principal="alice",
                    limits=AgentLimits(max_steps=3)).run(TWO_PARTS)

        assert ("answered", "169.", ["square", "capital"]) == (
            run.stop, run.answer, [call.name for call in runner.calls])

    @pytest.mark.parametrize(("question", "outputs"), [
        # Everything the question names was called for.
        ("What is 13 squared?", [SQUARE_13, "169."]),
        # No tool was called: the model answered on its own, as it may.
        ("What is the capital of France?", ["Paris."]),
    ])
    def test_no_follow_up_when_nothing_is_missing(self, stub_model, gateway, store, question,
                                                  outputs):
        model = stub_model(outputs)

        run = Agent(gateway=gateway, model=model, principal="alice").run(question)

        assert ("answered", len(outputs)) == (run.stop, len(run.steps))
        assert "model.follow_up" not in kinds(store)


class TestCoverage:
    @pytest.mark.parametrize(("question", "named"), [
        ("What is 48 squared?", ("48",)),
        ("Add 19.5 and 22.25.", ("19.5", "22.25")),
        ("What do you get when you add -7 to 150?", ("-7", "150")),
        ("What is the sum of 1,200 and 34?", ("1200", "34")),
        ("Which city is the capital of Germany?", ("Germany",)),
        ("What are the capitals of Kenya and Germany?", ("Kenya", "Germany")),
        ("Drop the table named staging_orders.", ("staging_orders",)),
        ("Hi. Tell me about Python. I said hello to Bob.", ("Python", "Bob")),
    ])
    def test_mentions(self, question, named):
        """Numbers, proper nouns past a sentence's first word, and identifiers."""
        assert named == mentions(question)

    def test_a_chain_is_judged_by_all_its_calls(self):
        """square(6) = 36 leaves 10 uncovered until add(36, 10) runs."""
        question = "What is 6 squared plus 10?"

        assert (("10",), ()) == (uncovered(question, [{"x": 6}, 36]),
                                 uncovered(question, [{"x": 6}, 36, {"a": 36, "b": 10}]))

    def test_strings_are_matched_case_blind_and_signs_either_way(self):
        assert () == uncovered("Subtract 7 from 150 in Kenya.",
                               [{"a": 150, "b": -7}, {"country": "KENYA"}])
