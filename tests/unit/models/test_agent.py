"""The agent loop: every call through the gateway, every turn audited, repeats never rerun."""

from __future__ import annotations

import itertools
import json

import pytest

from callward.audit import verify
from callward.core._canonical import sha256_hex
from callward.core.agent._loop import Agent, AgentLimits
from callward.core.models._chat import TransformersChatModel
from callward.core.testing import kinds

ADD = '{"name": "add", "arguments": {"a": 2, "b": 40}}'


class TestAgentRun:
    def test_call_then_answer(self, stub_model, gateway, store, runner):
        """A call runs through the gateway, its result goes back, the next turn is the answer."""
        model = stub_model([ADD, "2 + 40 is 42."])

        run = Agent(gateway=gateway, model=model, principal="alice").run("What is 2 + 40?")

        assert ("answered", "2 + 40 is 42.") == (run.stop, run.answer)
        assert [{"a": 2, "b": 40}] == [call.arguments for call in runner.calls]
        assert ["call.authorized", "call.completed", "model.turn", "model.turn"] == kinds(store)
        assert '"result": 42' in model.seen[1][-1].content

    def test_tools_are_offered_as_json_schemas(self, stub_model, gateway):
        """
        The model sees each tool its principal could be allowed as a function with its
        JSON Schema, and no other: alice is an analyst, drop_table is for DBAs.
        """
        model = stub_model(["No tool needed."])

        Agent(gateway=gateway, model=model, principal="alice").run("Hi")

        names = sorted(entry["function"]["name"] for entry in model.tools)
        assert ["add", "capital", "spin", "square"] == names
        add = next(e for e in model.tools if e["function"]["name"] == "add")
        assert ["a", "b"] == add["function"]["parameters"]["required"]

    def test_parallel_calls_all_run_in_order(self, stub_model, gateway, runner):
        """Several calls in one turn all run, in the order written."""
        model = stub_model([
            '{"name": "square", "arguments": {"x": 3}}\n{"name": "add", "arguments": '
            '{"a": 1, "b": 1}}', "9 and 2."])

        run = Agent(gateway=gateway, model=model, principal="alice").run("q")

        assert ["square", "add"] == [call.name for call in runner.calls]
        assert [9, 2] == [result.content for result in run.steps[0].results]

    def test_model_turn_record_links_output_to_calls(self, stub_model, gateway, store):
        """model.turn holds model id and digest, hashes, tokens, duration and the call receipts."""
        model = stub_model([ADD, "42"])

        run = Agent(gateway=gateway, model=model, principal="alice").run("q")

        turn = next(r for r in store.records() if r.kind == "model.turn")
        body = turn.body
        completed = run.steps[0].results[0]
        assert {"id": "stub", "digest": "cd" * 32} == body["model"]
        assert ("01" * 32, "02" * 32) == (body["prompt_sha256"], body["output_sha256"])
        assert {"prompt": 10, "output": 5} == body["tokens"]
        assert [{"call_id": completed.call_id, "kind": "ok", "seq": completed.receipt.seq,
                 "repeat": False}] == body["results"]
        assert run.steps[0].turn_seq == turn.seq
        assert "duration_ms" in body

    def test_log_with_model_turns_verifies(self, stub_model, gateway, store, tmp_path):
        """model.turn records are signed into the same chain: the whole log verifies."""
        Agent(gateway=gateway, model=stub_model([ADD, "42"]), principal="alice").run("q")

        verified = verify(tmp_path / "audit.db", tmp_path / "keys" / "audit-ed25519.pub")

        assert 4 == verified.records


class TestRefusals:
    def test_denied_call_goes_back_as_a_denial(self, stub_model, gateway, store, runner):
        """A denied call never runs; the model reads the denial and can explain it."""
        model = stub_model(['{"name": "drop_table", "arguments": {"table": "users"}}',
                               "I am not allowed to drop tables."])

        run = Agent(gateway=gateway, model=model, principal="mallory").run("Drop users")

        assert [] == runner.calls
        assert "permission" == run.steps[0].results[0].kind
        message = json.loads(model.seen[1][-1].content)
        assert ("permission", "denied by policy: do not retry; tell the user it is not allowed") \
            == (message["status"], message["note"])
        assert ["call.denied", "model.turn", "model.turn"] == kinds(store)

    def test_malformed_call_goes_back_and_is_audited(self, stub_model, gateway, store, runner):
        """An unreadable call is audited as call.rejected, nothing runs, the model retries."""
        model = stub_model(['{"name": "add", "arguments": {"a": 1,}}', ADD, "42"])

        run = Agent(gateway=gateway, model=model, principal="alice").run("q")

        assert "malformed" == run.steps[0].results[0].kind
        assert "offset" in json.loads(model.seen[1][-1].content)["error"]
        assert 1 == len(runner.calls)
        assert "call.rejected" == kinds(store)[0]

    def test_repeated_call_is_not_run_twice(self, stub_model, gateway, store, runner):
        """The model repeating an executed call gets the earlier result; the tool runs once."""
        model = stub_model([ADD, ADD, ADD + "\n" + ADD, "42"])

        run = Agent(gateway=gateway, model=model, principal="alice").run("q")

        assert 1 == len(runner.calls)
        assert [(False,), (True,), (True, True)] == [step.repeats for step in run.steps[:3]]
        assert 3 == kinds(store).count("model.repeated_call")
        first = run.steps[0].results[0]
        assert {first.call_id} == {r.call_id for step in run.steps for r in step.results}

    def test_denied_call_repeated_is_decided_again(self, stub_model, gateway, store):
        """Only executed calls are remembered: a repeated denial goes through the policy again."""
        drop = '{"name": "drop_table", "arguments": {"table": "users"}}'
        model = stub_model([drop, drop, "Not allowed."])

        Agent(gateway=gateway, model=model, principal="mallory").run("q")

        assert 2 == kinds(store).count("call.denied")


