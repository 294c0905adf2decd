"""
`callward mcp serve --transport http` with `mcp.auth.oidc` in callward.yaml: a client
with a JWT access token (an Ed25519 key made here, its JWKS a file beside the
configuration) is its token's principal with its token's roles, end to end through the
CLI, the real sandbox and the signed log; a static token still works beside it.
"""

from __future__ import annotations

import json
import shutil
import time

import anyio
import httpx2
import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import ed25519
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from callward.audit import read_records
from callward.core.mcp._auth import token_sha256
from tests.integration.mcp._mcp_serve import mcp_serve_http

ISSUER = "https://login.example.com/"


class TestServeHttpOidc:
    def test_a_token_principal_end_to_end(self, cli, engine, home, examples, tmp_path):
        """
        erin is in no policy file; her token's role dba lets her drop a table (it runs in
        the sandbox), a forged one is a 401, and dana's static token still decides as dana.
        """
        key = ed25519.Ed25519PrivateKey.generate()
        jwk = {**jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key(), as_dict=True),
               "kid": "k1", "use": "sig"}
        (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
        for name in ("tools.py", "policy.yaml"):
            shutil.copy(examples / name, tmp_path / name)
        config = tmp_path / "callward.yaml"
        config.write_text(yaml.safe_dump({
            "tools": ["tools.py"], "policy": "policy.yaml",
            "mcp": {"clients": [{"principal": "dana", "token_sha256": token_sha256("t-dana")}],
                    "auth": {"oidc": {"issuer": ISSUER, "audience": "callward",
                                      "jwks": "jwks.json", "roles_claim": "roles"}}}}))
        now = int(time.time())
        token = jwt.encode({"iss": ISSUER, "aud": "callward", "sub": "erin", "exp": now + 600,
                            "iat": now, "jti": "e2e-1", "roles": ["dba"]},
                           key, algorithm="EdDSA", headers={"kid": "k1"})
        forged = jwt.encode({"iss": ISSUER, "aud": "callward", "sub": "erin",
                             "exp": now + 600, "roles": ["dba"]},
                            ed25519.Ed25519PrivateKey.generate(), algorithm="EdDSA",
                            headers={"kid": "k1"})
        async def exercise() -> tuple[str, str, int]:
            kinds = []
            for bearer in (token, "t-dana"):
                async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {bearer}"},
                                              timeout=60) as http, Client(
                        streamable_http_client(url, http_client=http)) as client:
                    result = await client.call_tool("drop_table", {"table": "users"})
                    kinds.append(result.structured_content["kind"])
            async with httpx2.AsyncClient(timeout=30) as http:
                refused = await http.post(url, json={"jsonrpc": "2.0", "id": 0,
                                                     "method": "ping"},
                                          headers={"Authorization": f"Bearer {forged}"})
            return kinds[0], kinds[1], refused.status_code

        with mcp_serve_http(home, "--config", str(config)) as url:
            erin, dana, status = anyio.run(exercise)

        assert ("ok", "ok", 401) == (erin, dana, status)
        records = list(read_records(home / "audit.db"))
        decided = {(r.body["principal"], r.kind, (r.body.get("identity") or {}).get("issuer"))
                   for r in records if r.kind == "call.authorized"}
        assert {("erin", "call.authorized", ISSUER), ("dana", "call.authorized", None)} == decided
        assert ["bad_signature"] == [r.body["reason"] for r in records
                                     if r.kind == "mcp.client_refused"]
        stored = b"".join(path.read_bytes() for path in home.rglob("audit.db*")
                          if path.is_file())
        assert token.encode() not in stored
        verified = cli("audit", "verify")
        assert 0 == verified.returncode, verified.stdout + verified.stderr
