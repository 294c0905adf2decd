"""
One tool call (`square`) in isolation, every way this machine can run it, interleaved
in one process: p50/p99 latency, throughput at concurrency 1/2/4/8, CPU per call, and
the ratio to `docker run --rm`.

Run: .venv/bin/python bench/sandbox_latency.py --calls 40

Ways, all on the same image, runner and request (RFC 8785 JSON on stdin):

- host subprocess: the runner as a plain host process (no isolation at all);
- docker run --rm: a fresh container per call with callward's hardening as CLI flags;
- docker exec: `docker exec -i` into one long-lived hardened container (not single use);
- callward call/runc and call/runsc: DockerSandbox with a warm pool (single use);
- callward session/runc: one container per agent session, a forked process per call.

"CPU ms/call" is the whole machine's busy CPU time (every process: dockerd,
containerd, runc or gVisor, this one) over the calls, from /proc/stat: other work
on the machine during the run shows up in it. Latency of the callward rows is per
call with the pool's capacity available (the pool refilled before each timed call);
throughput rows run back to back, so they include cold starts once the pool's
refills cannot keep up. Peers (llm-sandbox, smolagents) are measured by
bench/sandbox_peers.py in a separate environment, never as project dependencies.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import configure_logging, print_table, summarize

from callward.core import ResourceLimits, ToolCall, ToolSpec, canonical_bytes, sha256_hex
from callward.sandbox import DockerSandbox, PoolConfig, ensure_image

RUNNER = Path(__file__).resolve().parents[1] / "sandbox" / "image" / "runner.py"
SOURCE = "def square(x):\n    return x * x\n"
SPEC = ToolSpec(
    name="square", version="1.0.0", description="x squared", source=SOURCE,
    entrypoint="square", parameters_json=canonical_bytes({"type": "object"}),
    digest=sha256_hex(SOURCE.encode()),
)
LIMITS = {"runc": ResourceLimits(), "runsc": ResourceLimits(pids=64)}
POOL_SIZE = 8


def request(x: int) -> bytes:
    return canonical_bytes({"source": SOURCE, "entrypoint": "square", "arguments": {"x": x}})


def busy_jiffies() -> int:
    """Busy CPU time of the whole machine, in clock ticks."""
    fields = Path("/proc/stat").read_text(encoding="ascii").splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    return sum(values) - values[3] - values[4]  # all but idle and iowait


def hardening_flags(limits: ResourceLimits) -> list[str]:
    """callward's container options (sandbox/_limits.py) as docker CLI flags."""
    return [
        "--network", "none", "--ipc", "none", "--read-only",
        "--tmpfs", f"/tmp:rw,nosuid,nodev,noexec,size={limits.tmp_bytes},mode=1777",  # noqa: S108
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--user", "65534:65534",
        "--memory", str(limits.memory_bytes), "--memory-swap", str(limits.memory_bytes),
        "--pids-limit", str(limits.pids), "--cpus", str(limits.cpus),
        "--ulimit", f"nofile={limits.open_files}:{limits.open_files}",
        "--log-driver", "none", "--label", "callward=1", "--label", f"callward.pid={os.getpid()}",
    ]


def check(output: bytes, x: int) -> None:
    if f'"value":{x * x}'.encode() not in output:
        raise SystemExit(f"a call gave {output[-200:]!r}")