class TestBudgets:
    def test_step_budget_ends_the_run(self, stub_model, gateway):
        """A model that never answers stops at max_steps, with no answer."""
        model = stub_model([f'{{"name": "square", "arguments": {{"x": {n}}}}}'
                               for n in range(10)])

        run = Agent(gateway=gateway, model=model, principal="alice",
                    limits=AgentLimits(max_steps=3)).run("q")

        assert ("step_budget", None, 3) == (run.stop, run.answer, len(run.steps))

    def test_time_budget_ends_the_run(self, stub_model, gateway):
        """Past wall_seconds no new turn starts (the clock is injected)."""
        ticks = itertools.count(0, 10.0)
        model = stub_model([ADD, "unused", "unused"])

        run = Agent(gateway=gateway, model=model, principal="alice",
                    limits=AgentLimits(wall_seconds=15), clock=lambda: next(ticks)).run("q")

        assert ("time_budget", 1) == (run.stop, len(run.steps))

    def test_callward_time_excludes_the_model(self, stub_model, gateway, runner, monkeypatch):
        """A step's callward_seconds counts its calls through the gateway, not generation."""
        now = [0.0]
        model = stub_model([ADD, "42"])
        generate, run_tool = model.generate, runner.run

        def slow_generate(*args, **kwargs):
            now[0] += 100.0
            return generate(*args, **kwargs)

        def timed_run(*args, **kwargs):
            now[0] += 1.0
            return run_tool(*args, **kwargs)

        monkeypatch.setattr(model, "generate", slow_generate)
        monkeypatch.setattr(runner, "run", timed_run)

        run = Agent(gateway=gateway, model=model, principal="alice",
                    clock=lambda: now[0]).run("q")

        assert [1.0, 0.0] == [step.callward_seconds for step in run.steps]
        assert 201.0 == run.seconds

    @pytest.mark.parametrize("limits", [{"max_steps": 0}, {"wall_seconds": 0}])
    def test_budgets_are_finite_and_positive(self, limits):
        """A budget of zero or less is refused at construction."""
        with pytest.raises(ValueError, match="must be in"):
            AgentLimits(**limits)


class TestResultsBack:
    def test_fold_into_user_turn(self, stub_model, gateway):
        """With tool_role user, results come back as one plain user turn, not the tool role."""
        model = stub_model([ADD, "42"], tool_role="user")

        Agent(gateway=gateway, model=model, principal="alice").run("q")

        last = model.seen[1][-1]
        assert ("user", True) == (last.role, "Tool results" in last.content)
        assert "tool" not in {message.role for message in model.seen[1]}

    def test_native_tool_role(self, stub_model, gateway):
        """With tool_role tool, each result is a tool message named after its tool."""
        model = stub_model([ADD, "42"])

        Agent(gateway=gateway, model=model, principal="alice").run("q")

        assert [("tool", "add")] == [(m.role, m.name) for m in model.seen[1] if m.role == "tool"]


