"""The SDK's own client against `callward mcp serve`, over stdio and Streamable HTTP."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import yaml
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from callward.audit import read_records
from callward.core.mcp._auth import token_sha256
from tests.integration.mcp._mcp_serve import mcp_serve_http


def _serve_args(home: Path, examples: Path, *extra: str) -> list[str]:
    return ["-m", "callward.core.cli", "--home", str(home), "mcp", "serve",
            "--config", str(examples / "callward.yaml"), "--principal", "alice", *extra]


async def _exercise(target: Any) -> dict[str, Any]:
    """List tools, then call an allowed, a denied and a limit-tripping tool."""
    async with Client(target, read_timeout_seconds=60) as client:
        listed = await client.list_tools()
        allowed = await client.call_tool("square", {"x": 12})
        denied = await client.call_tool("drop_table", {"table": "users"})
        limited = await client.call_tool("spin", {"seconds": 30})
        outside = await client.call_tool("square", {"x": "twelve"})
    return {"tools": sorted(tool.name for tool in listed.tools), "allowed": allowed,
            "denied": denied, "limited": limited, "outside": outside}


def _check(seen: dict[str, Any], cli: Any) -> None:
    # alice, an analyst, is not shown drop_table (a DBA's tool), and its call is denied.
    assert ["add", "capital", "spin", "square"] == seen["tools"]
    allowed = seen["allowed"]
    assert (False, "144") == (allowed.is_error, allowed.content[0].text)
    assert "ok" == allowed.structured_content["kind"]
    assert allowed.structured_content["receipt"]["seq"] >= 2
    for name, kind in (("denied", "permission"), ("limited", "timeout"),
                       ("outside", "schema")):
        result = seen[name]
        assert (True, kind) == (result.is_error, result.structured_content["kind"])
        assert kind == result.meta["callward/kind"]
    verified = cli("audit", "verify")
    assert 0 == verified.returncode, verified.stdout + verified.stderr


class TestServeStdio:
    def test_sdk_client_over_stdio(self, cli, engine, home, examples):
        """
        Over stdio, the SDK client lists the registry and every call ends in its kind,
        with a receipt, and the log verifies.
        """
        params = StdioServerParameters(command=sys.executable,
                                       args=_serve_args(home, examples),
                                       env={**os.environ})

        seen = anyio.run(_exercise, params)

        _check(seen, cli)


@pytest.fixture(name="http_server")
def _http_server(home: Path, examples: Path) -> Iterator[str]:
    """`callward mcp serve --transport http` on a free loopback port; its URL."""
    with mcp_serve_http(home, "--config", str(examples / "callward.yaml"),
                        "--principal", "alice") as url:
        yield url


class TestServeHttp:
    def test_sdk_client_over_streamable_http(self, cli, engine, http_server):
        """Over Streamable HTTP on loopback, the same calls end in the same kinds."""
        seen = anyio.run(_exercise, http_server)

        _check(seen, cli)

    def test_non_loopback_host_is_refused(self, cli, examples):
        """`mcp serve` refuses to listen anywhere but loopback: exit 2."""
        done = cli("mcp", "serve", "--config", str(examples / "callward.yaml"),
                   "--principal", "alice", "--transport", "http", "--host", "0.0.0.0")  # noqa: S104 - refused

        assert 2 == done.returncode
        assert "loopback" in done.stderr


class TestServeHttpClients:
    def test_bearer_tokens_from_the_configuration(self, cli, engine, home, examples, tmp_path):
        """
        With `mcp.clients` in callward.yaml, `mcp serve --transport http` needs no
        --principal: each client is its token's principal, a call is decided as it,
        a request without a token is a 401 (audited); stdio still needs --principal.
        """
        for name in ("tools.py", "policy.yaml"):
            shutil.copy(examples / name, tmp_path / name)
        config = tmp_path / "callward.yaml"
        config.write_text(yaml.safe_dump({
            "tools": ["tools.py"], "policy": "policy.yaml",
            "mcp": {"clients": [{"principal": "dana", "token_sha256": token_sha256("t-dana")},
                                {"principal": "mallory",
                                 "token_sha256": token_sha256("t-mallory")}]}}))
        stdio = cli("mcp", "serve", "--config", str(config))
        async def exercise() -> tuple[str, str, int]:
            kinds = []
            for token in ("t-dana", "t-mallory"):
                async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                              timeout=60) as http, Client(
                        streamable_http_client(url, http_client=http)) as client:
                    result = await client.call_tool("drop_table", {"table": "users"})
                    kinds.append(result.structured_content["kind"])
            async with httpx2.AsyncClient(timeout=30) as http:
                refused = await http.post(url, json={"jsonrpc": "2.0", "id": 0,
                                                     "method": "ping"})
            return kinds[0], kinds[1], refused.status_code

        with mcp_serve_http(home, "--config", str(config)) as url:
            dana, mallory, status = anyio.run(exercise)

        assert 2 == stdio.returncode
        assert "--principal" in stdio.stderr
        assert ("ok", "permission", 401) == (dana, mallory, status)
        decided = {(r.body["principal"], r.kind) for r in read_records(home / "audit.db")
                   if r.kind in {"call.authorized", "call.denied"}}
        assert {("dana", "call.authorized"), ("mallory", "call.denied")} == decided
        assert ["missing_token"] == [r.body["reason"] for r in read_records(
            home / "audit.db", kind="mcp.client_refused")]
        verified = cli("audit", "verify")
        assert 0 == verified.returncode, verified.stdout + verified.stderr
