"""
Added latency of callward as an MCP gateway, per ``tools/call``, in one process
(run: .venv/bin/python -m bench.mcp_latency).

One upstream MCP server written with the SDK (the integration tests' ``notes``
server) runs in one hardened callward container; every row calls its ``add``
tool in that same container:

- baseline: the SDK client calls the upstream directly (stdio through ``docker
  start --attach``), as a client without callward would;
- gateway: ``Gateway.handle`` (pin gate, policy with schema, signed and fsynced
  ``call.authorized``, signed and fsynced ``call.completed`` (the default
  ``audit.sync: every``), forwarding through the SDK client);
- face on the upstream loop: the SDK client calls callward's MCP server face
  in-process, served on the upstream clients' event loop as ``callward mcp
  serve`` serves stdio (``run_stdio``): the gateway's stages run on that loop,
  the request to the upstream is awaited there, no thread hop;
- face on its own loop: the same face served on another loop, as over HTTP
  (uvicorn's loop): each upstream call hops onto the upstream clients' loop and back;
- governance alone: the gateway row with an instant runner instead of the
  upstream (pin gate, policy, two signed records), to show what forwarding adds.

"added" is each row's p50 minus the baseline's p50. The face rows run the SDK
client in-process (memory streams): they leave out the leg between a client and
a ``callward mcp serve`` process (the SDK's stdio or HTTP transport), which a
client of a real ``mcp serve`` pays on top.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anyio.from_thread import start_blocking_portal
from mcp import Client

from bench._common import (
    NullRunner,
    configure_logging,
    exec_server,
    print_table,
    summarize,
    write_config,
)
from callward.core import ToolCall, canonical_bytes
from callward.core.gateway import Gateway
from callward.core.mcp._gateway import open_upstreams
from callward.core.mcp._server import McpFace


def timed(calls: int, function: Callable[[int], object]) -> tuple[list[float], float]:
    """Wall ms of each call, and this process's CPU ms per call (all its threads)."""
    for index in range(min(20, calls)):
        function(index)
    samples = []
    cpu = time.process_time()
    for index in range(calls):
        started = time.perf_counter()
        function(index)
        samples.append((time.perf_counter() - started) * 1000)
    return samples, (time.process_time() - cpu) * 1000 / calls


def main() -> None:
    # As the CLI does (callward.core.cli), so logging costs what it costs in use.
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    calls = parser.parse_args().calls

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = write_config(root)
        home = root / "home"
        with open_upstreams(config, home=home) as (_gateway, upstreams):
            upstreams.approve("notes")
        with contextlib.ExitStack() as stack:
            gateway, upstreams = stack.enter_context(open_upstreams(config, home=home))
            connection = upstreams.connections["notes"]

            def through_gateway(index: int) -> None:
                call = ToolCall.create(id=f"b{index}", name="notes__add",
                                       arguments={"a": index, "b": 1}, dialect="mcp")
                result = gateway.handle(call, principal="bench")
                if not result.ok:
                    raise SystemExit(f"gateway call failed: {result.kind}")

            portal = stack.enter_context(start_blocking_portal())
            direct_client: Any = stack.enter_context(portal.wrap_async_context_manager(Client(
                exec_server(connection.container_id))))
            face_client: Any = stack.enter_context(portal.wrap_async_context_manager(
                Client(McpFace(gateway, principal="bench").server())))
            upstream_portal = upstreams.portal
            if upstream_portal is None:
                raise SystemExit("no upstream is connected")
            stdio_face_client: Any = stack.enter_context(
                upstream_portal.wrap_async_context_manager(
                    Client(McpFace(gateway, principal="bench").server())))

            def direct(index: int) -> None:
                portal.call(direct_client.call_tool, "add", {"a": index, "b": 1})

            def face(index: int) -> None:
                result = portal.call(face_client.call_tool, "notes__add", {"a": index, "b": 1})
                if result.is_error:
                    raise SystemExit("face call failed")

            def face_on_upstream_loop(index: int) -> None:
                result = upstream_portal.call(stdio_face_client.call_tool, "notes__add",
                                              {"a": index, "b": 1})
                if result.is_error:
                    raise SystemExit("face call failed")

            governance = Gateway(registry=gateway.registry, policy=gateway.policy,
                                 runner=NullRunner(canonical_bytes({"result": 0})),
                                 audit=gateway.audit)

            def governance_only(index: int) -> None:
                call = ToolCall.create(id=f"g{index}", name="notes__add",
                                       arguments={"a": index, "b": 1}, dialect="mcp")
                governance.handle(call, principal="bench")

            rows = []
            samples, cpu = timed(calls, direct)
            baseline = summarize(samples)
            rows.append(("baseline: SDK client -> upstream (same container)", *baseline, cpu,
                         0.0, 0.0))
            for label, function in (("gateway: Gateway.handle -> upstream", through_gateway),
                                    ("face on the upstream loop (as mcp serve, stdio)",
                                     face_on_upstream_loop),
                                    ("face on its own loop (as mcp serve, HTTP)", face),
                                    ("governance alone: Gateway.handle, instant runner",
                                     governance_only)):
                samples, cpu = timed(calls, function)
                p50, p99, mean = summarize(samples)
                rows.append((label, p50, p99, mean, cpu, p50 - baseline[0], cpu - rows[0][4]))
    # CPU is this process's only (not the engine's or the upstream's); on a busy machine
    # it moves far less than wall time, which includes the fsync of call.authorized.
    print_table(f"MCP tools/call latency, {calls} calls each (ms)",
                ("path", "p50", "p99", "mean", "CPU/call", "added p50", "added CPU"), rows)


if __name__ == "__main__":
    main()
