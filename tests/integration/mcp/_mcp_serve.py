"""`callward mcp serve --transport http` in a subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._net import free_port


@contextlib.contextmanager
def mcp_serve_http(home: Path, *args: str) -> Iterator[str]:
    """
    ``callward --home HOME mcp serve ARGS --transport http --port PORT`` until the port
    answers (the test fails with the server's stderr if it exits first); its MCP URL.
    The server is terminated on the way out.
    """
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "callward.core.cli", "--home", str(home), "mcp", "serve",
         *args, "--transport", "http", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                assert process.stderr is not None
                pytest.fail(f"mcp serve exited: {process.stderr.read().decode()[-2000:]}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(timeout=30)
