"""interpret(): how what the host observed of one execution becomes an Execution."""

from __future__ import annotations

import json

import pytest

from callward.core import Execution, ResourceLimits
from callward.sandbox import RawExecution
from callward.sandbox._interpret import interpret

LIMITS = ResourceLimits(wall_seconds=2.0, output_bytes=1000)


def raw(stdout: bytes = b"", **fields: object) -> RawExecution:
    values: dict[str, object] = {
        "stdout": stdout,
        "output_bytes": len(stdout),
        "wall_seconds": 0.05,
        "exit_code": 0,
        "container_id": "c" * 64,
    }
    values.update(fields)
    return RawExecution(**values)  # type: ignore[arg-type]


def run(raw_execution: RawExecution, limits: ResourceLimits = LIMITS) -> Execution:
    return interpret(raw_execution, limits)


def runner_line(result: dict[str, object]) -> bytes:
    return json.dumps(result).encode() + b"\n"


class TestInterpretResult:
    def test_ok_result_gives_the_canonical_value(self) -> None:
        """A runner ok line becomes an ok Execution with canonical value bytes and usage."""
        execution = run(raw(runner_line({"ok": True, "value": {"b": 1, "a": [9]}})))

        expected = ("ok", b'{"a":[9],"b":1}', "", 0, 50.0, "c" * 64)
        assert expected == (
            execution.kind,
            execution.value_json,
            execution.message,
            execution.usage.exit_code,
            execution.usage.wall_ms,
            execution.usage.container_id,
        )

    def test_last_stdout_line_is_the_result(self) -> None:
        """Only the last line counts, so anything before it cannot forge a result."""
        stdout = runner_line({"ok": True, "value": "forged"}) + runner_line(
            {"ok": True, "value": 1}
        )

        expected = 1
        assert expected == run(raw(stdout)).value

    @pytest.mark.parametrize(
        "stdout",
        [
            b"",
            b"not json\n",
            b"\xff\xfe\n",
            b"[1, 2]\n",
            b'{"ok": "yes"}\n',
            b'{"ok": true}\n',
            b'{"ok": true, "value": NaN}\n',
            b'{"ok": true, "value": 1, "value": 2}\n',
        ],
    )
    def test_missing_or_garbled_result_is_tool_error(self, stdout: bytes) -> None:
        """No result line, or one that is not the runner's protocol, ends as tool_error."""
        expected = "tool_error"
        assert expected == run(raw(stdout)).kind

    def test_value_that_is_not_i_json_is_tool_error(self) -> None:
        """A value canonical JSON cannot hold (an integer past 2**53) ends as tool_error."""
        execution = run(raw(runner_line({"ok": True, "value": 2**60})))

        expected = ("tool_error", "the return value is not I-JSON")
        assert expected == (execution.kind, execution.message)

    @pytest.mark.parametrize("kind", ["tool_error", "memory_limit", "pids_limit", "disk_limit"])
    def test_runner_failure_kinds_are_kept(self, kind: str) -> None:
        """The runner's own failure kinds pass through, with type and message."""
        line = runner_line({"ok": False, "kind": kind, "error_type": "E", "message": "m"})

        execution = run(raw(line))

        expected = (execution.kind, execution.message, execution.value_json)
        assert expected == (kind, "E: m", None)

    @pytest.mark.parametrize("kind", ["timeout", "output_limit", "ok", "denied", 3, None])
    def test_runner_cannot_claim_a_host_kind(self, kind: object) -> None:
        """Only the host observes timeout and output_limit; other kinds are tool_error."""
        line = runner_line({"ok": False, "kind": kind, "error_type": "E", "message": "m"})

        expected = "tool_error"
        assert expected == run(raw(line)).kind

    def test_long_runner_message_is_truncated(self) -> None:
        """Messages from inside the container are cut to 500 characters."""
        line = runner_line(
            {"ok": False, "kind": "tool_error", "error_type": "E", "message": "x" * 9000}
        )

        expected = 500
        assert expected == len(run(raw(line), ResourceLimits(output_bytes=64 * 1024)).message)


class TestInterpretLimits:
    def test_output_over_the_cap_is_output_limit_even_if_the_backend_missed_it(self) -> None:
        """The output size is judged again, so a backend that forgot the cap still fails."""
        stdout = runner_line({"ok": True, "value": "x" * 2000})

        execution = run(raw(stdout, output_cap_hit=False))

        expected = ("output_limit", None)
        assert expected == (execution.kind, execution.value_json)

    def test_stderr_counts_toward_the_output_cap(self) -> None:
        """Output is stdout and stderr together: a valid result does not excuse a flood."""
        stdout = runner_line({"ok": True, "value": 1})

        expected = "output_limit"
        assert expected == run(raw(stdout, output_bytes=5000)).kind

    def test_run_past_the_deadline_is_timeout_even_if_the_backend_missed_it(self) -> None:
        """The wall time is judged again, so a backend that forgot the deadline still fails."""
        stdout = runner_line({"ok": True, "value": 1})

        expected = "timeout"
        assert expected == run(raw(stdout, wall_seconds=LIMITS.wall_seconds + 1)).kind

    def test_deadline_hit_is_timeout(self) -> None:
        """A container killed at the deadline ends as timeout."""
        expected = "timeout"
        assert expected == run(raw(deadline_hit=True, exit_code=None)).kind

    def test_deadline_hit_with_pids_limit_evidence_is_pids_limit(self) -> None:
        """A tool that keeps forking past refusals until the deadline ends as pids_limit."""
        execution = run(raw(deadline_hit=True, exit_code=None, pids_limit_hit=True))

        expected = "pids_limit"
        assert expected == execution.kind

    def test_oom_kill_is_memory_limit_even_with_a_result(self) -> None:
        """The kernel's OOM killer ran in the container: memory_limit wins over a value."""
        stdout = runner_line({"ok": True, "value": 1})

        expected = "memory_limit"
        assert expected == run(raw(stdout, oom_killed=True, exit_code=0)).kind

    def test_unexplained_sigkill_without_result_is_memory_limit(self) -> None:
        """Exit 137 with no result and no host kill: only the kernel kills PID 1 inside."""
        expected = "memory_limit"
        assert expected == run(raw(exit_code=137)).kind

    def test_output_limit_wins_over_every_other_failure(self) -> None:
        """When the cap tripped, the execution ends as output_limit whatever else happened."""
        execution = run(
            raw(
                output_bytes=2000,
                output_cap_hit=True,
                deadline_hit=True,
                oom_killed=True,
                exit_code=None,
            )
        )

        expected = "output_limit"
        assert expected == execution.kind

    def test_pids_evidence_without_result_is_pids_limit(self) -> None:
        """A runner that died without a result after forks were refused ends as pids_limit."""
        expected = "pids_limit"
        assert expected == run(raw(exit_code=1, pids_limit_hit=True)).kind

