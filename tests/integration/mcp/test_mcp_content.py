"""
Upstream resources and prompts through `callward mcp serve`: enabled by policy only,
namespaced, redacted by the result rules and audited. The upstream is the SDK-written
notes server inside a hardened container; the client is the SDK's own.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from mcp import Client, MCPError

from callward.audit import read_records
from callward.core.mcp._content import UpstreamContent, resource_uri
from callward.core.mcp._gateway import open_upstreams
from callward.core.mcp._server import McpFace

SERVERS = Path(__file__).resolve().parent / "servers"
POLICY = """\
version: 1
default: deny
principals:
  alice: {roles: [analyst]}
  mallory: {roles: [guest]}
rules:
  - {id: analysts-use-notes, effect: allow, roles: [analyst], tools: [notes__add]}
mcp_content:
  - {id: analysts-read-public-notes, server: notes, resources: ["note://public/*"],
     prompts: [summarize], roles: [analyst]}
results:
  - {id: redact-credentials, tools: ["*"], redact: [credentials]}
  - {id: keep-prompts, tools: [notes__summarize], audit_body: body}
"""
PUBLIC = resource_uri("notes", "note://public/hello")
PRIVATE = resource_uri("notes", "note://private/diary")
BIG = resource_uri("notes", "note://public/big")


def records(home: Path, prefix: str) -> list[tuple[str, Any]]:
    return [(r.kind, r.body) for r in read_records(home / "audit.db")
            if r.kind.startswith(prefix)]


@pytest.fixture(name="config")
def _config(tmp_path: Path, examples: Path) -> Path:
    shutil.copy(SERVERS / "notes_server.py", tmp_path / "notes_server.py")
    (tmp_path / "policy.yaml").write_text(POLICY)
    path = tmp_path / "callward.yaml"
    path.write_text(yaml.safe_dump({
        "tools": [str(examples / "tools.py")],
        "policy": "policy.yaml",
        "mcp": {"servers": {"notes": {
            "command": ["python3", "/opt/callward/service/notes_server.py"],
            "files": {"notes_server.py": "notes_server.py"},
            "python_distributions": ["mcp", "cryptography"],
            "limits": {"memory_bytes": 256 << 20, "pids": 64, "open_files": 256,
                       "wall_seconds": 5, "output_bytes": 4096},
        }}},
    }))
    return path


async def exercise(face: McpFace) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    async with Client(face.server(), read_timeout_seconds=60) as client:
        seen["resources"] = [r.uri for r in (await client.list_resources()).resources]
        seen["prompts"] = [p.name for p in (await client.list_prompts()).prompts]
        seen["public"] = await client.read_resource(PUBLIC)
        seen["summary"] = await client.get_prompt("notes__summarize", {"topic": "the log"})
        for name, request in (("private", lambda: client.read_resource(PRIVATE)),
                              ("exfiltrate", lambda: client.get_prompt("notes__exfiltrate")),
                              ("bogus", lambda: client.read_resource("note://public/hello")),
                              ("big", lambda: client.read_resource(BIG))):
            try:
                await request()
            except MCPError as exc:
                seen[name] = exc
    return seen


async def read_public(face: McpFace) -> str:
    async with Client(face.server(), read_timeout_seconds=60) as client:
        try:
            await client.read_resource(PUBLIC)
        except MCPError:
            return "refused"
    return "read"


async def refused_as_guest(face: McpFace) -> list[Any]:
    async with Client(face.server(), read_timeout_seconds=60) as client:
        listed = (await client.list_resources()).resources
        with pytest.raises(MCPError):
            await client.read_resource(PUBLIC)
    return listed


class TestUpstreamContent:
    def test_enabled_by_policy_redacted_and_audited(self, engine, config, home, cli):
        """
        Only what the policy enables is listed and served, namespaced; what is served
        is redacted and signed with the server digest and content hash; every refusal
        (not enabled, unknown URI, another principal) is audited; the log verifies.
        """
        with open_upstreams(config, home=home) as (gateway, upstreams):
            content = UpstreamContent.of(gateway, upstreams.connections)
            seen = anyio.run(exercise, McpFace(gateway, principal="alice", content=content))
            guest_listed = anyio.run(refused_as_guest,
                                     McpFace(gateway, principal="mallory", content=content))
            server_digest = upstreams.connections["notes"].digest
            # An edited policy applies to the next read, with no tool call in between.
            time.sleep(1.1)  # the policy file is polled at most once a second
            policy = config.parent / "policy.yaml"
            policy.write_text(POLICY.replace('resources: ["note://public/*"],', ""))
            after_edit = anyio.run(read_public, McpFace(gateway, principal="alice",
                                                        content=content))

        assert ([BIG, PUBLIC], ["notes__summarize"]) == (sorted(seen["resources"]),
                                                          seen["prompts"])
        text = seen["public"].contents[0].text
        assert "hello from notes" in text
        assert "AKIA" not in text
        assert "[REDACTED]" in text
        prompt_text = seen["summary"].messages[0].content.text
        assert "Summarize the log" in prompt_text
        assert "ghp_" not in prompt_text
        assert {"private", "exfiltrate", "bogus", "big"} <= set(seen)
        assert [] == guest_listed

        audited = records(home, "mcp.")
        read = next(body for kind, body in audited if kind == "mcp.resource_read")
        got = next(body for kind, body in audited if kind == "mcp.prompt_get")
        assert ("note://public/hello", server_digest, "analysts-read-public-notes", 1,
                None) == (read["upstream_uri"], read["server_digest"], read["rule"],
                          read["redactions"], read["content"])
        assert 64 == len(read["content_sha256"])
        assert ("summarize", "alice", 1) == (got["prompt"], got["principal"], got["redactions"])
        assert "ghp_" not in str(got["content"])  # kept (audit_body: body), redacted
        refusals = [(kind, body["reason"], body["principal"]) for kind, body in audited
                    if kind.endswith("_refused")]
        assert {("mcp.resource_refused", "not_enabled", "alice"),
                ("mcp.prompt_refused", "not_enabled", "alice"),
                ("mcp.resource_refused", "unknown_uri", "alice"),
                ("mcp.resource_refused", "output_limit", "alice"),
                ("mcp.resource_refused", "not_enabled", "mallory")} == set(refusals)
        assert "refused" == after_edit
        reloaded = [kind for kind, _ in records(home, "policy.")]
        assert ["policy.reloaded"] == reloaded
        verified = cli("audit", "verify")
        assert 0 == verified.returncode, verified.stdout + verified.stderr
