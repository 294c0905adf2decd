"""
Secrets handed to one execution, against a real engine, image, SQLite log and policy.

The tools below try to leak what they were given: they return it plainly and
encoded, raise it, leave it in /tmp for the next call, and a test looks at the
container from outside while it runs. The value must reach the tool and
nowhere else: not the result, not the container's configuration, not the next
call (in call and session mode), not the audit file, not the logs.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest
from structlog.testing import capture_logs

from callward.audit import FileSigner, SQLiteAuditStore
from callward.core import ResourceLimits, ToolCall, ToolRegistry, ToolSpec, tool
from callward.core.gateway import Gateway
from callward.policies import Policy
from callward.sandbox import DockerSandbox, EnvironmentSecretSource, SandboxImage
from callward.sandbox._limits import OWNER_LABEL, OWNER_PID_LABEL

pytestmark = pytest.mark.docker

LIMITS = ResourceLimits(wall_seconds=5.0)
SCHEMA = {"type": "object"}

# -- tools: their source runs in the sandbox ------------------------------------------


@tool(version="1.0.0", parameters=SCHEMA, secrets=("API_TOKEN",))
def leak_plain():
    import os

    return {"token": os.environ["API_TOKEN"], "said": "the token is " + os.environ["API_TOKEN"]}


@tool(version="1.0.0", parameters=SCHEMA, secrets=("API_TOKEN",))
def leak_encoded():
    import base64
    import os
    import urllib.parse

    raw = os.environ["API_TOKEN"].encode()
    return [
        base64.b64encode(raw).decode(),
        base64.b64encode(b"x" + raw + b"tail").decode(),
        base64.urlsafe_b64encode(b"yz" + raw).decode(),
        raw.hex(),
        raw.hex().upper(),
        urllib.parse.quote("k=" + os.environ["API_TOKEN"] + "&"),
        {os.environ["API_TOKEN"]: "as a key"},
    ]


@tool(version="1.0.0", parameters=SCHEMA, secrets=("API_TOKEN",))
def leak_raise():
    import os

    raise RuntimeError("cannot log in with " + os.environ["API_TOKEN"])


@tool(version="1.0.0", parameters=SCHEMA, secrets=("API_TOKEN",))
def stash_in_tmp():
    import os

    with open("/tmp/stash", "w") as f:  # noqa: S108 - the container's own /tmp
        f.write(os.environ["API_TOKEN"])
    return "stashed"


@tool(version="1.0.0", parameters=SCHEMA, secrets=("API_TOKEN",))
def hold_secret(seconds):
    import time

    time.sleep(seconds)
    return "held"


@tool(version="1.0.0", parameters=SCHEMA)
def look_around():
    """Everything a later call can see of an earlier one: /tmp, env, and its own memory."""
    import os
    import re

    found = {"tmp": sorted(os.listdir("/tmp")), "env": "API_TOKEN" in os.environ}  # noqa: S108
    # The pattern does not match its own text, so only a leaked value is found.
    pattern = re.compile(rb"cwsecret-[0-9a-f]{16}")
    hits = 0
    with open("/proc/self/maps") as maps:
        regions = [line.split() for line in maps]
    with open("/proc/self/mem", "rb", buffering=0) as mem:
        for fields in regions:
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] == "[vvar]"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                hits += len(pattern.findall(mem.read(end - start)))
            except (OSError, ValueError, OverflowError):
                continue
    found["memory_hits"] = hits
    return found


def spec(function: Callable[..., object]) -> ToolSpec:
    return ToolRegistry().register(function)


def call(name: str, arguments: dict[str, object] | None = None) -> ToolCall:
    return ToolCall.create(id=f"c_{secrets.token_hex(4)}", name=name,
                           arguments=arguments or {}, dialect="api")


@pytest.fixture(name="token")
def _token() -> str:
    return f"cwsecret-{secrets.token_hex(8)}"


@pytest.fixture(name="secret_sandbox")
def _secret_sandbox(sandbox_image: SandboxImage, token: str) -> Iterator[DockerSandbox]:
    source = EnvironmentSecretSource({"CALLWARD_SECRET_API_TOKEN": token})
    with DockerSandbox(image=sandbox_image, secrets=source) as sandbox:
        yield sandbox


class TestSecretsReachOnlyTheTool:
    def test_a_returned_secret_is_redacted_and_counted(
        self, secret_sandbox: DockerSandbox, token: str
    ) -> None:
        """The tool reads its secret from its environment; the result carries only a mark."""
        execution = secret_sandbox.run(spec(leak_plain), call("leak_plain"), LIMITS,
                                       secrets=("API_TOKEN",))

        expected = ({"token": "[REDACTED:API_TOKEN]",
                     "said": "the token is [REDACTED:API_TOKEN]"}, ("API_TOKEN",), 2)
        assert expected == (execution.value, execution.usage.secrets_provided,
                            execution.usage.secret_redactions)

    def test_encoded_secrets_are_redacted(
        self, secret_sandbox: DockerSandbox, token: str
    ) -> None:
        """Base64 (any alignment, either alphabet), hex and URL encodings are cut too."""
        execution = secret_sandbox.run(spec(leak_encoded), call("leak_encoded"), LIMITS,
                                       secrets=("API_TOKEN",))

        text = execution.value_json.decode() if execution.value_json else ""
        assert "ok" == execution.kind
        assert token not in text
        assert token.encode().hex() not in text
        assert 7 <= execution.usage.secret_redactions

    def test_a_secret_in_an_exception_is_redacted(
        self, secret_sandbox: DockerSandbox, token: str
    ) -> None:
        """A tool that raises its secret gets tool_error with the value cut from the message."""
        execution = secret_sandbox.run(spec(leak_raise), call("leak_raise"), LIMITS,
                                       secrets=("API_TOKEN",))

        expected = ("tool_error", False, True)
        assert expected == (execution.kind, token in execution.message,
                            "[REDACTED:API_TOKEN]" in execution.message)

    def test_the_next_call_does_not_see_tmp_or_the_environment(
        self, secret_sandbox: DockerSandbox
    ) -> None:
        """In call mode a secret left in /tmp is gone with its container."""
        secret_sandbox.run(spec(stash_in_tmp), call("stash_in_tmp"), LIMITS,
                           secrets=("API_TOKEN",))
        execution = secret_sandbox.run(spec(look_around), call("look_around"), LIMITS)

        expected = {"tmp": [], "env": False, "memory_hits": 0}
        assert expected == execution.value

    def test_session_mode_next_call_sees_nothing_not_even_in_memory(
        self, secret_sandbox: DockerSandbox
    ) -> None:
        """
        In one session's container, the next call's process (forked from the same
        PID 1) finds the secret neither in /tmp, its environment, nor its memory,
        while the call that has it does find it in its own memory (the probe works).
        """
        placed = {"isolation": "session", "principal": "alice", "session_id": "s1"}
        secret_sandbox.run(spec(stash_in_tmp), call("stash_in_tmp"), LIMITS,
                           secrets=("API_TOKEN",), **placed)  # type: ignore[arg-type]
        after = secret_sandbox.run(spec(look_around), call("look_around"), LIMITS,
                                   **placed)  # type: ignore[arg-type]
        during = secret_sandbox.run(spec(look_around), call("look_around"), LIMITS,
                                    secrets=("API_TOKEN",),
                                    **placed)  # type: ignore[arg-type]

        expected = ({"tmp": [], "env": False, "memory_hits": 0}, True)
        assert expected == (after.value, during.value["memory_hits"] > 0)  # type: ignore[index, operator]

    def test_the_container_configuration_never_holds_the_secret(
        self, secret_sandbox: DockerSandbox, engine: docker.DockerClient, token: str
    ) -> None:
        """While the tool holds its secret, docker inspect shows it nowhere (env, labels, cmd)."""
        seen: list[str] = []

        def inspect_while_running() -> None:
            mine = {"label": [OWNER_LABEL, f"{OWNER_PID_LABEL}={__import__('os').getpid()}"]}
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not seen:
                for summary in engine.api.containers(filters=mine):
                    seen.append(str(engine.api.inspect_container(summary["Id"])))
                time.sleep(0.05)

        watcher = threading.Thread(target=inspect_while_running)
        watcher.start()
        execution = secret_sandbox.run(spec(hold_secret), call("hold_secret", {"seconds": 1.5}),
                                       LIMITS, secrets=("API_TOKEN",))
        watcher.join()

        expected = ("ok", True, False)
        assert expected == (execution.kind, bool(seen), any(token in text for text in seen))


POLICY = """
version: 1
default: deny
rules:
  - {id: anyone, effect: allow, principals: ["*"], tools: ["*"]}
