"""
Per-client principals over Streamable HTTP: bearer tokens (configured as SHA-256
hashes) map each client to its principal; a missing or unknown token is a 401,
audited. A real uvicorn server on loopback, the SDK's own client, a real signed log.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from callward.audit import SQLiteAuditStore
from callward.core import ConfigurationError
from callward.core.gateway import Gateway
from callward.core.mcp._auth import parse_clients, token_sha256
from callward.core.mcp._server import McpFace, http_app
from callward.core.testing import StubRunner, ok_execution
from tests.unit.mcp._serving import serving

ALICE_TOKEN = "alice-" + "a" * 40
DANA_TOKEN = "dana-" + "d" * 40


@pytest.fixture(name="runner")
def _runner() -> StubRunner:
    """Every tool answers 0, as a container would return a value."""
    return StubRunner(ok_execution(0))


@pytest.fixture(name="url")
def _url(gateway: Gateway, store: SQLiteAuditStore) -> Iterator[str]:
    tokens = parse_clients([{"principal": "alice", "token_sha256": token_sha256(ALICE_TOKEN)},
                            {"principal": "dana", "token_sha256": token_sha256(DANA_TOKEN)}])
    # The face's own principal is never used once tokens are configured.
    face = McpFace(gateway, principal="mallory")
    with serving(http_app(face, host="127.0.0.1", tokens=tokens, audit=store)) as url:
        yield url


async def as_client(url: str, token: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=60) as http, Client(
            streamable_http_client(url, http_client=http)) as client:
        dropped = await client.call_tool("drop_table", {"table": "users"})
        squared = await client.call_tool("square", {"x": 3})
    return {"drop_table": dropped.structured_content["kind"],
            "square": squared.structured_content["kind"]}


async def raw_post(url: str, headers: Mapping[str, str]) -> int:
    initialize = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"}}}
    async with httpx2.AsyncClient(timeout=30) as http:
        answer = await http.post(url, json=initialize, headers={
            "accept": "application/json, text/event-stream", **headers})
        return answer.status_code


class TestBearerPrincipals:
    def test_two_tokens_are_two_principals_each_under_its_policy(self, url, store):
        """alice (analyst) may not drop tables, dana (dba) may; the log names each."""
        alice = anyio.run(as_client, url, ALICE_TOKEN)
        dana = anyio.run(as_client, url, DANA_TOKEN)

        assert {"drop_table": "permission", "square": "ok"} == alice
        assert {"drop_table": "ok", "square": "ok"} == dana
        decided = [(r.body["principal"], r.body["call"]["name"], r.kind)
                   for r in store.records() if r.kind in {"call.denied", "call.authorized"}]
        assert [("alice", "drop_table", "call.denied"), ("alice", "square", "call.authorized"),
                ("dana", "drop_table", "call.authorized"),
                ("dana", "square", "call.authorized")] == decided
        assert "mallory" not in {r.body.get("principal") for r in store.records()}

    @pytest.mark.parametrize(("headers", "reason"), [
        ({}, "missing_token"),
        ({"Authorization": "Bearer not-a-configured-token"}, "unknown_token"),
        ({"Authorization": f"Basic {ALICE_TOKEN}"}, "not_bearer"),
        ({"Authorization": f"Bearer {ALICE_TOKEN}x"}, "unknown_token"),
    ])
    def test_missing_or_unknown_tokens_get_401_and_are_audited(self, url, store, headers,
                                                                reason):
        """Nothing reaches the MCP server; the refusal is signed, the token never written."""
        status = anyio.run(raw_post, url, headers)

        assert 401 == status
        refused = [r for r in store.records() if r.kind == "mcp.client_refused"]
        assert [reason] == [r.body["reason"] for r in refused]
        assert ALICE_TOKEN not in str(refused[0].body)
        assert not any(r.kind.startswith("call.") for r in store.records())

    def test_the_sdk_client_without_a_token_cannot_connect(self, url, store):
        """The SDK's client is refused at initialize; the refusal is audited."""
        async def connect() -> None:
            async with Client(url):
                pass

        with pytest.raises(Exception):  # noqa: B017, PT011 - the SDK wraps the 401 its own way
            anyio.run(connect)
        assert "mcp.client_refused" in {r.kind for r in store.records()}


class TestParseClients:
    def test_tokens_are_configured_as_hashes_only(self):
        """A clear-text token in place of a hash is refused, as is one hash for two names."""
        with pytest.raises(ConfigurationError, match="token_sha256"):
            parse_clients([{"principal": "alice", "token_sha256": ALICE_TOKEN}])
        digest = token_sha256(ALICE_TOKEN)
        with pytest.raises(ConfigurationError, match="two principals"):
            parse_clients([{"principal": "alice", "token_sha256": digest},
                           {"principal": "bob", "token_sha256": digest}])

    def test_principal_for(self):
        """The configured token maps to its principal; anything else to none."""
        tokens = parse_clients([{"principal": "alice", "token_sha256": token_sha256("t1")}])

        assert tokens is not None
        assert ("alice", None, None) == (tokens.principal_for("t1"), tokens.principal_for("t2"),
                                         tokens.principal_for("x" * 5000))
