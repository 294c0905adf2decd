"""
A gateway's start: it proves, live, that the protections of its calls are in force,
then says so in a signed ``gateway.started`` record.

For each runtime the configuration and the policy use, one probe runs through the
same runner every call takes, in a container hardened as every call's is, and looks
from inside: the user is not root and holds no capability, ``no-new-privileges`` is
set, the root is read-only, there is no network interface but loopback and no
connection leaves, ``/tmp`` is the size the limits say, and the memory limit is the
one set, where the runtime lets a container read it (gVisor does not). The policy
loaded before this; the log is writable when the record is written.

A probe that fails refuses the start: the operator sees what failed and how to fix
it, and the log gets a ``gateway.start_refused`` record. ``unsafe_skip_probes``
skips the probes (for a machine without an engine, say); the record says so.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import socket
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import structlog

from callward.core._canonical import JSONValue, canonical_bytes, sha256_hex
from callward.core.errors import CallwardError, SandboxUnavailable
from callward.core.protocols import AuditLog, ToolRunner, run_as_placed
from callward.core.types import (
    CallId,
    Placement,
    ResourceLimits,
    Runtime,
    ToolCall,
    ToolSpec,
)

log = structlog.get_logger()

MIB: Final = 1 << 20
#: What the probe runs under: small, and long enough for a cold gVisor start on a busy host.
PROBE_LIMITS: Final = ResourceLimits(wall_seconds=15.0, memory_bytes=64 * MIB, pids=16,
                                     cpus=1.0, output_bytes=16 * 1024, tmp_bytes=1 * MIB,
                                     open_files=32)
_NO_CAPABILITIES: Final = "0000000000000000"

# The probe's source runs in the sandbox, on the image's standard library.
PROBE_SOURCE: Final = textwrap.dedent('''\
    def callward_start_probe():
        import os
        import socket

        facts = {"uid": os.getuid(), "gid": os.getgid()}
        with open("/proc/self/status") as handle:
            status = dict(line.split(":", 1) for line in handle if ":" in line)
        facts["cap_eff"] = status.get("CapEff", "").strip()
        facts["no_new_privs"] = status.get("NoNewPrivs", "").strip()
        try:
            with open("/callward-start-probe", "w"):
                pass
            facts["root_writable"] = True
        except OSError:
            facts["root_writable"] = False
        try:
            with open("/proc/net/dev") as handle:
                lines = handle.readlines()[2:]
            facts["interfaces"] = sorted(line.split(":")[0].strip() for line in lines)
        except OSError:
            facts["interfaces"] = []
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(1)
        try:
            probe.connect(("192.0.2.1", 9))
            facts["network"] = "connected"
        except OSError:
            facts["network"] = "refused"
        finally:
            probe.close()
        stat = os.statvfs("/tmp")
        facts["tmp_bytes"] = stat.f_blocks * stat.f_frsize
        facts["memory_bytes"] = None
        for path in ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"):
            try:
                with open(path) as handle:
                    facts["memory_bytes"] = int(handle.read().strip())
                break
            except (OSError, ValueError):
                pass
        return facts
    ''')
PROBE_SPEC: Final = ToolSpec(
    name="callward_start_probe",
    version="1.0.0",
    description="callward's start probe: the sandbox's protections, seen from inside",
    source=PROBE_SOURCE,
    entrypoint="callward_start_probe",
    parameters_json=canonical_bytes({"type": "object", "additionalProperties": False}),
    digest=sha256_hex(PROBE_SOURCE.encode()),
)


@dataclass(frozen=True, slots=True)
class StartFacts:
    """
    What a configuration put in force: its digest, the runtimes its calls may use, and
    the sandbox's own (the one a call runs on unless the policy names another).
    """

    config_sha256: str
    runtimes: tuple[Runtime, ...]
    default_runtime: Runtime = "runc"
    #: This gateway's id in its fleet (``store`` configured), else None.
    replica: str | None = None


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One runtime's probe: what it saw from inside, and what is wrong with it."""

    runtime: Runtime
    failures: tuple[str, ...]
    facts: Mapping[str, JSONValue]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, JSONValue]:
        return {"runtime": self.runtime, "ok": self.ok, "failures": list(self.failures),
                "facts": dict(self.facts)}


