"""
One tool call (`square`) in isolation, every way this machine can run it, interleaved
in one process: p50/p99 latency, throughput at concurrency 1/2/4/8, CPU per call, and
the ratio to `docker run --rm`.

Run: .venv/bin/python -m bench.sandbox_latency --calls 40

Ways, all on the same image, runner and request (RFC 8785 JSON on stdin):

- host subprocess: the runner as a plain host process (no isolation at all);
- docker run --rm: a fresh container per call with callward's hardening as CLI flags;
- docker exec: `docker exec -i` into one long-lived hardened container (not single use);
- callward call/runc and call/runsc: DockerSandbox with a warm pool (single use);
- callward session/runc: one container per agent session, a forked process per call.

"CPU ms/call" is the whole machine's busy CPU time (every process: dockerd,
containerd, runc or gVisor, this one) over the calls, from /proc/stat: other work
on the machine during the run shows up in it. Latency of the callward rows is per
call with the pool's capacity available (every pool refilled before each timed
call, so no replacement container is starting while one is timed; a second table
times the call mode rows again SETTLE_SECONDS after the refill, once the replacements'
runners have booted, which gVisor's take longer to do);
throughput rows run back to back, so they include cold starts once the pool's
refills cannot keep up. Peers (llm-sandbox, smolagents) are measured by
bench/sandbox_peers.py in a separate environment, never as project dependencies.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from bench._common import (
    POOL_SIZE,
    Ways,
    busy_jiffies,
    configure_logging,
    print_table,
    summarize,
)
from callward.sandbox import ensure_image

SETTLE_SECONDS = 0.3


def _process_ticks(names: tuple[bytes, ...]) -> int:
    """utime + stime, in clock ticks, of every process whose command line names one of these."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")[0]
            fields = (entry / "stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
        except OSError:
            continue
        if any(command.endswith(name) for name in names):
            total += int(fields[11]) + int(fields[12])
    return total


def _container_cpu_seconds(container_ids: list[str]) -> float | None:
    """CPU time of these containers from their cgroups (v1 cpuacct or v2), None if unreadable."""
    total = 0.0
    for container_id in container_ids:
        v1 = Path(f"/sys/fs/cgroup/cpuacct/docker/{container_id}/cpuacct.usage")
        v2 = Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cpu.stat")
        try:
            total += int(v1.read_text(encoding="ascii")) / 1e9
        except OSError:
            try:
                usage = v2.read_text(encoding="ascii").split()[1]
            except (OSError, IndexError):
                return None
            total += int(usage) / 1e6
    return total


def session_cpu_split(ways: Ways, concurrency: int, count: int) -> list[object]:
    """Session mode at ``concurrency``: calls/s and CPU ms per call, process by process."""
    function = ways.session("runc")
    with concurrent.futures.ThreadPoolExecutor(concurrency) as executor:
        list(executor.map(function, range(concurrency * 4)))  # every session started
    sandbox = ways.sandboxes["runc"]
    containers = [session.live.container_id for session in sandbox.backend._sessions.values()]
    engine = (b"dockerd", b"containerd", b"containerd-shim-runc-v2")
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    mine, engine_before = time.process_time(), _process_ticks(engine)
    inside = _container_cpu_seconds(containers)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as executor:
        list(executor.map(function, range(count)))
    elapsed = time.perf_counter() - start
    inside_after = _container_cpu_seconds(containers)
    in_containers = (f"{(inside_after - inside) * 1000 / count:.2f}"
                     if inside is not None and inside_after is not None else "n/a")
    return [f"c={concurrency}", f"{count / elapsed:.1f}",
            f"{(time.process_time() - mine) * 1000 / count:.2f}",
            f"{(_process_ticks(engine) - engine_before) * tick_ms / count:.2f}", in_containers]


def throughput(ways: Ways, runtime: str | None, function: Callable[[int], None],
               count: int, *, start_sessions: bool = False) -> list[str]:
    """
    Calls/s and machine CPU ms per call at concurrency 1, 2, 4 and 8; with
    ``start_sessions``, each worker's session is started before the clock runs.
    """
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    cells = []
    for concurrency in (1, 2, 4, 8):
        if runtime is not None:
            ways.refill(runtime)
        with concurrent.futures.ThreadPoolExecutor(concurrency) as executor:
            if start_sessions:
                list(executor.map(function, range(concurrency * 4)))
            jiffies, start = busy_jiffies(), time.perf_counter()
            list(executor.map(function, range(count)))
            elapsed = time.perf_counter() - start
        cpu_ms = (busy_jiffies() - jiffies) * tick_ms / count
        cells.append(f"{count / elapsed:.1f}/s ({cpu_ms:.1f} ms CPU)")
    return cells


def print_settled(ways: Ways, pooled: dict[str, str], calls: int) -> None:
    """
    The call mode rows again once the replacements have booted: a pool's "ready"
    container is one started, and its runner's Python may still be starting on the
    same CPUs (gVisor's takes longer).
    """
    settled: dict[str, list[float]] = {name: [] for name in pooled}
    for number in range(calls):
        for name, runtime in pooled.items():
            ways.refill_every(pooled.values())
            time.sleep(SETTLE_SECONDS)
            start = time.perf_counter()
            ways.callward(runtime)(number)
            settled[name].append((time.perf_counter() - start) * 1000)
    first_p50 = summarize(settled[next(iter(settled))])[0]
    print_table(
        f"Latency of one call with the pool settled ({SETTLE_SECONDS} s after the refill), "
        f"{calls} interleaved rounds",
        ["way", "p50 ms", "p99 ms", "x the first row"],
        [(name, *summarize(values)[:2], summarize(values)[0] / first_p50)
         for name, values in settled.items()],
    )


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=40, help="latency samples per way")
    parser.add_argument("--throughput-calls", type=int, default=32,
                        help="calls per concurrency level (docker run: a quarter)")
    parser.add_argument("--only", default="",
                        help="run only the ways whose name contains this text, e.g. session")
    args = parser.parse_args()

    image = ensure_image()
    ways = Ways(image.tag, image.image_id)
    try:
        plain: dict[str, Callable[[int], None]] = {
            "host subprocess (no isolation)": ways.host,
            "docker run --rm (hardened)": ways.docker_run,
            "docker exec -i (warm, reused)": ways.docker_exec,
            "callward session / runc (fork per call)": ways.session("runc"),
        }
        pooled = {"callward call / runc (warm pool)": "runc",
                  "callward call / runsc (warm pool)": "runsc"}
        plain = {name: way for name, way in plain.items() if args.only in name}
        pooled = {name: runtime for name, runtime in pooled.items() if args.only in name}
        names = [*plain, *pooled]
        for runtime in pooled.values():
            ways.refill(runtime)
        samples: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, int] = dict.fromkeys(names, 0)
        for number in range(args.calls):  # interleaved: one of each per round
            for name in names:
                runtime = pooled.get(name)
                if runtime is not None:
                    ways.refill_every(pooled.values())
                    function = ways.callward(runtime)
                else:
                    function = plain[name]
                jiffies, start = busy_jiffies(), time.perf_counter()
                function(number)
                samples[name].append((time.perf_counter() - start) * 1000)
                cpu[name] += busy_jiffies() - jiffies

        tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
        docker_run = samples.get("docker run --rm (hardened)")
        base_p50 = summarize(docker_run)[0] if docker_run else float("nan")
        rows = []
        for name in names:
            p50, p99, _ = summarize(samples[name])
            rows.append((name, p50, p99, cpu[name] * tick_ms / args.calls, base_p50 / p50))
        print_table(
            f"Latency of one call, {args.calls} interleaved rounds",
            ["way", "p50 ms", "p99 ms", "CPU ms/call", "x faster than docker run"],
            rows,
        )

        if pooled:
            print_settled(ways, pooled, args.calls)

        throughput_rows = []
        for name in names:
            runtime = pooled.get(name)
            function = ways.callward(runtime) if runtime else plain[name]
            count = args.throughput_calls // (4 if "docker run" in name else 1)
            count *= 8 if "session" in name else 1
            throughput_rows.append([name, *throughput(ways, runtime, function, count,
                                                      start_sessions="session" in name)])
        print_table(
            f"Throughput, calls/s (CPU ms per call), {args.throughput_calls} calls per level "
            "(docker run: a quarter, session: 8x, its sessions started first); callward starts "
            "each level with a full pool",
            ["way", "c=1", "c=2", "c=4", "c=8"],
            throughput_rows,
        )
        if any("session" in name for name in names):
            print_table(
                f"Session mode, runc, {args.throughput_calls * 16} calls per level: CPU ms per "
                "call by process (a busy machine moves calls/s far more than these)",
                ["concurrency", "calls/s", "this process", "dockerd + containerd + shims",
                 "session containers"],
                [session_cpu_split(ways, c, args.throughput_calls * 16) for c in (1, 4)],
            )
        print(json.dumps({"pool_size": POOL_SIZE, "cpus": os.cpu_count()}))
    finally:
        ways.close()


if __name__ == "__main__":
    main()
