"""
callward.core.testing: the one set of test doubles. A real SQLite audit log and real
keys behind the failing log; the runners are what they stand in for, so each is also
checked against the Protocol the gateway tells them apart by.
"""

from __future__ import annotations

import ast
import doctest
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from callward.audit import read_records
from callward.core import (
    AuditUnavailable,
    Placement,
    ResourceLimits,
    SandboxUnavailable,
    Sha256Hex,
    ToolCall,
    ToolSpec,
    canonical_bytes,
    sha256_hex,
    testing,
)
from callward.core.protocols import PlacingToolRunner
from callward.core.testing import (
    STUB_IMAGE_DIGEST,
    StubFailingAuditLog,
    StubPlacingRunner,
    StubRun,
    StubRunner,
    computed,
    failed_execution,
    kinds,
    ok_execution,
)

KERNEL = {"callward.core._canonical", "callward.core.errors", "callward.core.protocols",
          "callward.core.types"}


def spec_of(name: str) -> ToolSpec:
    source = f"def {name}(x):\n    return x\n"
    return ToolSpec(name=name, version="1.0.0", description=name, source=source,
                    entrypoint=name, parameters_json=b"{}", digest=sha256_hex(source.encode()))


def call_of(name: str, call_id: str = "c1", **arguments: int) -> ToolCall:
    return ToolCall.create(id=call_id, name=name, arguments=arguments, dialect="api")


class TestAnswers:
    def test_an_ok_execution_carries_its_value_as_canonical_json(self):
        """ok_execution holds the canonical bytes of the value and counts them as output."""
        execution = ok_execution({"b": 1, "a": [2]})

        assert ("ok", b'{"a":[2],"b":1}', 15) == (execution.kind, execution.value_json,
                                                  execution.usage.output_bytes)

    def test_a_failed_execution_has_its_kind_and_no_value(self):
        """failed_execution ends in the given tool failure kind, with no value."""
        execution = failed_execution("timeout", "past the deadline")

        assert ("timeout", None, "past the deadline") == (execution.kind, execution.value,
                                                          execution.message)

    def test_computed_calls_the_function_with_the_arguments(self):
        """computed calls function(**arguments) and answers its value."""
        answer = computed(lambda x, y: x - y)

        execution = answer(spec_of("minus"), call_of("minus", x=5, y=3), ResourceLimits())

        assert ("ok", 2) == (execution.kind, execution.value)

    def test_computed_turns_an_exception_into_tool_error_naming_only_its_type(self):
        """An exception is tool_error, as in the sandbox; its text (maybe a value) is not kept."""
        def leak(x):
            raise LookupError(f"secret-{x}")

        execution = computed(leak)(spec_of("leak"), call_of("leak", x=7), ResourceLimits())

        assert ("tool_error", "the tool raised LookupError") == (execution.kind,
                                                                 execution.message)