def probe_runtime(runner: ToolRunner, runtime: Runtime, *, default: bool = True
                  ) -> ProbeResult:
    """
    Run the probe on ``runtime`` (the runner's own when ``default``, placed there
    otherwise, as a call the policy places) and judge what it saw; never raises for a
    finding.
    """
    call = ToolCall.create(id=CallId(f"start-probe-{runtime}"), name=PROBE_SPEC.name,
                           arguments={}, dialect="api")
    try:
        execution = run_as_placed(runner, PROBE_SPEC, call, PROBE_LIMITS,
                                  Placement() if default else Placement(runtime=runtime))
    except CallwardError as exc:
        return ProbeResult(runtime, (f"the probe could not run: {exc.message}",), {})
    if execution.kind != "ok" or not isinstance(execution.value, dict):
        return ProbeResult(runtime, (f"the probe ended {execution.kind}",), {})
    facts: dict[str, JSONValue] = dict(execution.value)
    return ProbeResult(runtime, judge(facts, PROBE_LIMITS), facts)


def judge(facts: Mapping[str, JSONValue], limits: ResourceLimits) -> tuple[str, ...]:
    """What the facts a probe saw show to be missing of the hardening."""
    failures = []
    if facts.get("uid") == 0 or facts.get("gid") == 0:
        failures.append("the tool runs as root")
    if facts.get("cap_eff") not in (_NO_CAPABILITIES, ""):
        failures.append("the tool holds capabilities")
    if facts.get("no_new_privs") not in ("1", ""):
        failures.append("no-new-privileges is not set")
    if facts.get("root_writable") is not False:
        failures.append("the root filesystem is writable")
    interfaces = facts.get("interfaces")
    if not isinstance(interfaces, list) or any(name != "lo" for name in interfaces):
        failures.append("a network interface other than loopback is present")
    if facts.get("network") != "refused":
        failures.append("a connection left the sandbox")
    if facts.get("tmp_bytes") != limits.tmp_bytes:
        failures.append("/tmp is not bounded to the limit")  # noqa: S108 - a message
    memory = facts.get("memory_bytes")
    if memory is not None and memory != limits.memory_bytes:
        failures.append("the memory limit is not the one set")
    return tuple(failures)


def prove_start(runner: ToolRunner, facts: StartFacts) -> tuple[ProbeResult, ...]:
    """Probe every runtime in force; the caller refuses to serve unless each is ok."""
    return tuple(probe_runtime(runner, runtime, default=runtime == facts.default_runtime)
                 for runtime in facts.runtimes)


def callward_version() -> str:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version("callward")
    return "unknown"


def start_body(facts: StartFacts, *, policy_digest: str, image_digest: str | None,
               probes: tuple[ProbeResult, ...], unsafe_skip_probes: bool
               ) -> dict[str, JSONValue]:
    """The body of ``gateway.started`` (or ``gateway.start_refused``)."""
    return {
        "version": callward_version(),
        "policy_digest": policy_digest,
        "image_digest": image_digest,
        "config_sha256": facts.config_sha256,
        "runtimes": list(facts.runtimes),
        "probes": [probe.to_json() for probe in probes],
        "unsafe_skip_probes": unsafe_skip_probes,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **({} if facts.replica is None else {"replica": facts.replica}),
    }


def refusal(probes: tuple[ProbeResult, ...]) -> SandboxUnavailable:
    """The error of a start whose probes failed: what failed, and how to fix it."""
    failed = "; ".join(f"{p.runtime}: {', '.join(p.failures)}" for p in probes if not p.ok)
    return SandboxUnavailable(
        f"the sandbox does not prove its protections ({failed})",
        remediation="run `callward sandbox doctor` for each runtime and fix what it "
        "reports (scripts/ensure-engine.sh starts the engine); --unsafe-skip-probes "
        "starts anyway and is recorded",
    )


def record_start(audit: AuditLog, kind: str, body: Mapping[str, JSONValue]) -> None:
    """Append the start record; a start that cannot be recorded does not serve."""
    record = audit.append(kind, body)
    log.info(kind.replace(".", "_"), seq=record.seq)
