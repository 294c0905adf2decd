"""
What a secret and an egress grant cost per call, against the same call without, interleaved.

Run: .venv/bin/python -m bench.secrets_egress --calls 30

Rows, all on DockerSandbox with the same image and tool (`echo`, which returns its
argument, or for egress fetches a loopback HTTP server through the proxy):

- call / plain: a warm single-use container (the baseline for call rows);
- call / secret: the same with one secret (read from the source, sent in the request,
  redacted from the result);
- call / egress: a warm single-use container started on the internal network with a
  lease for its allowlist, one HTTP GET through the egress proxy;
- call / egress, cold: the same with an empty pool (a container started for the call);
- session / plain and session / secret: one session's container, a forked process per
  call; with a secret PID 1 does not decode the request and the child compiles the tool.
"""

from __future__ import annotations

import argparse
import http.server
import threading
import time
from collections.abc import Callable

from bench._common import configure_logging, print_table, summarize, tool_spec
from callward.core import ResourceLimits, ToolCall
from callward.sandbox import DockerSandbox, EnvironmentSecretSource, PoolConfig, ensure_image

ECHO = "def echo(text):\n    import os\n    return [text, len(os.environ.get('T', ''))]\n"
FETCH = (
    "def fetch(url):\n    import urllib.request\n"
    "    with urllib.request.urlopen(url, timeout=5) as r:\n        return r.status\n"
)


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=30)
    calls = parser.parse_args().calls
    configure_logging()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = f"127.0.0.1:{server.server_address[1]}"
    limits = ResourceLimits()
    source = EnvironmentSecretSource({"CALLWARD_SECRET_T": "cwsecret-0123456789abcdef"})
    echo, fetch = tool_spec("echo", ECHO), tool_spec("fetch", FETCH)

    def call(name: str, arguments: dict[str, object]) -> ToolCall:
        return ToolCall.create(id="c1", name=name, arguments=arguments, dialect="api")

    with DockerSandbox(image=ensure_image(), secrets=source) as sandbox, \
            DockerSandbox(image=ensure_image(), pool=PoolConfig(size=0)) as cold:
        session = {"isolation": "session", "principal": "bench", "session_id": "s"}
        ways: dict[str, Callable[[], object]] = {
            "call / plain": lambda: sandbox.run(echo, call("echo", {"text": "x"}), limits),
            "call / secret": lambda: sandbox.run(echo, call("echo", {"text": "x"}), limits,
                                                 secrets=("T",)),
            "call / egress": lambda: sandbox.run(fetch, call("fetch", {"url": f"http://{target}/"}),
                                                 limits, egress=(target,)),
            "call / egress, cold": lambda: cold.run(
                fetch, call("fetch", {"url": f"http://{target}/"}), limits, egress=(target,)),
            "session / plain": lambda: sandbox.run(echo, call("echo", {"text": "x"}), limits,
                                                   **session),  # type: ignore[arg-type]
            "session / secret": lambda: sandbox.run(echo, call("echo", {"text": "x"}), limits,
                                                    secrets=("T",), **session),  # type: ignore[arg-type]
        }
        for way in ways.values():  # warm-up: pool, session container, egress network
            way()
        sandbox.wait_warm(limits, 2)
        sandbox.wait_warm(limits, 2, egress=(target,))
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(calls):
            for name, way in ways.items():
                if name.startswith("call / plain") or name.startswith("call / secret"):
                    sandbox.wait_warm(limits, 1)
                if name == "call / egress":
                    sandbox.wait_warm(limits, 1, egress=(target,))
                started = time.perf_counter()
                way()
                times[name].append((time.perf_counter() - started) * 1000)
    server.shutdown()
    rows = []
    for name, values in times.items():
        p50, p99, _mean = summarize(values)
        base = summarize(times["session / plain" if name.startswith("session") else
                               "call / plain"])[0]
        rows.append((name, p50, p99, p50 / base))
    print_table(f"secrets and egress, {calls} calls each, interleaved",
                ["way", "p50 ms", "p99 ms", "p50 / plain of its mode"], rows)


if __name__ == "__main__":
    main()
