"""
Running plans through the gateway: parallel steps, skipped dependents, provenance
in every record, and flow labels checked per value. A real SQLite audit log, real
keys, the real policy evaluator with the shipped example policy; the tools run
in-process (StubRunner) because a unit test starts no container.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import ModuleType

import pytest

from callward.audit import verify
from callward.core import (
    AuditUnavailable,
    CallId,
    Execution,
    Provenance,
    ProvenanceEdge,
    ResourceLimits,
    Sha256Hex,
    ToolCall,
    ToolRegistry,
    ToolSpec,
)
from callward.core.plans import PlanInvalid, parse_plan, run_plan
from callward.core.plans._run import run_plan_file
from callward.core.testing import (
    StubFailingAuditLog,
    StubRunner,
    computed,
    failed_execution,
    kinds,
    ok_execution,
)
from callward.policies import Policy
from callward.policies._replay import replay
from tests._modules import module_from_file

EXAMPLE = Path(__file__).resolve().parents[3] / "core" / "examples" / "plans"
IMAGE = Sha256Hex("cd" * 32)


def _tools_module() -> ModuleType:
    return module_from_file("plan_example_tools", EXAMPLE / "tools.py")


TOOLS = _tools_module()


def run_example_tool(spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
    """The example tool, run in-process as the sandbox would run it in a container."""
    return computed(getattr(TOOLS, spec.name))(spec, call, limits)


def example_runner(**options) -> StubRunner:
    """A StubRunner of the example tools; ``options`` go to StubRunner (before, tools)."""
    return StubRunner(run_example_tool, image_digest=IMAGE, **options)


@pytest.fixture(name="registry")
def _registry() -> ToolRegistry:
    registry = ToolRegistry()
    registry.load(EXAMPLE / "tools.py")
    return registry


@pytest.fixture(name="policy")
def _policy() -> Policy:
    return Policy.from_file(EXAMPLE / "policy.yaml")


@pytest.fixture(name="runner")
def _runner() -> StubRunner:
    return example_runner()


def plan(text: str):
    return parse_plan(text, source="test-plan")


NEWS = (EXAMPLE / "news_summary.yaml").read_text()


class TestNewsSummary:
    def test_every_step_runs_through_the_gateway_and_ends_ok(self, make_gateway, store,
                                                             tmp_path):
        """The example plan ends ok: two searches, cleanup, a summary; the log verifies."""
        runner = example_runner()
        report = run_plan(make_gateway(runner), plan(NEWS), principal="editor")

        assert report.ok
        assert ["search", "background", "clean", "summarize"] == [o.step for o in report.outcomes]
        assert 4 == len(runner.calls)
        summary = report.outcome("summarize")
        assert "Utilities added record battery storage to the grid this year." in (
            summary.to_json()["output"]["summary"])
        assert "plan.started" == kinds(store)[0]
        assert "plan.completed" == kinds(store)[-1]
        assert 4 == kinds(store).count("call.completed")
        verify(tmp_path / "audit.db", tmp_path / "keys" / "audit-ed25519.pub")

    def test_each_call_record_names_where_its_arguments_came_from(self, make_gateway, store):
        """call.authorized and call.completed of a step carry its provenance edges."""
        report = run_plan(make_gateway(), plan(NEWS), principal="editor")

        search = report.outcome("search")
        clean = report.outcome("clean")
        records = {(r.kind, r.body.get("call", {}).get("id", r.body.get("call_id"))): r
                   for r in store.records() if r.kind.startswith("call.")}
        authorized = records[("call.authorized", clean.call_id)].body
        completed = records[("call.completed", clean.call_id)].body
        first = {"argument": "/texts/0", "source_step": "search",
                 "source_call_id": search.call_id,
                 "source_output_path": "output.hits[0].text",
                 "source_seq": search.receipt.seq}
        assert first == authorized["provenance"]["edges"][0]
        assert authorized["provenance"] == completed["provenance"]
        assert ["/texts/0", "/texts/1", "/texts/2"] == [
            e["argument"] for e in completed["provenance"]["edges"]]
        assert {"edges": [], "literal_labels": []} == records[
            ("call.authorized", search.call_id)].body["provenance"]
        assert "call.completed" == store.get(search.receipt.seq).kind

    def test_plan_records_name_digest_steps_and_outcomes(self, make_gateway, store):
        """plan.started lists the steps; plan.completed each outcome and receipt seq."""
        parsed = plan(NEWS)
        report = run_plan(make_gateway(), parsed, principal="editor")

        started = store.get(report.started.seq).body
        completed = store.get(report.completed.seq).body
        assert (parsed.digest, "editor", 4) == (started["plan_digest"], started["principal"],
                                                started["max_parallel"])
        assert ["search", "background", "clean", "summarize"] == [
            s["id"] for s in started["steps"]]
        assert [{"step": o.step, "status": "ok", "kind": "ok", "call_id": o.call_id,
                 "seq": o.receipt.seq} for o in report.outcomes] == completed["steps"]
        assert completed["ok"] is True

    def test_plan_runs_in_a_session_of_its_own(self, make_gateway, store):
        """Without a session id, each run gets a fresh one, named in its records."""
        gateway = make_gateway()
        first = run_plan(gateway, plan(NEWS), principal="editor")
        second = run_plan(gateway, plan(NEWS), principal="editor")

        assert first.session_id != second.session_id
        assert first.session_id.startswith("plan_")


class TestParallel:
    def test_independent_steps_run_at_the_same_time(self, make_gateway):
        """The two searches are inside the sandbox together (a barrier both must reach)."""
        barrier = threading.Barrier(2, timeout=30)

        def meet(call: ToolCall) -> None:
            if call.name == "search_articles":
                barrier.wait()

        report = run_plan(make_gateway(example_runner(before=meet)), plan(NEWS), principal="editor")

        assert report.ok

    def test_max_parallel_bounds_how_many_run_at_once(self, make_gateway):
        """With max_parallel=1 no two steps are ever inside the sandbox together."""
        inside = []
        lock = threading.Lock()
        active = [0]

        def count(call: ToolCall) -> None:
            with lock:
                active[0] += 1
                inside.append(active[0])
            threading.Event().wait(0.01)
            with lock:
                active[0] -= 1

        text = "steps:\n" + "".join(
            f"  - {{id: s{i}, tool: search_articles, arguments: {{query: solar}}}}\n"
            for i in range(6))
        report = run_plan(make_gateway(example_runner(before=count)), plan(text),
                          principal="editor", max_parallel=1)

        assert report.ok
        assert 1 == max(inside)

    def test_out_of_range_max_parallel_is_refused(self, make_gateway):
        """max_parallel outside 1..64 is a programming error, before anything runs."""
        with pytest.raises(ValueError, match="max_parallel"):
            run_plan(make_gateway(), plan(NEWS), principal="editor", max_parallel=65)


class TestFailures:
    def test_failed_step_skips_its_dependents_with_the_reason(self, make_gateway, store):
        """A tool failure skips what depends on it, transitively; the other branch runs."""
        runner = example_runner(tools={"clean_text": failed_execution()})
        report = run_plan(make_gateway(runner), plan(NEWS), principal="editor")

        assert not report.ok
        assert [("search", "ok"), ("background", "ok"), ("clean", "tool_error"),
                ("summarize", "skipped")] == [(o.step, o.kind) for o in report.outcomes]
        skipped = report.outcome("summarize")
        assert "skipped: dependency clean ended tool_error" == skipped.message
        assert "summarize_extractive" not in [c.name for c in runner.calls]
        record = store.get(skipped.receipt.seq)
        assert ("plan.step_skipped", "clean", "tool_error") == (
            record.kind, record.body["dependency"], record.body["dependency_kind"])

    def test_denied_step_skips_every_step_downstream(self, make_gateway, store):
        """A denial (here schema: limit 99) skips the whole chain below it, each audited."""
        text = NEWS.replace("limit: 3", "limit: 99")
        report = run_plan(make_gateway(), plan(text), principal="editor")

        assert [("search", "denied", "schema"), ("background", "ok", "ok"),
                ("clean", "skipped", "skipped"), ("summarize", "skipped", "skipped")] == [
            (o.step, o.status, o.kind) for o in report.outcomes]
        assert "skipped: dependency search ended schema" == report.outcome("clean").message
        assert "skipped: dependency clean ended skipped" == report.outcome("summarize").message
        assert 2 == kinds(store).count("plan.step_skipped")
        assert "call.denied" == store.get(report.outcome("search").receipt.seq).kind

    def test_principal_without_permission_is_denied_per_step(self, make_gateway):
        """Each step is decided for the plan's principal; a stranger is denied at the first."""
        report = run_plan(make_gateway(), plan(NEWS), principal="stranger")

        assert {"permission", "skipped"} == {o.kind for o in report.outcomes}

    def test_reference_that_does_not_resolve_fails_only_its_step(self, make_gateway, store):
        """A $ref past the end of a list fails its step, says where, and calls nothing."""
        text = NEWS.replace("{query: solar farm, limit: 2}", "{query: solar farm, limit: 1}")
        text = text.replace("steps.background.output.hits[0].text",
                            "steps.background.output.hits[1].text")
        runner = example_runner()
        report = run_plan(make_gateway(runner), plan(text), principal="editor")

        clean = report.outcome("clean")
        assert ("failed", "unresolved_ref") == (clean.status, clean.kind)
        assert ("$ref steps.background.output.hits[1].text does not resolve: output.hits has "
                "1 items, no index 1") == clean.message
        assert ["search_articles", "search_articles"] == [c.name for c in runner.calls]
        record = store.get(clean.receipt.seq)
        assert ("plan.step_failed", "/texts/2") == (record.kind, record.body["argument"])
        assert "skipped: dependency clean ended unresolved_ref" == report.outcome(
            "summarize").message