class TestStubRunner:
    def test_answers_every_tool_with_its_canned_execution_and_records_the_run(self):
        """A canned Execution is every tool's answer; each run is recorded with its parts."""
        runner = StubRunner(ok_execution(42))
        spec, call, limits = spec_of("anything"), call_of("anything"), ResourceLimits(pids=8)

        execution = runner.run(spec, call, limits)

        assert 42 == execution.value
        assert [StubRun(spec, call, limits)] == runner.runs
        assert ([call], [spec]) == (runner.calls, runner.specs)

    def test_a_tool_of_its_own_is_answered_before_the_default(self):
        """Answers in tools win over the default answer, which covers the rest."""
        runner = StubRunner(ok_execution("default"),
                            tools={"special": computed(lambda x: x * 10)})

        values = [runner.run(spec_of(name), call_of(name, x=4), ResourceLimits()).value
                  for name in ("special", "other")]

        assert [40, "default"] == values

    def test_a_tool_it_has_no_answer_for_is_refused_but_recorded(self):
        """Without an answer the run raises SandboxUnavailable; the ask is still recorded."""
        runner = StubRunner(tools={"known": ok_execution(1)})

        with pytest.raises(SandboxUnavailable, match="unknown"):
            runner.run(spec_of("unknown"), call_of("unknown"), ResourceLimits())

        assert ["unknown"] == [call.name for call in runner.calls]

    def test_an_answer_may_raise_as_a_runner_that_cannot_run(self):
        """An answer function's SandboxUnavailable reaches the caller as the runner's own."""
        def unreachable(spec, call, limits):
            raise SandboxUnavailable("Docker Engine did not answer")

        with pytest.raises(SandboxUnavailable, match="Docker Engine"):
            StubRunner(unreachable).run(spec_of("t"), call_of("t"), ResourceLimits())

    def test_reports_the_image_digest_it_is_given(self):
        """The image digest is STUB_IMAGE_DIGEST unless another is given."""
        other = Sha256Hex("cd" * 32)

        assert (STUB_IMAGE_DIGEST, other) == (StubRunner().image_digest,
                                              StubRunner(image_digest=other).image_digest)

    def test_before_sees_each_call_after_it_is_recorded_and_before_it_is_answered(self):
        """before runs between recording and answering, with the call."""
        seen: list[tuple[str, int]] = []

        def answer(spec, call, limits):
            seen.append(("answer", len(runner.calls)))
            return ok_execution(None)

        runner = StubRunner(answer, before=lambda call: seen.append((call.id, len(runner.calls))))
        runner.run(spec_of("t"), call_of("t", "first"), ResourceLimits())

        assert [("first", 1), ("answer", 1)] == seen

    def test_runs_from_many_threads_are_all_recorded(self):
        """Concurrent runs (a plan's parallel steps) lose no record."""
        runner = StubRunner(ok_execution(0))
        spec = spec_of("t")

        def work(number: int) -> None:
            for index in range(50):
                runner.run(spec, call_of("t", f"c{number}-{index}"), ResourceLimits())

        threads = [threading.Thread(target=work, args=(number,)) for number in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert 400 == len({call.id for call in runner.calls})

    def test_is_a_plain_runner_to_the_gateway(self):
        """It has no run_placed: the gateway treats it as a runner that cannot place calls."""
        assert not isinstance(StubRunner(), PlacingToolRunner)


class TestStubPlacingRunner:
    def test_records_the_placement_then_runs_as_run_does(self):
        """run_placed records the run with its placement and answers as run does."""
        runner = StubPlacingRunner(ok_execution(1))
        spec, call, limits = spec_of("fetch"), call_of("fetch"), ResourceLimits()
        placement = Placement(isolation="session", runtime="runsc", secrets=("API_TOKEN",),
                              egress=("127.0.0.1:8080",), principal="alice", session_id="s1")

        execution = runner.run_placed(spec, call, limits, placement)
        runner.run(spec, call_of("fetch", "c2"), limits)

        expected = [StubRun(spec, call, limits, placement)]
        assert (1, expected, ["c1", "c2"]) == (execution.value, runner.placed,
                                               [call.id for call in runner.calls])

    def test_is_a_placing_runner_to_the_gateway(self):
        """The gateway's runtime check sees a PlacingToolRunner."""
        assert isinstance(StubPlacingRunner(), PlacingToolRunner)


class TestStubFailingAuditLog:
    def test_fail_on_fails_only_the_nth_append(self, store):
        """The 2nd append fails, never reaching the store; the 1st and 3rd are the store's."""
        log = StubFailingAuditLog(store, fail_on=2)
        log.append("test.first", {})

        with pytest.raises(AuditUnavailable) as caught:
            log.append("test.second", {})
        third = log.append("test.third", {})

        assert "audit_unavailable" == caught.value.kind
        assert (["test.first", "test.third"], 2) == (kinds(store), third.seq)
        assert (3, ["test.second"]) == (log.appends, log.refused)

    def test_fail_from_fails_the_nth_and_every_later_append(self, store):
        """From the 2nd on every append fails: a disk that stays full."""
        log = StubFailingAuditLog(store, fail_from=2)
        log.append("test.first", {})

        for kind in ("test.second", "test.third"):
            with pytest.raises(AuditUnavailable):
                log.append(kind, {})

        assert (["test.first"], ["test.second", "test.third"]) == (kinds(store), log.refused)

    def test_fail_kinds_fails_every_append_of_those_kinds(self, store):
        """Only the named record kinds fail, wherever they come."""
        log = StubFailingAuditLog(store, fail_kinds={"call.completed"})
        log.append("call.authorized", {"call_id": "c1"})

        with pytest.raises(AuditUnavailable, match="disk is full"):
            log.append("call.completed", {"call_id": "c1"})
        log.append("call.denied", {"call_id": "c2"})

        assert ["call.authorized", "call.denied"] == kinds(store)

    @pytest.mark.parametrize("options", [{}, {"fail_on": 1, "fail_from": 2}, {"fail_on": 0},
                                         {"fail_from": -1}])
    def test_a_failure_it_cannot_count_is_refused(self, store, options):
        """No failure asked for, both counts, or a count below 1 is a ValueError."""
        with pytest.raises(ValueError, match=r"fail|counted"):
            StubFailingAuditLog(store, **options)


class TestKinds:
    def test_kinds_of_a_log_and_of_its_records_agree(self, store, tmp_path):
        """kinds takes a log with records() or the records, read back from the file."""
        for kind in ("call.authorized", "call.completed", "model.turn"):
            store.append(kind, {})

        expected = ["call.authorized", "call.completed", "model.turn"]
        assert (expected, expected) == (kinds(store),
                                        kinds(read_records(tmp_path / "audit.db")))

    def test_an_empty_log_has_no_kinds(self, store):
        """No record, no kind."""
        assert [] == kinds(store)


class TestModule:
    def test_all_is_sorted_and_lists_every_public_name_defined_here(self):
        """__all__ lists what this module defines and nothing else, in ruff's order."""
        defined = {name for name, value in vars(testing).items()
                   if not name.startswith("_")
                   and getattr(value, "__module__", None) == testing.__name__}
        order = sorted(testing.__all__, key=lambda n: (0 if n.isupper() else
                                                       1 if n[0].isupper() else 2, n))

        assert order == list(testing.__all__)
        assert defined | {"STUB_IMAGE_DIGEST", "ToolAnswer"} == set(testing.__all__)

    def test_it_imports_only_the_kernel(self):
        """Every callward import of the module is a kernel module: it is usable by any layer."""
        tree = ast.parse(Path(testing.__file__).read_text())
        imported = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module
                    and node.module.startswith("callward")}

        assert imported <= KERNEL

    def test_importing_it_loads_no_stage_and_no_wiring(self):
        """In a fresh interpreter, importing it loads no policies, sandbox, audit or gateway."""
        code = ("import sys, callward.core.testing; print(sorted(m for m in sys.modules if "
                "m.startswith(('callward.policies', 'callward.sandbox', 'callward.audit', "
                "'callward.core.gateway', 'callward.core.observe', 'docker'))))")
        loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.strip()

        assert "[]" == loaded

    def test_it_says_it_is_for_tests_and_its_example_runs(self):
        """The docstring says the doubles are for tests only, and its example passes."""
        results = doctest.testmod(testing)

        assert "For tests only" in (testing.__doc__ or "")
        assert (0, True) == (results.failed, results.attempted > 0)

    def test_canonical_bytes_are_what_an_ok_execution_holds(self):
        """ok_execution agrees with canonical_bytes, the bytes the audit log hashes."""
        value = {"z": [1, 2.5, "é"], "a": None}

        assert canonical_bytes(value) == ok_execution(value).value_json
