"""
callward's sandbox against its peers: one tool call (`square`), every way, interleaved
in one process and one run: p50/p99 latency, throughput at concurrency 1/2/4/8, CPU per
call, and the ratio to `docker run --rm`.

Run (the peers live in their own environment, never in callward's dependencies):

    bench/setup-peers.sh
    bench/.venv-peers/bin/python -m bench.sandbox_peers --calls 30

The ways of bench/sandbox_latency.py (host subprocess, docker run --rm, docker exec,
callward call/runc, call/runsc, session/runc; both import them from bench/_common.py) plus:

- llm-sandbox warm session: one `SandboxSession` opened ahead, on callward's sandbox image
  (no pull), `skip_environment_setup=True` (its set-up creates a venv and runs pip, which
  needs the network). Each call copies the code in (`put_archive`) and `docker exec`s
  `python3` on it. Hardening it supports: network none, all capabilities dropped,
  no-new-privileges, the same memory, pids and CPU limits. It cannot run read-only (the
  archive API cannot write to a read-only root or into a tmpfs) nor as non-root (the code
  file it copies in is root's, mode 0600: a non-root user gets EACCES), so it runs as root
  on a writable root filesystem. Its Python handler runs `python`; the image has only
  `python3`, so the bench sets its command to `python3 {file}`.
- smolagents `DockerExecutor`: a Jupyter kernel gateway container, started ahead, on an
  image that bench/setup-peers.sh builds offline on callward's base image (its default
  Dockerfile pulls python:3.12 and runs pip online). Each call opens a websocket to the
  kernel and executes the code. Hardening: read-only root, /tmp tmpfs, all capabilities
  dropped, no-new-privileges, user nobody, the same memory, pids and CPU limits; but it
  needs a bridge network with a published port (127.0.0.1 only), so no `--network none`.
  Both peers keep one container for every call: state carries from call to call
  (not single use), like `docker exec` and callward's `session` mode.

CPU columns: "machine" is the whole machine's busy CPU time over the calls, from
/proc/stat (dockerd, containerd, runc or gVisor, the containers, this process, and
anything else running: on a busy machine it over-counts); "this process" is
`time.process_time()` of the benchmark itself (client side: docker SDK, JSON, sockets);
"in container" is the cgroup cpuacct usage of the long-lived container, for the ways
that keep one (per-call containers are gone before it can be read).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._common import (
    LIMITS,
    POOL_SIZE,
    SOURCE,
    Ways,
    busy_jiffies,
    configure_logging,
    print_table,
    summarize,
)
from callward.sandbox import ensure_image

KERNEL_REPOSITORY = "callward-bench/jupyter-kernel"
TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")
BASELINE = "docker run --rm (hardened)"


def resource_kwargs() -> dict[str, Any]:
    """callward's limits and labels, as docker SDK `containers.run` arguments."""
    limits = LIMITS["runc"]
    return {
        "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"],
        "mem_limit": limits.memory_bytes, "memswap_limit": limits.memory_bytes,
        "pids_limit": limits.pids, "nano_cpus": int(limits.cpus * 1e9),
        "labels": {"callward": "1", "callward.pid": str(os.getpid())},
    }


