"""
``callward sandbox doctor``: is this machine's sandbox what callward promises?

Each check is evidence, not configuration read back: the engine answers, each
runtime runs a call, the image is there under the digest the audit log will
record, the kernel's cgroup controllers exist, and every limit is proven live
by a tiny probe that attacks it and must end in exactly its kind. A failed
check says what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from callward.core import (
    CallwardError,
    ResourceLimits,
    Runtime,
    ToolCall,
    ToolSpec,
    canonical_bytes,
    sha256_hex,
)
from callward.core.types import RUNTIMES
from callward.sandbox._docker import DockerSandbox
from callward.sandbox._engine import client_from_env, map_docker_errors
from callward.sandbox._image import SandboxImage, ensure_image
from callward.sandbox._pool import PoolConfig

MIB: Final = 1 << 20
ENGINE_FIX: Final = "start the Docker Engine: scripts/ensure-engine.sh (as root)"
RUNSC_FIX: Final = (
    "install Debian's runsc and register it in /etc/docker/daemon.json with "
    'runtimeArgs ["--network=none"]: scripts/ensure-engine.sh'
)
#: The cgroup v1 and v2 files each limit needs on the host.
_CGROUP_FILES: Final = {
    "memory": ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"),
    "pids": ("/sys/fs/cgroup/pids", "/sys/fs/cgroup/pids.max"),
    "cpu": ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu.max"),
}
_PROBES: Final = {
    "square": ("def square(x):\n    return x * x\n", "ok"),
    "memory": ("def memory():\n    chunks = []\n    while True:\n"
               "        chunks.append(b'\\x01' * (1 << 20))\n", "memory_limit"),
    "pids": ("def pids():\n    import contextlib, os\n    while True:\n"
             "        with contextlib.suppress(OSError):\n            os.fork()\n", "pids_limit"),
    "wall_clock": ("def wall_clock():\n    import signal, time\n"
                   "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    time.sleep(60)\n",
                   "timeout"),
    "output": ("def output():\n    while True:\n        print('x' * 1000)\n", "output_limit"),
    "disk": ("def disk():\n    with open('/tmp/fill', 'wb') as f:\n        while True:\n"
             "            f.write(b'0' * 65536)\n", "disk_limit"),
    "open_files": ("def open_files():\n    handles = []\n    while True:\n"
                   "        handles.append(open('/dev/null'))\n", "tool_error"),
    "network": ("def network():\n    import socket\n    try:\n"
                "        socket.create_connection(('1.1.1.1', 80), timeout=1)\n"
                "    except OSError:\n        return 'refused'\n    return 'connected'\n", "ok"),
}
_GVISOR_PIDS_PROBE_SECONDS: Final = 10.0
_PROBE_LIMITS: Final = ResourceLimits(
    wall_seconds=2.0, memory_bytes=48 * MIB, pids=16, cpus=1.0, output_bytes=16 * 1024,
    tmp_bytes=1 * MIB, open_files=32,
)


@dataclass(frozen=True, slots=True)
class DoctorCheck:
    """One doctor finding: what was checked, whether it holds, and what to do if not."""

    name: str
    status: Literal["ok", "fail", "warn"]
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return {"check": self.name, "status": self.status, "detail": self.detail,
                "fix": self.fix}


def diagnose(runtimes: tuple[Runtime, ...] = RUNTIMES) -> tuple[DoctorCheck, ...]:
    """Run every check; never raises for what it finds."""
    checks: list[DoctorCheck] = []
    try:
        with map_docker_errors("reach the Docker Engine"):
            client = client_from_env()
            info = client.info()
            client.close()
    except CallwardError as exc:
        return (DoctorCheck("engine", "fail", exc.message, ENGINE_FIX),)
    checks.append(DoctorCheck("engine", "ok", f"Docker {info.get('ServerVersion')}, "
                        f"cgroup v{info.get('CgroupVersion', '?')}"))
    registered = set(info.get("Runtimes") or {})
    for name, paths in _CGROUP_FILES.items():
        found = any(Path(p).exists() for p in paths)
        checks.append(DoctorCheck(f"cgroup.{name}", "ok" if found else "fail",
                            "controller present" if found else "controller missing",
                            "" if found else "boot with the cgroup controller enabled"))
    try:
        image = ensure_image()
    except CallwardError as exc:
        checks.append(DoctorCheck("image", "fail", exc.message, exc.remediation))
        return tuple(checks)
    checks.append(DoctorCheck("image", "ok", f"{image.tag} digest {image.digest}"))
    for runtime in runtimes:
        if runtime not in registered:
            checks.append(DoctorCheck(f"runtime.{runtime}", "fail", "not registered with dockerd",
                                RUNSC_FIX if runtime == "runsc" else ENGINE_FIX))
            continue
        checks.extend(_probe_runtime(image, runtime))
    return tuple(checks)


def _probe_runtime(image: SandboxImage, runtime: Runtime) -> list[DoctorCheck]:
    # gVisor's sentry holds memory for every guest process, and it counts against the
    # limit: its fork bomb would otherwise end as memory_limit before pids_limit.
    limits = _PROBE_LIMITS if runtime == "runc" else dataclasses.replace(
        _PROBE_LIMITS, memory_bytes=192 * MIB
    )
    # Under gVisor a fork bomb needs time to reach its limit (its forks are slow, and
    # on a loaded machine slower still: 0.3-1.8 s seen here); the runner reports it then.
    pids_limits = limits if runtime == "runc" else dataclasses.replace(
        limits, wall_seconds=_GVISOR_PIDS_PROBE_SECONDS
    )
    checks: list[DoctorCheck] = []
    with DockerSandbox(image=image, runtime=runtime, pool=PoolConfig(size=0)) as sandbox:
        for probe, (source, kind) in _PROBES.items():
            name = f"{runtime}.{probe}"
            try:
                observed, took = _run_probe(sandbox, probe, source,
                                            pids_limits if probe == "pids" else limits)
            except CallwardError as exc:
                checks.append(DoctorCheck(name, "fail", exc.message, exc.remediation))
                if probe == "square":
                    break
                continue
            ok = observed == kind
            detail = f"ended {observed} in {took:.0f} ms (expected {kind})"
            checks.append(DoctorCheck(name, "ok" if ok else "fail", detail,
                                "" if ok else f"the {probe} limit does not hold on {runtime}: "
                                "check the engine's cgroup support and runtime configuration"))
    return checks


def _run_probe(
    sandbox: DockerSandbox, probe: str, source: str, limits: ResourceLimits,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[str, float]:
    spec = ToolSpec(name=probe, version="0", description="doctor probe", source=source,
                    entrypoint=probe, parameters_json=canonical_bytes({"type": "object"}),
                    digest=sha256_hex(source.encode()))
    arguments = {"x": 7} if probe == "square" else {}
    call = ToolCall.create(id=f"doctor-{probe}", name=probe, arguments=arguments, dialect="api")
    started = clock()
    execution = sandbox.run(spec, call, limits)
    took = (clock() - started) * 1000
    if probe == "network" and execution.kind == "ok" and execution.value != "refused":
        return "network_reachable", took
    if probe == "square" and execution.kind == "ok" and execution.value != 49:
        return "wrong_value", took
    return execution.kind, took