class TestHostileOutputs:
    def test_a_ref_in_a_tool_output_is_passed_on_as_data(self, make_gateway, store):
        """A tool that returns a {"$ref": ...} object cannot make the plan read another step."""
        text = """
steps:
  - {id: wire, tool: internal_wire, arguments: {topic: acme}}
  - {id: a, tool: search_articles, arguments: {query: solar}}
  - id: b
    tool: clean_text
    arguments: {texts: [{$ref: "steps.a.output.hits[0].title"}]}
"""
        forged = {"$ref": "steps.wire.output.items[0].text"}
        runner = example_runner(
            tools={"search_articles": ok_execution({"hits": [{"title": forged}]})})

        report = run_plan(make_gateway(runner), plan(text), principal="editor")

        clean = report.outcome("b")
        assert ("denied", "schema") == (clean.status, clean.kind)
        assert {"texts": [forged]} == store.get(clean.receipt.seq).body["call"]["arguments"]
        assert "clean_text" not in [c.name for c in runner.calls]


class TestRejectedPlans:
    def test_unknown_tool_is_refused_audited_and_nothing_runs(self, make_gateway, store):
        """A plan naming an unregistered tool is refused as plan.rejected; nothing runs."""
        runner = example_runner()
        text = NEWS.replace("tool: clean_text", "tool: rm_rf")

        with pytest.raises(PlanInvalid) as caught:
            run_plan(make_gateway(runner), plan(text), principal="editor")

        assert [("steps[2].tool", "no tool 'rm_rf' is registered")] == [
            (p.location, p.message) for p in caught.value.problems]
        assert ["plan.rejected"] == kinds(store)
        assert [] == runner.calls

    def test_bad_plan_file_is_audited_with_its_problems(self, make_gateway, store, tmp_path):
        """A plan file with a cycle is refused; the record lists the problem and its hash."""
        path = tmp_path / "cycle.yaml"
        path.write_text("steps:\n"
                        "- {id: a, tool: clean_text, arguments: {texts: {$ref: steps.b.output}}}\n"
                        "- {id: b, tool: clean_text, arguments: {texts: {$ref: steps.a.output}}}\n")

        with pytest.raises(PlanInvalid):
            run_plan_file(make_gateway(), path, principal="editor")

        (record,) = list(store.records())
        assert "plan.rejected" == record.kind
        assert [{"location": "steps[0]", "message": "the steps form a cycle: a -> b -> a"}] == (
            record.body["problems"])
        assert 64 == len(record.body["plan_sha256"])


