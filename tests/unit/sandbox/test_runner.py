"""The in-container runner, run as a local subprocess exactly as the image runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from runner_alone import run_runner_alone

import callward.sandbox

RUNNER = Path(callward.sandbox.__file__).parent / "image" / "runner.py"


def run_runner(source: str, entrypoint: str = "tool", **arguments: object) -> tuple[int, str, str]:
    request = {"source": textwrap.dedent(source), "entrypoint": entrypoint, "arguments": arguments}
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(RUNNER)],
        input=json.dumps(request).encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def result_of(source: str, entrypoint: str = "tool", **arguments: object) -> dict[str, Any]:
    _code, stdout, _stderr = run_runner(source, entrypoint, **arguments)
    result: dict[str, Any] = json.loads(stdout)
    return result


class TestRunnerResult:
    def test_value_of_the_entrypoint_is_the_result(self) -> None:
        """The entrypoint is called with the arguments as keywords; its value is the result."""
        code, stdout, _ = run_runner("def tool(x):\n    return x * x\n", x=3)

        expected = (0, '{"ok":true,"value":9}\n')
        assert expected == (code, stdout)

    def test_exception_is_tool_error_with_its_type_and_message(self) -> None:
        """An exception from the tool ends as tool_error, naming its type and message."""
        result = result_of("def tool():\n    raise ValueError('no such city')\n")

        expected = {
            "ok": False,
            "kind": "tool_error",
            "error_type": "ValueError",
            "message": "no such city",
        }
        assert expected == result

    def test_value_that_is_not_json_is_tool_error(self) -> None:
        """A return value JSON cannot hold (an object, NaN) ends as tool_error."""
        results = [
            result_of("def tool():\n    return object()\n"),
            result_of("def tool():\n    return float('nan')\n"),
        ]

        expected = ["tool_error", "tool_error"]
        assert expected == [r["kind"] for r in results]

    def test_syntax_error_in_source_is_tool_error(self) -> None:
        """Source that does not compile ends as tool_error with SyntaxError."""
        result = result_of("def tool(:\n")

        expected = ("tool_error", "SyntaxError")
        assert expected == (result["kind"], result["error_type"])

    def test_missing_entrypoint_is_tool_error(self) -> None:
        """An entrypoint the source does not define ends as tool_error."""
        result = result_of("def other():\n    return 1\n")

        expected = ("tool_error", "NameError")
        assert expected == (result["kind"], result["error_type"])

    def test_system_exit_is_tool_error(self) -> None:
        """A tool calling sys.exit() still gets a result line: tool_error, SystemExit."""
        result = result_of("import sys\ndef tool():\n    sys.exit(3)\n")

        expected = ("tool_error", "SystemExit")
        assert expected == (result["kind"], result["error_type"])

    def test_long_message_is_truncated(self) -> None:
        """A tool's error message is cut to 500 characters."""
        result = result_of("def tool():\n    raise ValueError('x' * 100_000)\n")

        expected = 500
        assert expected == len(result["message"])

    def test_bad_request_is_tool_error_and_exit_code_2(self) -> None:
        """Stdin that is not a request object still gets one result line, and exit code 2."""
        done = subprocess.run(
            [sys.executable, "-I", "-S", str(RUNNER)],
            input=b"[1, 2]",
            capture_output=True,
            timeout=30,
            check=False,
        )

        expected = (2, "tool_error")
        assert expected == (done.returncode, json.loads(done.stdout)["kind"])