class Ways:
    """Each way to run one call, as a function of x that returns when the result is in."""

    def __init__(self, image_tag: str, image_id: str) -> None:
        self.image_id = image_id
        self.image_tag = image_tag
        self.sandboxes = {
            runtime: DockerSandbox(
                runtime=runtime, pool=PoolConfig(size=POOL_SIZE, memory_budget_bytes=4 << 30)
            )
            for runtime in ("runc", "runsc")
        }
        self.exec_container = subprocess.run(
            ["docker", "run", "-d", *hardening_flags(LIMITS["runc"]), "--entrypoint", "sleep",
             image_id, "infinity"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()

    def close(self) -> None:
        for sandbox in self.sandboxes.values():
            sandbox.close()
        subprocess.run(["docker", "rm", "-f", self.exec_container], check=False,
                       capture_output=True)

    def host(self, x: int) -> None:
        done = subprocess.run([sys.executable, str(RUNNER)], input=request(x),
                              capture_output=True, check=True)
        check(done.stdout, x)

    def docker_run(self, x: int) -> None:
        done = subprocess.run(
            ["docker", "run", "--rm", "-i", *hardening_flags(LIMITS["runc"]), self.image_id],
            input=request(x), capture_output=True, check=True,
        )
        check(done.stdout, x)

    def docker_exec(self, x: int) -> None:
        done = subprocess.run(
            ["docker", "exec", "-i", self.exec_container, "python3", "/opt/callward/runner.py"],
            input=request(x), capture_output=True, check=True,
        )
        check(done.stdout, x)

    def callward(self, runtime: str) -> Callable[[int], None]:
        sandbox = self.sandboxes[runtime]

        def call(x: int) -> None:
            tool_call = ToolCall.create(id=f"c{x}", name="square", arguments={"x": x},
                                        dialect="api")
            execution = sandbox.run(SPEC, tool_call, LIMITS[runtime])
            if execution.value != x * x:
                raise SystemExit(f"callward/{runtime} gave {execution.kind}")

        return call

    def session(self, runtime: str) -> Callable[[int], None]:
        sandbox = self.sandboxes[runtime]

        def call(x: int) -> None:
            tool_call = ToolCall.create(id=f"c{x}", name="square", arguments={"x": x},
                                        dialect="api")
            # One agent session per thread: concurrent calls use concurrent sessions.
            execution = sandbox.run(SPEC, tool_call, LIMITS[runtime], isolation="session",
                                    principal="bench", session_id=str(threading.get_ident()))
            if execution.value != x * x:
                raise SystemExit(f"callward session/{runtime} gave {execution.kind}")

        return call

    def refill(self, runtime: str) -> None:
        self.sandboxes[runtime].wait_warm(LIMITS[runtime], POOL_SIZE, timeout_seconds=120)


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=40, help="latency samples per way")
    parser.add_argument("--throughput-calls", type=int, default=32,
                        help="calls per concurrency level (docker run: a quarter)")
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
        names = [*plain, *pooled]
        for runtime in pooled.values():
            ways.refill(runtime)
        samples: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, int] = dict.fromkeys(names, 0)
        for number in range(args.calls):  # interleaved: one of each per round
            for name in names:
                runtime = pooled.get(name)
                if runtime is not None:
                    ways.refill(runtime)
                    function = ways.callward(runtime)
                else:
                    function = plain[name]
                jiffies, start = busy_jiffies(), time.perf_counter()
                function(number)
                samples[name].append((time.perf_counter() - start) * 1000)
                cpu[name] += busy_jiffies() - jiffies

        tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
        base_p50 = summarize(samples["docker run --rm (hardened)"])[0]
        rows = []
        for name in names:
            p50, p99, _ = summarize(samples[name])
            rows.append((name, p50, p99, cpu[name] * tick_ms / args.calls, base_p50 / p50))
        print_table(
            f"Latency of one call, {args.calls} interleaved rounds",
            ["way", "p50 ms", "p99 ms", "CPU ms/call", "x faster than docker run"],
            rows,
        )

        throughput_rows = []
        for name in names:
            runtime = pooled.get(name)
            function = ways.callward(runtime) if runtime else plain[name]
            count = args.throughput_calls // (4 if "docker run" in name else 1)
            count *= 8 if "session" in name else 1
            row: list[object] = [name]
            for concurrency in (1, 2, 4, 8):
                if runtime is not None:
                    ways.refill(runtime)
                jiffies, start = busy_jiffies(), time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(concurrency) as executor:
                    list(executor.map(function, range(count)))
                elapsed = time.perf_counter() - start
                cpu_ms = (busy_jiffies() - jiffies) * tick_ms / count
                row.append(f"{count / elapsed:.1f}/s ({cpu_ms:.0f} ms CPU)")
            throughput_rows.append(row)
        print_table(
            f"Throughput, calls/s (CPU ms per call), {args.throughput_calls} calls per level "
            "(docker run: a quarter); callward starts each level with a full pool",
            ["way", "c=1", "c=2", "c=4", "c=8"],
            throughput_rows,
        )
        print(json.dumps({"pool_size": POOL_SIZE, "cpus": os.cpu_count()}))
    finally:
        ways.close()


if __name__ == "__main__":
    main()
