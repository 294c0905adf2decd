"""Runs the in-container runner as gVisor runs it, alone in namespaces of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import callward.sandbox

RUNNER = Path(callward.sandbox.__file__).parent / "image" / "runner.py"


def run_runner_alone(stdin: bytes, task_limit: int, *runner_args: str) -> dict[str, Any]:
    """
    The last result line of ``runner.py`` run as PID 1 of its own PID namespace, whose
    /proc shows only its own tasks, with ``CALLWARD_TASK_LIMIT`` set (gVisor's
    RLIMIT_NPROC is not set here). The session runner wipes /tmp after every call, so
    the runner gets a tmpfs of its own there, in a private mount namespace: never the
    host's /tmp. That tmpfs hides whatever was under /tmp (a clone of this repository,
    its venv), so the runner's source goes in with ``-c`` and the interpreter is the
    venv's base one.
    """
    if os.geteuid() != 0:
        pytest.skip("namespaces of its own need root (unshare --pid --mount-proc)")
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "--propagation", "private",
         "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs /tmp && exec "$@"', "runner",
         os.path.realpath(sys.executable), "-I", "-S", "-c", RUNNER.read_text(), *runner_args],
        input=stdin,
        capture_output=True,
        timeout=30,
        check=False,
        env={"CALLWARD_TASK_LIMIT": str(task_limit), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    result: dict[str, Any] = json.loads(done.stdout.decode().splitlines()[-1])
    return result