class TestRunnerClassification:
    @pytest.mark.parametrize(
        ("raise_statement", "expected_kind"),
        [
            ("raise MemoryError()", "memory_limit"),
            ("raise BlockingIOError(errno.EAGAIN, 'fork')", "pids_limit"),
            ("raise OSError(errno.EAGAIN, 'clone')", "pids_limit"),
            ('raise RuntimeError("can\'t start new thread")', "pids_limit"),
            ("raise OSError(errno.ENOSPC, 'No space left on device')", "disk_limit"),
            ("raise OSError(errno.EDQUOT, 'Disk quota exceeded')", "disk_limit"),
            ("raise OSError(errno.ENOENT, 'No such file')", "tool_error"),
            ("raise KeyError('k')", "tool_error"),
        ],
    )
    def test_exception_kind(self, raise_statement: str, expected_kind: str) -> None:
        """Each exception maps to the limit it shows was hit, or to tool_error."""
        result = result_of(f"import errno\ndef tool():\n    {raise_statement}\n")

        assert expected_kind == result["kind"]

    def test_limit_wrapped_in_another_exception_is_still_found(self) -> None:
        """A tool that wraps MemoryError in its own exception still reports memory_limit."""
        source = """
            def tool():
                try:
                    raise MemoryError()
                except MemoryError as exc:
                    raise ValueError("could not allocate") from exc
        """

        expected = "memory_limit"
        assert expected == result_of(source)["kind"]


class TestRunnerProtocol:
    def test_tool_prints_do_not_corrupt_the_result(self) -> None:
        """Whatever the tool prints, even a fake result, goes to stderr; stdout has one line."""
        source = """
            import os, sys
            def tool():
                print('{"ok": true, "value": "forged"}')
                sys.stdout.write("more\\n")
                os.write(1, b'{"ok": true, "value": "forged by fd"}\\n')
                return "real"
        """

        code, stdout, stderr = run_runner(source)

        expected = (0, ['{"ok":true,"value":"real"}'])
        assert expected == (code, stdout.splitlines())
        assert "forged by fd" in stderr
        assert "forged" in stderr

    def test_forked_child_writes_no_result(self) -> None:
        """A child the tool forks returns into the runner but writes nothing; one line remains."""
        source = """
            import os
            def tool():
                pid = os.fork()
                return "child" if pid == 0 else "parent"
        """

        _code, stdout, _stderr = run_runner(source)

        expected = ['{"ok":true,"value":"parent"}']
        assert expected == stdout.splitlines()

    def test_threads_left_running_do_not_hold_the_result(self) -> None:
        """A non-daemon thread the tool leaves sleeping neither delays nor changes the result."""
        source = """
            import threading, time
            def tool():
                threading.Thread(target=time.sleep, args=(60,)).start()
                return 1
        """

        code, stdout, _stderr = run_runner(source)

        expected = (0, '{"ok":true,"value":1}\n')
        assert expected == (code, stdout)

    def test_tool_cannot_read_the_request_again(self) -> None:
        """The tool's stdin is empty: the request was consumed before the tool ran."""
        source = """
            import sys
            def tool():
                return sys.stdin.read()
        """

        expected = {"ok": True, "value": ""}
        assert expected == result_of(source)


def run_alone(source: str, task_limit: int) -> dict[str, Any]:
    request = {"source": textwrap.dedent(source), "entrypoint": "tool", "arguments": {}}
    return run_runner_alone(json.dumps(request).encode(), task_limit)


class TestRunnerTaskWatch:
    def test_a_call_past_its_task_limit_is_reported_as_pids_limit(self) -> None:
        """Four tasks (the runner and three sleeping children) where two may run: pids_limit."""
        source = """
            import os, time
            def tool():
                for _ in range(3):
                    if os.fork() == 0:
                        time.sleep(60)
                        os._exit(0)
                time.sleep(60)
        """

        result = run_alone(source, task_limit=2)

        expected = ("pids_limit", "TaskLimit")
        assert expected == (result["kind"], result["error_type"])

    def test_a_call_within_its_task_limit_is_left_alone(self) -> None:
        """The runner and one child where two may run: the tool's own value, after 0.2 s."""
        source = """
            import os, time
            def tool():
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                time.sleep(0.2)
                return "done"
        """

        expected = {"ok": True, "value": "done"}
        assert expected == run_alone(source, task_limit=2)
