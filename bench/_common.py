"""
What the benchmarks share: logging as the CLI does, percentiles and the printed table,
the repository's paths, a runner that answers at once, the MCP ``notes`` server the
MCP benches call, and the ways of running one sandboxed call that the sandbox benches
compare. Each benchmark runs as a module from the repository root:
``.venv/bin/python -m bench.NAME``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import structlog
import yaml
from mcp import StdioServerParameters

from callward.core import (
    Execution,
    ResourceLimits,
    Sha256Hex,
    ToolCall,
    ToolSpec,
    Usage,
    canonical_bytes,
    sha256_hex,
)
from callward.sandbox import DockerSandbox, PoolConfig

REPO = Path(__file__).resolve().parent.parent
#: The shipped example tools, policy and configuration.
EXAMPLES = REPO / "core" / "examples"


# Logging, percentiles and the table.


def configure_logging() -> None:
    """Log as the CLI does by default: JSON on stderr, warnings and above only."""
    structlog.configure(
        processors=[structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


def timed(function: Callable[[], object], count: int) -> list[float]:
    """Milliseconds of each of ``count`` calls of ``function``, in order."""
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        function()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (fraction in [0, 1]) of the values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def summarize(values_ms: Sequence[float]) -> tuple[float, float, float]:
    """p50, p99 and mean, in milliseconds."""
    return percentile(values_ms, 0.50), percentile(values_ms, 0.99), statistics.fmean(values_ms)


def cpu_summary() -> str:
    """
    The CPU the figures were taken on, as ``lscpu`` names it, with its count and the
    vector and matrix extensions it has (avx2, avx512f, amx): figures from another
    CPU are not comparable.
    """
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        listing = subprocess.run(["lscpu"], capture_output=True, text=True, check=True,
                                 env={**os.environ, "LC_ALL": "C"}).stdout
        for line in listing.splitlines():
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    flags = set(fields.get("Flags", "").split())
    if not flags:
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text(encoding="ascii").splitlines():
                if line.startswith("flags"):
                    flags = set(line.partition(":")[2].split())
                    break
    model = fields.get("Model name", "unknown CPU")
    if "CPU family" in fields and "Model" in fields:
        model += f" (family {fields['CPU family']}, model {fields['Model']})"
    has = ", ".join(
        f"{name}: {'yes' if any(f.startswith(name) for f in flags) else 'no'}"
        for name in ("avx2", "avx512f", "amx")
    )
    return f"{model}, {os.cpu_count()} CPUs; {has}"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(map(str, header))] + [
        [f"{value:.3f}" if isinstance(value, float) else str(value) for value in row]
        for row in rows
    ]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    print(f"\n{title}")
    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    print(line(cells[0]))
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for row in cells[1:]:
        print(line(row))


# A runner that answers at once.


class NullRunner:
    """
    Answers every call at once with ``value_json``, so that only what callward does
    around a tool is timed. A benchmark baseline, not a sandbox.
    """

    image_digest = Sha256Hex("0" * 64)

    def __init__(self, value_json: bytes = b"42") -> None:
        self._value_json = value_json

    def run(self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
        return Execution("ok", self._value_json, "", Usage(0.0, 0, len(self._value_json)))


# The MCP benches' upstream: the integration tests' `notes` server in a service container.

SERVER = REPO / "tests" / "integration" / "mcp" / "servers" / "notes_server.py"
#: The notes server's command inside its service container.
SERVER_COMMAND = ["python3", "/opt/callward/service/notes_server.py"]
MCP_POLICY = """\
version: 1
default: deny
principals:
  bench: {roles: [bench]}
rules:
  - {id: bench-adds, effect: allow, roles: [bench], tools: [notes__add]}
"""


def write_config(root: Path, *, audit_sync: str | None = None) -> Path:
    """The MCP benches' callward.yaml in ``root``; ``audit_sync`` sets ``audit.sync``."""
    shutil.copy(SERVER, root / "notes_server.py")
    (root / "policy.yaml").write_text(MCP_POLICY)
    path = root / "callward.yaml"
    path.write_text(yaml.safe_dump({
        **({} if audit_sync is None else {"audit": {"sync": audit_sync}}),
        "tools": [str(EXAMPLES / "tools.py")],
        "policy": "policy.yaml",
        "mcp": {"servers": {"notes": {
            "command": SERVER_COMMAND,
            "files": {"notes_server.py": "notes_server.py"},
            "python_distributions": ["mcp", "cryptography"],
            "limits": {"memory_bytes": 256 << 20, "pids": 64, "open_files": 256,
                       "wall_seconds": 20},
        }}},
    }))
    return path


def exec_server(container_id: str) -> StdioServerParameters:
    """The baseline: the SDK client runs another notes server with `docker exec -i`."""
    return StdioServerParameters(
        command="docker", args=["exec", "-i", container_id, *SERVER_COMMAND],
        env={key: value for key, value in os.environ.items() if key.startswith("DOCKER_")})


# The sandbox benches' ways of running one call (`square`) in isolation.

RUNNER = REPO / "sandbox" / "image" / "runner.py"
SOURCE = "def square(x):\n    return x * x\n"


def tool_spec(name: str, source: str, *, version: str = "1", description: str = "") -> ToolSpec:
    """A tool of ``source`` whose entrypoint is ``name``, taking any arguments object."""
    return ToolSpec(name=name, version=version, description=description, source=source,
                    entrypoint=name, parameters_json=canonical_bytes({"type": "object"}),
                    digest=sha256_hex(source.encode()))


SPEC = tool_spec("square", SOURCE, version="1.0.0", description="x squared")
# The same limits on both runtimes: on gVisor its own kernel keeps the pids limit.
LIMITS = {"runc": ResourceLimits(), "runsc": ResourceLimits()}
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
            # One agent session per worker thread (its index, the same in every executor,
            # so a level reuses the sessions the last one started).
            session_id = threading.current_thread().name.rsplit("_", 1)[-1]
            execution = sandbox.run(SPEC, tool_call, LIMITS[runtime], isolation="session",
                                    principal="bench", session_id=session_id)
            if execution.value != x * x:
                raise SystemExit(f"callward session/{runtime} gave {execution.kind}")

        return call

    def refill(self, runtime: str) -> None:
        self.sandboxes[runtime].wait_warm(LIMITS[runtime], POOL_SIZE, timeout_seconds=120)

    def refill_every(self, runtimes: Iterable[str]) -> None:
        """Every pool full, so that no replacement starts while the next call is timed."""
        for runtime in runtimes:
            self.refill(runtime)