tools:
  leak_plain:
    secrets: [API_TOKEN]
  leak_raise:
    secrets: [API_TOKEN]
"""


@pytest.fixture(name="gateway")
def _gateway(
    tmp_path: Path, sandbox_image: SandboxImage, token: str
) -> Iterator[Gateway]:
    registry = ToolRegistry()
    for function in (leak_plain, leak_raise, stash_in_tmp):
        registry.register(function)
    signer = FileSigner.load_or_create(tmp_path / "keys")
    audit = SQLiteAuditStore(tmp_path / "audit.db", signer)
    audit.open()
    source = EnvironmentSecretSource({"CALLWARD_SECRET_API_TOKEN": token})
    sandbox = DockerSandbox(image=sandbox_image, secrets=source)
    gateway = Gateway(registry=registry, policy=Policy.from_text(POLICY), runner=sandbox,
                      audit=audit, closers=(audit.close, sandbox.close))
    yield gateway
    gateway.close()


class TestSecretsThroughTheGateway:
    def test_secrets_never_reach_the_audit_file_or_the_logs(
        self, gateway: Gateway, tmp_path: Path, token: str
    ) -> None:
        """
        A granted secret is used, redacted, and recorded by name only: its value is in
        no byte of the SQLite file (WAL included) and no captured log line.
        """
        with capture_logs() as logs:
            plain = gateway.handle(call("leak_plain"), principal="alice")
            raised = gateway.handle(call("leak_raise"), principal="alice")
        gateway.close()
        stored = b"".join(p.read_bytes() for p in tmp_path.glob("audit.db*") if p.is_file())

        expected = ("ok", "tool_error", False, False, False)
        assert expected == (plain.kind, raised.kind, token.encode() in stored,
                            token in repr(logs), token in plain.content_json.decode())

    def test_the_record_names_the_secret_and_counts_redactions(self, gateway: Gateway) -> None:
        """call.authorized carries the granted names; call.completed the provided names and cuts."""
        result = gateway.handle(call("leak_plain"), principal="alice")
        completed = gateway.audit.get(result.receipt.seq).body  # type: ignore[attr-defined]
        authorized = gateway.audit.get(completed["authorized_seq"]).body  # type: ignore[attr-defined]

        expected = (["API_TOKEN"], ["API_TOKEN"], 2)
        assert expected == (authorized["decision"]["secrets"],
                            completed["usage"]["secrets_provided"],
                            completed["usage"]["secret_redactions"])

    def test_a_secret_the_policy_does_not_grant_is_denied(self, gateway: Gateway) -> None:
        """stash_in_tmp declares API_TOKEN, the policy grants it none: denied, never run."""
        result = gateway.handle(call("stash_in_tmp"), principal="alice")

        expected = ("permission", "secrets.stash_in_tmp")
        assert expected == (result.kind, result.content["rule"])  # type: ignore[index, call-overload]

    def test_a_missing_secret_fails_closed_before_anything_runs(
        self,
        tmp_path: Path,
        sandbox_image: SandboxImage,
        own_leftover_containers: Callable[[], list[str]],
    ) -> None:
        """With the secret absent from the source the call ends sandbox_unavailable, audited."""
        registry = ToolRegistry()
        registry.register(leak_plain)
        signer = FileSigner.load_or_create(tmp_path / "keys2")
        audit = SQLiteAuditStore(tmp_path / "audit2.db", signer)
        audit.open()
        sandbox = DockerSandbox(image=sandbox_image, secrets=EnvironmentSecretSource({}))
        with Gateway(registry=registry, policy=Policy.from_text(POLICY), runner=sandbox,
                     audit=audit, closers=(audit.close, sandbox.close)) as gateway:
            result = gateway.handle(call("leak_plain"), principal="alice")
            record = audit.get(result.receipt.seq)

        expected = ("sandbox_unavailable", "call.completed", None, True, [])
        assert expected == (result.kind, record.kind, record.body["usage"],
                            "API_TOKEN" in str(record.body["message"]),
                            own_leftover_containers())