FLOWS = """
version: 1
name: flows
steps:
  - {id: wire, tool: internal_wire, arguments: {topic: acme}}
  - {id: search, tool: search_articles, arguments: {query: solar farm, limit: 1}}
  - id: clean_wire
    tool: clean_text
    arguments: {texts: [{$ref: "steps.wire.output.items[0].text"}]}
  - id: leak
    tool: publish
    arguments: {channel: public, text: {$ref: "steps.clean_wire.output.texts[0]"}}
  - id: direct_leak
    tool: publish
    arguments: {channel: public, text: {$ref: "steps.wire.output.items[0].text"}}
  - id: news
    tool: publish
    arguments: {channel: public, text: {$ref: "steps.search.output.hits[0].title"}}
"""


class TestFlowsPerValue:
    def test_secret_value_is_stopped_and_clean_value_passes_in_one_session(
            self, make_gateway, store):
        """
        In one session that has seen a secret, publishing the secret (directly or
        through a cleanup step) is denied as flow, while publishing a news title is allowed.
        """
        runner = example_runner()
        report = run_plan(make_gateway(runner), plan(FLOWS), principal="editor")

        outcomes = {o.step: (o.status, o.kind) for o in report.outcomes}
        assert ("ok", "ok") == outcomes["news"]
        assert ("denied", "flow") == outcomes["direct_leak"]
        assert ("denied", "flow") == outcomes["leak"]
        leak = store.get(report.outcome("leak").receipt.seq).body
        assert ["no-secret-egress"] == leak["decision"]["reasons"]
        assert "$.text" == leak["decision"]["json_path"]
        assert ("call.denied", "clean_wire") == (
            store.get(report.outcome("leak").receipt.seq).kind,
            leak["provenance"]["edges"][0]["source_step"])
        assert "step 'clean_wire' carries secret" in report.outcome("leak").message
        published = [c.arguments["text"] for c in runner.calls if c.name == "publish"]
        assert ["Solar farm opens on former coal site"] == published

    def test_labels_propagate_along_edges(self, make_gateway, store):
        """A step fed by a secret output produces output that carries secret too."""
        report = run_plan(make_gateway(), plan(FLOWS), principal="editor")

        def labels(step: str) -> list[str]:
            return store.get(report.outcome(step).receipt.seq).body["result_labels"]

        assert (["secret"], ["secret"], []) == (labels("wire"), labels("clean_wire"),
                                               labels("search"))

    def test_model_call_without_provenance_keeps_the_session_rule(self, make_gateway):
        """A call with no provenance in the plan's session is denied once a secret was seen."""
        gateway = make_gateway()
        report = run_plan(gateway, plan(FLOWS), principal="editor")
        call = ToolCall.create(id="model_1", name="publish",
                               arguments={"channel": "public", "text": "hello"}, dialect="api")

        result = gateway.handle(call, principal="editor", session_id=report.session_id)

        assert "flow" == result.kind

    def test_a_tool_that_declassifies_ends_the_label(self, make_gateway):
        """When the policy says clean_text declassifies secret, its output may be published."""
        text = (EXAMPLE / "policy.yaml").read_text().replace(
            "  publish:\n", "  clean_text:\n    declassifies: [secret]\n  publish:\n")
        report = run_plan(make_gateway(policy=Policy.from_text(text)), plan(FLOWS),
                          principal="editor")

        outcomes = {o.step: o.kind for o in report.outcomes}
        assert ("ok", "flow") == (outcomes["leak"], outcomes["direct_leak"])

    def test_literal_labels_taint_the_plan_text(self, make_gateway):
        """A plan written from labelled data can say so: its literals then carry the label."""
        text = "steps:\n  - {id: p, tool: publish, arguments: {channel: x, text: hi}}\n"
        report = run_plan(make_gateway(), plan(text), principal="editor",
                          literal_labels=frozenset({"secret"}))

        assert "flow" == report.outcome("p").kind

    def test_plan_in_a_model_session_that_saw_a_secret_taints_its_literals(self, make_gateway):
        """Run in a session where a model's call read a secret, the plan's literals carry it."""
        gateway = make_gateway()
        wire = ToolCall.create(id="model_1", name="internal_wire", arguments={"topic": "acme"},
                               dialect="api")
        assert "ok" == gateway.handle(wire, principal="editor", session_id="chat-7").kind
        text = "steps:\n  - {id: p, tool: publish, arguments: {channel: x, text: hi}}\n"

        in_chat = run_plan(gateway, plan(text), principal="editor", session_id="chat-7")
        fresh = run_plan(gateway, plan(text), principal="editor")

        assert ("flow", "ok") == (in_chat.outcome("p").kind, fresh.outcome("p").kind)

    def test_replay_judges_plan_steps_per_value_again(self, make_gateway, store):
        """Replaying the log under the same policy changes nothing: provenance replays too."""
        run_plan(make_gateway(), plan(FLOWS), principal="editor")
        registry = ToolRegistry()
        registry.load(EXAMPLE / "tools.py")

        report = replay(((r.kind, r.ts, r.body) for r in store.records()),
                        EXAMPLE / "policy.yaml", registry)

        assert (6, 6, 0) == (report.calls, report.unchanged, sum(report.changes.values()))

    def test_replay_without_provenance_would_see_the_session_rule(self, make_gateway, store):
        """The same records stripped of provenance replay under the strict session rule."""
        run_plan(make_gateway(), plan(FLOWS), principal="editor")
        registry = ToolRegistry()
        registry.load(EXAMPLE / "tools.py")
        stripped = ((r.kind, r.ts, {k: v for k, v in r.body.items() if k != "provenance"})
                    for r in store.records())

        report = replay(stripped, EXAMPLE / "policy.yaml", registry)

        assert 1 == report.changes["allow_to_deny"]
        assert "publish" == report.examples["allow_to_deny"][0]["tool"]


