"""
Added latency of a real `callward mcp serve` process over stdio, per `tools/call`,
against the SDK client calling the same upstream container directly; interleaved,
in one run (run: .venv/bin/python -m bench.mcp_serve_latency --calls 400 --repeats 3).

`bench/mcp_latency.py` measures the face in this process (the SDK client on memory
streams); this one also pays the client's own leg to the gateway process: the SDK's
stdio transport on both ends of one more pipe, and a second JSON-RPC encoding.

- direct: the SDK client runs the upstream's server (`notes`, the integration tests'
  server) with `docker exec -i` in the very container `mcp serve` started for it;
- mcp serve: the SDK client runs `callward mcp serve` as a subprocess (its own home,
  the upstream pinned first with `mcp approve`) and calls `notes__add` through it;
  once with the default `audit.sync: every` (both records fsynced before the call
  goes on), once with `audit.sync: authorized` (`call.completed` fsynced with the
  next call's `call.authorized`, DESIGN's floor of one fsync per authorized batch).

One phase per setting, one after the other, each with its own `mcp serve` process,
upstream container and direct client, so only one gateway runs at a time; within a
phase the two paths alternate call by call. The settings alternate for `--repeats`
rounds, and a second table gives each setting's added p50 over its phases.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker
from anyio.from_thread import start_blocking_portal
from docker.models.containers import Container
from mcp import Client, StdioServerParameters

from bench._common import configure_logging, exec_server, print_table, summarize, write_config

WARMUP = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3,
                        help="phases per audit.sync setting, alternating the settings")
    args = parser.parse_args()
    configure_logging()
    rows = []
    added: dict[str, list[float]] = {"every": [], "authorized": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for sync, phases in added.items():
                root = Path(tmp) / f"{sync}-{repeat}"
                root.mkdir()
                direct, served = _phase(root, sync, args.calls)
                base = summarize(direct)[0]
                label = "every (default)" if sync == "every" else sync
                for name, values in (
                        (f"{repeat + 1}: direct: SDK client -> upstream (docker exec)", direct),
                        (f"{repeat + 1}: mcp serve (stdio subprocess), audit.sync {label}",
                         served)):
                    p50, p99, mean = summarize(values)
                    rows.append((name, p50, p99, mean, p50 - base))
                phases.append(rows[-1][1] - base)
    print_table(f"MCP tools/call through a real mcp serve process, {args.calls} calls each "
                f"way per phase (ms)",
                ["phase: path", "p50", "p99", "mean", "added p50 (vs its phase's direct)"],
                rows)
    print_table("Added p50 per audit.sync setting over its phases (ms)",
                ["audit.sync", "median", "min", "max"],
                [(sync, statistics.median(values), min(values), max(values))
                 for sync, values in added.items()])


def _phase(root: Path, sync: str, calls: int) -> tuple[list[float], list[float]]:
    """Wall ms of each call: direct, and through `mcp serve` with ``audit.sync``."""
    python = sys.executable
    config, home = write_config(root, audit_sync=sync), root / "home"
    env = {**os.environ, "CALLWARD_HOME": str(home)}
    cli = [python, "-m", "callward.core.cli", "--home", str(home), "mcp"]
    subprocess.run([*cli, "approve", "notes", "--config", str(config)], check=True,
                   capture_output=True, env=env)
    serve = StdioServerParameters(command=python, args=[
        *cli[1:], "serve", "--config", str(config), "--principal", "bench"], env=env)
    with start_blocking_portal() as portal, contextlib.ExitStack() as stack:
        face = stack.enter_context(portal.wrap_async_context_manager(
            Client(serve, read_timeout_seconds=120)))
        portal.call(face.call_tool, "notes__add", {"a": 1, "b": 1})
        container = _upstream_container(config)
        direct = stack.enter_context(portal.wrap_async_context_manager(Client(
            exec_server(str(container.id)))))
        ways = ((direct, "add"), (face, "notes__add"))
        samples: tuple[list[float], list[float]] = ([], [])
        for index in range(calls + WARMUP):
            for (client, tool), into in zip(ways, samples, strict=True):
                started = time.perf_counter()
                result = portal.call(client.call_tool, tool, {"a": index, "b": 1})
                if result.is_error:
                    raise SystemExit(f"{tool} failed: {result}")
                if index >= WARMUP:
                    into.append((time.perf_counter() - started) * 1000)
    return samples


def _upstream_container(config: Path) -> Container:
    """The upstream container the `mcp serve` of ``config`` started (not this process's)."""
    for container in docker.from_env().containers.list():
        owner = container.labels.get("callward.pid", "")
        cmdline = Path(f"/proc/{owner}/cmdline")
        if ("notes_server.py" in " ".join(container.attrs["Config"]["Cmd"] or ())
                and owner and owner != str(os.getpid()) and cmdline.exists()
                and str(config).encode() in cmdline.read_bytes()):
            return container
    raise SystemExit(f"no upstream container of the mcp serve of {config}")


if __name__ == "__main__":
    main()
