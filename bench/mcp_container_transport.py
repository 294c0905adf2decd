"""
How the SDK client reaches an MCP server in a service container: over a `docker`
process's pipes, as any stdio client must, or over the Engine's attach socket, as the
gateway does (`container_stdio`); interleaved, in one run (run: .venv/bin/python -m
bench.mcp_container_transport --calls 1000).

Two containers of the same service image run the integration tests' `notes` server;
the SDK `Client` calls `add` on each, one way each:

- `docker exec -i` into the first (the baseline of `bench/mcp_serve_latency.py`);
- `docker start --attach --interactive` of the second (what the gateway ran before);
- the attach socket of a third, read and written on the client's loop.

This is the part of `mcp_serve_latency.py`'s margin that is a cheaper path to the
container rather than less work in the gateway.
"""

from __future__ import annotations

import argparse
import contextlib
import time

from anyio.from_thread import start_blocking_portal
from mcp import Client, StdioServerParameters

from bench._common import (
    SERVER,
    SERVER_COMMAND,
    configure_logging,
    exec_server,
    print_table,
    summarize,
)
from callward.core import ResourceLimits
from callward.core.mcp._container_stdio import container_stdio
from callward.sandbox import ServiceImageSpec, StdioService, ensure_service_image

WARMUP = 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1000)
    calls = parser.parse_args().calls
    configure_logging()
    image = ensure_service_image(ServiceImageSpec(files={"notes_server.py": SERVER},
                                                  distributions=("mcp", "cryptography")))
    limits = ResourceLimits(memory_bytes=256 << 20, pids=64, open_files=256, wall_seconds=20)
    with start_blocking_portal() as portal, contextlib.ExitStack() as stack:
        services = [stack.enter_context(StdioService(image_id=image, command=SERVER_COMMAND,
                                                     limits=limits)) for _ in range(3)]
        execed, started, attached = services
        started_command = started.stdio_command()
        # The exec'd server needs its container running: its own server is its command.
        execed.attach()
        ways = {
            "SDK client over `docker exec -i` (baseline)": exec_server(execed.container_id),
            "SDK client over `docker start --attach -i`": StdioServerParameters(
                command=started_command[0], args=list(started_command[1:])),
            "SDK client over the attach socket (container_stdio)": container_stdio(
                attached, server="notes"),
        }
        clients = {name: stack.enter_context(portal.wrap_async_context_manager(
            Client(target, read_timeout_seconds=60))) for name, target in ways.items()}
        samples: dict[str, list[float]] = {name: [] for name in clients}
        for index in range(calls + WARMUP):
            for name, client in clients.items():
                begun = time.perf_counter()
                result = portal.call(client.call_tool, "add", {"a": index, "b": 1})
                if result.is_error:
                    raise SystemExit(f"{name} failed: {result}")
                if index >= WARMUP:
                    samples[name].append((time.perf_counter() - begun) * 1000)
    base = summarize(next(iter(samples.values())))[0]
    rows = []
    for name, values in samples.items():
        p50, p99, mean = summarize(values)
        rows.append((name, p50, p99, mean, p50 - base))
    print_table(f"MCP tools/call to a server in a service container, {calls} calls each (ms)",
                ["way", "p50", "p99", "mean", "vs baseline p50"], rows)


if __name__ == "__main__":
    main()