class TestWithTinyModel:
    def test_real_generation_through_the_loop(self, gateway, store, tiny_model_dir):
        """The real transformers backend drives the loop; each turn is audited with its digest."""
        from callward.core.models._chat import GenerationConfig

        model = TransformersChatModel.from_directory(
            tiny_model_dir, generation=GenerationConfig(max_new_tokens=8))

        run = Agent(gateway=gateway, model=model, principal="alice",
                    limits=AgentLimits(max_steps=2)).run("What is 2 + 3?")

        turns = [r.body for r in store.records() if r.kind == "model.turn"]
        assert len(run.steps) == len(turns)
        assert {model.digest} == {body["model"]["digest"] for body in turns}
        assert all(body["tokens"]["prompt"] > 100 for body in turns)

    def test_model_turn_records_the_dtype_and_the_reused_prefix(self, gateway, store,
                                                                 tiny_model_dir):
        """
        model.turn names the dtype the turn was computed in, and how many prompt tokens
        came from the kept prefix cache (the second question reuses the first's prefix).
        """
        from callward.core.models._chat import GenerationConfig

        model = TransformersChatModel.from_directory(
            tiny_model_dir, generation=GenerationConfig(max_new_tokens=4), dtype="float32")
        for question in ("What is 2 + 3?", "What is 4 + 5?"):
            Agent(gateway=gateway, model=model, principal="alice",
                  limits=AgentLimits(max_steps=1)).run(question)

        turns = [r.body for r in store.records() if r.kind == "model.turn"]
        assert ["float32", "float32"] == [body["model"]["dtype"] for body in turns]
        assert not any("prompts_in_float32" in body["model"] for body in turns)
        assert "prompt_cached" not in turns[0]["tokens"]
        assert 100 < turns[1]["tokens"]["prompt_cached"] < turns[1]["tokens"]["prompt"]

    @pytest.mark.parametrize(("flags", "recorded"), [
        (frozenset({"avx2", "fma"}), True), (frozenset({"avx2", "avx512_bf16"}), False)])
    def test_model_turn_records_prompts_computed_in_float32(self, gateway, store,
                                                            tiny_model_dir, flags, recorded):
        """
        bfloat16 on a CPU without bfloat16 arithmetic (auto on AVX2 alone): model.turn
        says its prompt was computed in float32, which a replay must know; native
        bfloat16 says nothing of it.
        """
        from callward.core.models._chat import GenerationConfig

        model = TransformersChatModel.from_directory(
            tiny_model_dir, generation=GenerationConfig(max_new_tokens=4), flags=flags)
        Agent(gateway=gateway, model=model, principal="alice",
              limits=AgentLimits(max_steps=1)).run("What is 2 + 3?")

        [turn] = [r.body for r in store.records() if r.kind == "model.turn"]
        assert "bfloat16" == turn["model"]["dtype"]
        assert recorded == turn["model"].get("prompts_in_float32", False)


    def test_a_required_call_starts_with_the_call_opening(self, tiny_model_dir):
        """
        require_call: the turn's text starts with CALL_OPENING, the opening is part of the
        hashed prompt, and the turn says it was required; without tools nothing is opened.
        """
        from callward.core.models._chat import CALL_OPENING, ChatMessage, GenerationConfig

        model = TransformersChatModel.from_directory(
            tiny_model_dir, generation=GenerationConfig(max_new_tokens=4), dtype="float32")
        messages = [ChatMessage("system", "Use tools."), ChatMessage("user", "2 + 3?")]
        tools = [{"type": "function", "function": {
            "name": "add", "description": "Add.", "parameters": {"type": "object"}}}]

        free = model.generate(messages, tools)
        required = model.generate(messages, tools, require_call=True)
        no_tools = model.generate(messages, [], require_call=True)

        assert (False, True, False) == (free.call_required, required.call_required,
                                        no_tools.call_required)
        assert required.text.startswith(CALL_OPENING)
        prompt = model.render(messages, tools) + CALL_OPENING
        assert sha256_hex(prompt.encode("utf-8")) == required.prompt_sha256
        assert free.prompt_tokens < required.prompt_tokens


class TestGatewayRecord:
    def test_record_signs_into_the_same_log(self, gateway, store):
        """Gateway.record appends a signed record of a non-call kind and returns its receipt."""
        receipt = gateway.record("model.turn", {"turn": 1})

        assert (1, ["model.turn"]) == (receipt.seq, kinds(store))

    @pytest.mark.parametrize("kind", ["call.completed", "call.authorized", "Model.Turn", "model",
                                      "model.turn; drop"])
    def test_call_kinds_and_odd_names_are_refused(self, gateway, store, kind):
        """Nobody forges the gateway's own call.* records through record(); kinds are snake_case."""
        with pytest.raises(ValueError, match="dotted snake_case"):
            gateway.record(kind, {})

        assert [] == list(store.records())


class TestOrigin:
    def test_every_call_record_names_the_model_that_emitted_it(self, stub_model, gateway, store):
        """call.authorized, call.completed, call.denied and call.rejected carry model and turn."""
        model = stub_model(['{"name": "add", "arguments": {"a": 1,}}', ADD,
                            '{"name": "drop_table", "arguments": {"table": "t"}}', "done"])

        run = Agent(gateway=gateway, model=model, principal="alice").run("q")

        calls = [r for r in store.records() if r.kind.startswith("call.")]
        assert ["call.rejected", "call.authorized", "call.completed", "call.denied"] == [
            r.kind for r in calls]
        assert [(run.run_id, "cd" * 32, turn) for turn in (1, 2, 2, 3)] == [
            (r.body["model"]["run_id"], r.body["model"]["digest"], r.body["model"]["turn"])
            for r in calls]

    def test_calls_outside_a_run_carry_no_model(self, gateway, store):
        """A call handed to the gateway directly names no model."""
        gateway.handle_text(ADD, principal="alice")

        assert [False, False] == ["model" in r.body for r in store.records()]