class TestAuditFailure:
    def test_a_failed_audit_write_stops_the_plan(self, make_gateway, store, runner):
        """When a record cannot be written the run raises; no later step starts."""
        gateway = make_gateway(audit=StubFailingAuditLog(store, fail_on=4))

        with pytest.raises(AuditUnavailable):
            run_plan(gateway, plan(NEWS), principal="editor")

        assert {"search_articles"} >= {c.name for c in runner.calls}
        assert "plan.completed" not in kinds(store)


class TestProvenanceValues:
    def test_round_trips_through_its_record_form(self):
        """A provenance read back from a record equals the one written."""
        provenance = Provenance((ProvenanceEdge("/texts/0", "search", CallId("c1"),
                                                "output.hits[0].text", 5),),
                                frozenset({"untrusted"}))

        assert provenance == Provenance.from_json(provenance.to_json())

    @pytest.mark.parametrize("arguments", [
        ("texts", "s", CallId("c"), "output", 1),
        ("/x", "s", CallId(""), "output", 1),
        ("/x", "s", CallId("c"), "output", -1),
    ])
    def test_an_edge_without_pointer_or_source_cannot_exist(self, arguments):
        """An edge's argument is a JSON pointer and it names its source call and record."""
        with pytest.raises(ValueError, match=r"pointer|source"):
            ProvenanceEdge(*arguments)

    @pytest.mark.parametrize("value", [
        {}, {"edges": {}}, {"edges": [1]}, {"edges": [{"argument": "/x"}]},
        {"edges": [{"argument": "/x", "source_step": "s", "source_call_id": "c",
                    "source_output_path": "output", "source_seq": "5"}]},
    ])
    def test_a_malformed_record_form_is_refused(self, value):
        """What is not a recorded provenance raises, so replay counts the record as skipped."""
        with pytest.raises((KeyError, TypeError, ValueError)):
            Provenance.from_json(value)