def container_cpu_ns(container_id: str) -> int | None:
    """The container's CPU time so far (cgroup v1 cpuacct), or None where it cannot be read."""
    for path in (f"/sys/fs/cgroup/cpuacct/docker/{container_id}/cpuacct.usage",
                 f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cpu.stat"):
        try:
            text = Path(path).read_text(encoding="ascii")
        except OSError:
            continue
        if path.endswith("cpuacct.usage"):
            return int(text)
        for line in text.splitlines():
            if line.startswith("usage_usec"):
                return int(line.split()[1]) * 1000
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Peers:
    """The peers' warm sessions; each way is a function of x that returns with the result."""

    def __init__(self, image_tag: str) -> None:
        self.errors: dict[str, str] = {}
        self.containers: dict[str, str] = {}
        self.llm: Any = None
        self.smol: Any = None
        try:
            self._open_llm_sandbox(image_tag)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            self.errors["llm-sandbox"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        try:
            self._open_smolagents()
        except Exception as exc:  # noqa: BLE001 - same
            self.errors["smolagents"] = f"{type(exc).__name__}: {str(exc)[:160]}"

    def _open_llm_sandbox(self, image_tag: str) -> None:
        from llm_sandbox import SandboxSession  # noqa: PLC0415 - only in the peers venv

        session = SandboxSession(
            lang="python", image=image_tag, skip_environment_setup=True, workdir="/sandbox",
            runtime_configs={"entrypoint": ["sleep", "infinity"], "network_mode": "none",
                             **resource_kwargs()},
        )
        session.open()
        session.language_handler.config.execution_commands = ["python3 {file}"]
        self.llm = session
        self.containers["llm-sandbox"] = session.container.id

    def _open_smolagents(self) -> None:
        import docker  # noqa: PLC0415
        from smolagents.monitoring import AgentLogger, LogLevel  # noqa: PLC0415
        from smolagents.remote_executors import DockerExecutor  # noqa: PLC0415

        tags = [tag for image in docker.from_env().images.list(KERNEL_REPOSITORY)
                for tag in image.tags]
        if not tags:
            raise RuntimeError(f"no {KERNEL_REPOSITORY} image: run bench/setup-peers.sh")
        limits = LIMITS["runc"]
        self.smol = DockerExecutor(
            [], AgentLogger(level=LogLevel.OFF), image_name=sorted(tags)[-1],
            build_new_image=False, port=free_port(),
            container_run_kwargs={
                "read_only": True, "user": "65534:65534",
                "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={limits.tmp_bytes},mode=1777"},  # noqa: S108
                **resource_kwargs(),
            },
        )
        self.containers["smolagents"] = self.smol.container.id

    def llm_sandbox(self, x: int) -> None:
        code = f"import json\n{SOURCE}print(json.dumps({{'value': square({x})}}))\n"
        output = self.llm.run(code)
        if output.exit_code != 0 or json.loads(output.stdout) != {"value": x * x}:
            raise SystemExit(f"llm-sandbox gave {output.stdout[-200:]!r} {output.stderr[-200:]!r}")

    def smolagents(self, x: int) -> None:
        output = self.smol(f"{SOURCE}square({x})")
        if output.output not in (x * x, str(x * x)):  # the kernel's text/plain repr
            raise SystemExit(f"smolagents gave {output!r}")

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
        if self.smol is not None:
            self.smol.cleanup()


def main() -> None:  # noqa: PLR0912, PLR0915 - one straight benchmark script
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=30, help="latency samples per way")
    parser.add_argument("--throughput-calls", type=int, default=16,
                        help="calls per concurrency level (docker run: a quarter)")
    args = parser.parse_args()

    image = ensure_image()
    ways = Ways(image.tag, image.image_id)
    peers = Peers(image.tag)
    try:
        plain: dict[str, Callable[[int], None]] = {
            "host subprocess (no isolation)": ways.host,
            BASELINE: ways.docker_run,
            "docker exec -i (warm, reused)": ways.docker_exec,
        }
        if peers.llm is not None:
            plain["llm-sandbox warm session (root, rw root)"] = peers.llm_sandbox
        if peers.smol is not None:
            plain["smolagents DockerExecutor (bridge net)"] = peers.smolagents
        plain["callward session / runc (fork per call)"] = ways.session("runc")
        pooled = {"callward call / runc (warm pool)": "runc",
                  "callward call / runsc (warm pool)": "runsc"}
        long_lived = {"docker exec -i (warm, reused)": ways.exec_container,
                      "llm-sandbox warm session (root, rw root)": peers.containers.get(
                          "llm-sandbox", ""),
                      "smolagents DockerExecutor (bridge net)": peers.containers.get(
                          "smolagents", "")}
        names = [*plain, *pooled]
        for runtime in pooled.values():
            ways.refill(runtime)
        for warm_up in plain.values():  # one untimed call each: imports, first exec
            warm_up(1)
        samples: dict[str, list[float]] = {name: [] for name in names}
        machine: dict[str, int] = dict.fromkeys(names, 0)
        own: dict[str, float] = dict.fromkeys(names, 0.0)
        inside: dict[str, int | None] = {name: 0 if name in long_lived else None
                                         for name in names}
        for number in range(args.calls):  # interleaved: one of each per round
            for name in names:
                runtime = pooled.get(name)
                if runtime is not None:
                    ways.refill_every(pooled.values())
                    function = ways.callward(runtime)
                else:
                    function = plain[name]
                container = long_lived.get(name, "")
                before_ns = container_cpu_ns(container) if container else None
                jiffies, cpu, start = busy_jiffies(), time.process_time(), time.perf_counter()
                function(number)
                samples[name].append((time.perf_counter() - start) * 1000)
                own[name] += time.process_time() - cpu
                machine[name] += busy_jiffies() - jiffies
                after_ns = container_cpu_ns(container) if container else None
                if before_ns is not None and after_ns is not None:
                    inside[name] = (inside[name] or 0) + after_ns - before_ns
                elif name in inside:
                    inside[name] = None

        base_p50 = summarize(samples[BASELINE])[0]
        rows: list[list[object]] = []
        for name in names:
            p50, p99, _ = summarize(samples[name])
            in_container = inside[name]
            rows.append([
                name, p50, p99, f"{base_p50 / p50:.1f}x",
                f"{machine[name] * TICK_MS / args.calls:.1f}",
                f"{1000 * own[name] / args.calls:.1f}",
                "-" if in_container is None else f"{in_container / 1e6 / args.calls:.1f}",
            ])
        for peer, error in peers.errors.items():
            rows.append([f"{peer}: n/a ({error})", "-", "-", "-", "-", "-", "-"])
        print_table(
            f"Latency of one `square` call, {args.calls} interleaved rounds "
            f"({os.cpu_count()} CPUs)",
            ["way", "p50 ms", "p99 ms", "vs docker run", "CPU ms/call machine",
             "CPU ms/call this process", "CPU ms/call in container"],
            rows,
        )

        throughput_rows = []
        for name in names:
            runtime = pooled.get(name)
            function = ways.callward(runtime) if runtime else plain[name]
            count = max(1, args.throughput_calls // (4 if name == BASELINE else 1))
            count *= 8 if "session /" in name else 1
            row: list[object] = [name]
            for concurrency in (1, 2, 4, 8):
                if runtime is not None:
                    ways.refill(runtime)
                jiffies, start = busy_jiffies(), time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(concurrency) as executor:
                    list(executor.map(function, range(count)))
                elapsed = time.perf_counter() - start
                cpu_ms = (busy_jiffies() - jiffies) * TICK_MS / count
                row.append(f"{count / elapsed:.1f}/s ({cpu_ms:.0f} ms)")
            throughput_rows.append(row)
        print_table(
            f"Throughput, calls/s (machine CPU ms per call), {args.throughput_calls} calls per "
            "level (docker run: a quarter; callward session: 8x); callward call mode starts "
            "each level with a full pool; the peers share one warm container per way",
            ["way", "c=1", "c=2", "c=4", "c=8"],
            throughput_rows,
        )
        print(json.dumps({"pool_size": POOL_SIZE, "cpus": os.cpu_count(),
                          "peers": sorted(peers.containers), "peer_errors": peers.errors}))
    finally:
        peers.close()
        ways.close()


if __name__ == "__main__":
    main()
