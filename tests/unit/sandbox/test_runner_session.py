"""
The runner's session mode (one forked process per call), run in this process on a
temporary directory instead of the container's /tmp: it answers every request as the
single-call runner does, compiling each tool's source once per session.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
from runner_alone import run_runner_alone

import callward.sandbox
from tests._modules import module_from_file

RUNNER = Path(callward.sandbox.__file__).parent / "image" / "runner.py"


@pytest.fixture(name="runner")
def _runner() -> ModuleType:
    """A fresh copy of the runner module (its compile cache empty)."""
    return module_from_file("callward_runner_under_test", RUNNER)


def request(
    source: str, entrypoint: str = "tool", wall_seconds: float = 5, **arguments: object
) -> bytes:
    body = {"source": textwrap.dedent(source), "entrypoint": entrypoint,
            "arguments": arguments, "wall_seconds": wall_seconds}
    return json.dumps(body, separators=(",", ":")).encode()


def single_call_result(runner: ModuleType, data: bytes) -> dict[str, object]:
    """What the one-call runner (``main``) answers for the same request bytes."""
    try:
        source, entrypoint, arguments = runner.parse_request(data)
    except (ValueError, TypeError) as exc:
        return dict(runner.failure("tool_error", "BadRequest", str(exc)))
    return dict(runner.run_tool(source, entrypoint, arguments))


CASES = {
    "value": request("def tool(x):\n    return x * x\n", x=7),
    "exception": request("def tool():\n    raise ValueError('no such city')\n"),
    "syntax error": request("def tool(:\n"),
    "module raises": request("raise KeyError('at import')\ndef tool():\n    return 1\n"),
    "no entrypoint": request("def other():\n    return 1\n"),
    "not json": b"{not json",
    "not an object": b"[1, 2]",
    "no source": json.dumps({"entrypoint": "tool", "arguments": {}}).encode(),
    "arguments not an object": json.dumps(
        {"source": "def tool():\n    return 1\n", "entrypoint": "tool", "arguments": [1]}
    ).encode(),
    "not utf-8": b'{"source": "\xff"}',
}


class TestSessionCall:
    @pytest.mark.parametrize("name", sorted(CASES))
    def test_same_answer_as_the_single_call_runner(self, runner, tmp_path, name):
        """Each request gets exactly the result the one-call runner gives it."""
        data = CASES[name]

        assert single_call_result(runner, data) == runner.run_session_call(data, str(tmp_path))

    def test_source_is_compiled_once_and_module_state_is_fresh(self, runner, tmp_path):
        """The code is compiled once per session; each call still runs the module anew."""
        source = """
            calls = []
            def tool():
                calls.append(1)
                return len(calls)
        """

        results = [runner.run_session_call(request(source), str(tmp_path)) for _ in range(3)]

        assert [{"ok": True, "value": 1}] * 3 == results
        assert 1 == len(runner._COMPILED)

    def test_files_do_not_survive_into_the_next_call(self, runner, tmp_path):
        """What a call writes in the session's tmp directory is gone for the next call."""
        source = f"""
            import os
            def tool():
                before = sorted(os.listdir({str(tmp_path)!r}))
                with open(os.path.join({str(tmp_path)!r}, "left"), "w") as f:
                    f.write("x")
                return before
        """

        results = [runner.run_session_call(request(source), str(tmp_path)) for _ in range(2)]

        assert [{"ok": True, "value": []}] * 2 == results

    def test_a_call_past_its_wall_seconds_is_stopped(self, runner, tmp_path):
        """A tool that outlives wall_seconds is killed and reported as the runner's Timeout."""
        data = request("import time\ndef tool():\n    time.sleep(60)\n", wall_seconds=0.2)

        result = runner.run_session_call(data, str(tmp_path))

        assert ("tool_error", "Timeout") == (result["kind"], result["error_type"])

    def test_a_child_that_exits_without_a_result(self, runner, tmp_path):
        """A tool that ends its own process leaves no result: NoResult, and the next call runs."""
        exits = request("import os\ndef tool():\n    os._exit(3)\n")
        fine = request("def tool():\n    return 'next'\n")

        first = runner.run_session_call(exits, str(tmp_path))
        second = runner.run_session_call(fine, str(tmp_path))

        assert ("tool_error", "NoResult") == (first["kind"], first["error_type"])
        assert {"ok": True, "value": "next"} == second

    def test_a_child_that_closes_the_pipe_and_lingers(self, runner, tmp_path):
        """A child that closes every descriptor and keeps running is stopped at the deadline."""
        data = request(
            "import os, time\ndef tool():\n    os.closerange(0, 1024)\n    time.sleep(60)\n",
            wall_seconds=0.3,
        )

        result = runner.run_session_call(data, str(tmp_path))

        assert ("tool_error", "Timeout") == (result["kind"], result["error_type"])


class TestSessionTaskWatch:
    def test_a_call_that_keeps_forking_past_its_limit_is_pids_limit(self):
        """A tool holding more tasks than it may is stopped as pids_limit, not at the deadline."""
        data = request(
            """
            import os, time
            def tool():
                for _ in range(4):
                    if os.fork() == 0:
                        time.sleep(60)
                        os._exit(0)
                time.sleep(60)
            """,
            wall_seconds=20,
        )

        result = run_runner_alone(data + b"\n", 3, "--session")

        assert ("pids_limit", "TaskLimit") == (result["kind"], result["error_type"])

    def test_count_tasks_counts_every_process_and_the_tools_threads(self, runner, tmp_path):
        """Every process counts once; the tool's process counts each of its threads."""
        for pid, threads in (("1", 1), ("7", 3), ("42", 2)):
            for tid in range(threads):
                (tmp_path / pid / "task" / f"{pid}{tid}").mkdir(parents=True)
        (tmp_path / "self").mkdir()

        expected = (5, 4, 3)
        assert expected == (runner.count_tasks(str(tmp_path), threads_of=7),
                            runner.count_tasks(str(tmp_path), threads_of=42),
                            runner.count_tasks(str(tmp_path), threads_of=9))

    @pytest.mark.parametrize(
        ("value", "expected"),
        [("16", 16), ("", None), ("0", None), ("-3", None), ("x", None), ("99999999", None)],
    )
    def test_task_limit_is_a_positive_count_or_none(self, runner, value, expected):
        """Only a positive count turns the watch on; anything else leaves it off."""
        assert runner.task_limit({"CALLWARD_TASK_LIMIT": value}) == expected


class TestCallUser:
    @pytest.mark.parametrize(
        ("value", "expected"), [("65534:65534", (65534, 65534)), ("1000:100", (1000, 100))]
    )
    def test_two_non_root_ids_name_the_call_user(self, runner, value, expected):
        """CALLWARD_CALL_USER is uid:gid, both ids other than root's."""
        assert expected == runner.call_user({"CALLWARD_CALL_USER": value})

    @pytest.mark.parametrize(
        "value", ["0:0", "65534:0", "0:65534", "nobody", "", "65534:", "-1:-1"]
    )
    def test_anything_else_is_refused(self, runner, value):
        """Root, a name, a half or a negative id is refused: a runner never runs a call as root."""
        with pytest.raises(ValueError, match="non-root"):
            runner.call_user({"CALLWARD_CALL_USER": value})

    def test_unset_means_no_call_user(self, runner):
        """Without the variable (on the host, in tests) there is no user to change to."""
        assert runner.call_user({}) is None
