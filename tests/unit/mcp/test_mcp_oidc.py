"""
OIDC access tokens: real keys generated here (RSA, P-256, Ed25519), tokens signed with
PyJWT or by hand (for the forgeries), and the JWKS served by a real HTTP server on
loopback that counts its requests, so the cache and its refresh limit are observed at
the server.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from callward.audit import SQLiteAuditStore
from callward.core import ConfigurationError, Identity
from callward.core.gateway import Gateway
from callward.core.mcp._auth import parse_clients, token_sha256
from callward.core.mcp._jwks import MAX_JWKS_BYTES, parse_jwks
from callward.core.mcp._oidc import (
    MAX_TOKEN_BYTES,
    OidcSettings,
    OidcVerifier,
    TokenRefused,
    looks_like_jwt,
    parse_oidc,
)
from callward.core.mcp._server import McpFace, http_app
from tests.unit.mcp._serving import serving

ISSUER = "https://login.example.com/"
AUDIENCE = "callward"
NOW = 1_900_000_000.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if self.alg == "RS256":
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
        elif self.alg == "ES256":
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = jwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig"}

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(claims, self.private, algorithm=self.alg,
                          headers={"kid": self.kid, **header})


@pytest.fixture(name="keys", scope="module")
def _keys() -> dict[str, SigningKey]:
    """One key of each kind, and a second RSA key for rotation."""
    return {
        "rsa": SigningKey("rsa-1", "RS256", rsa.generate_private_key(65537, 2048)),
        "rsa2": SigningKey("rsa-2", "RS256", rsa.generate_private_key(65537, 2048)),
        "ec": SigningKey("ec-1", "ES256", ec.generate_private_key(ec.SECP256R1())),
        "ed": SigningKey("ed-1", "EdDSA", ed25519.Ed25519PrivateKey.generate()),
    }


@dataclass
class JwksServer:
    """A JWKS on 127.0.0.1; ``document`` may be changed while it serves."""

    document: bytes = b""
    status: int = 200
    requests: int = 0
    #: Send the body one byte every 0.2 s.
    drip: bool = False
    #: Answer 302 to this location instead.
    redirect: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def publish(self, *keys: SigningKey, extra: tuple[dict[str, Any], ...] = ()) -> None:
        self.document = json.dumps({"keys": [k.jwk() for k in keys] + list(extra)}).encode()


@pytest.fixture(name="jwks_server")
def _jwks_server() -> Iterator[JwksServer]:
    state = JwksServer()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with state.lock:
                state.requests += 1
            body = state.document
            if state.redirect is not None:
                self.send_response(302)
                self.send_header("location", state.redirect)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            self.send_response(state.status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            if not state.drip:
                self.wfile.write(body)
                return
            with contextlib.suppress(OSError):  # the client may hang up mid-drip
                for index in range(min(len(body), 30)):
                    self.wfile.write(body[index:index + 1])
                    self.wfile.flush()
                    time.sleep(0.2)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class Clocks:
    """The wall clock (for exp/nbf/iat) and the monotonic one (for the JWKS cache)."""

    def __init__(self) -> None:
        self.now = NOW
        self.monotonic = 1000.0


@pytest.fixture(name="clocks")
def _clocks() -> Clocks:
    return Clocks()


def make_verifier(url: str, clocks: Clocks, **settings: Any) -> OidcVerifier:
    options: dict[str, Any] = {"roles_claim": "roles", "groups_claim": "groups"}
    options.update(settings)
    return OidcVerifier(OidcSettings(issuer=ISSUER, audience=AUDIENCE, jwks=url, **options),
                        clock=lambda: clocks.now, monotonic=lambda: clocks.monotonic)


def claims(**override: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "erin",
                            "exp": int(NOW) + 300, "iat": int(NOW) - 10, "nbf": int(NOW) - 10,
                            "jti": "token-1", "roles": ["dba"], "groups": ["emea"]}
    base.update(override)
    return {k: v for k, v in base.items() if v is not None}


def refused(verifier: OidcVerifier, token: str) -> str:
    with pytest.raises(TokenRefused) as caught:
        verifier.verify(token)
    return caught.value.reason


@pytest.fixture(name="verifier")
def _verifier(jwks_server: JwksServer, keys: dict[str, SigningKey],
              clocks: Clocks) -> OidcVerifier:
    """A verifier of the loopback JWKS, which holds the RSA, EC and Ed25519 keys."""
    jwks_server.publish(keys["rsa"], keys["ec"], keys["ed"])
    return make_verifier(jwks_server.url, clocks)


class TestGoodTokens:
    @pytest.mark.parametrize("kind", ["rsa", "ec", "ed"])
    def test_each_algorithm_verifies(self, verifier, keys, kind):
        """RS256, ES256 and EdDSA tokens name their principal, roles, groups and jti hash."""
        verified = verifier.verify(keys[kind].sign(claims()))

        assert "erin" == verified.principal
        assert Identity(ISSUER, frozenset({"dba"}), frozenset({"emea"}),
                        hashlib.sha256(b"token-1").hexdigest()) == verified.identity

    def test_audience_may_be_a_list_and_leeway_applies(self, verifier, keys, clocks):
        """aud as a list containing ours is accepted; exp 30 s past is within the leeway."""
        token = keys["rsa"].sign(claims(aud=["other", AUDIENCE], exp=int(NOW) - 30))

        assert "erin" == verifier.verify(token).principal

    def test_principal_claim_and_single_string_roles(self, jwks_server, keys, clocks):
        """principal_claim email; a roles claim given as one string is one role."""
        jwks_server.publish(keys["rsa"])
        verifier = make_verifier(jwks_server.url, clocks, principal_claim="email")

        verified = verifier.verify(keys["rsa"].sign(claims(email="erin@example.com",
                                                           roles="dba", groups=None, jti=None)))

        assert ("erin@example.com", frozenset({"dba"}), frozenset(), None) == (
            verified.principal, verified.identity.roles, verified.identity.groups,
            verified.identity.token_id_sha256)

    def test_the_jwks_is_fetched_once_for_many_tokens(self, verifier, keys, jwks_server):
        """The JWKS is cached: ten tokens, one request at the server."""
        for number in range(10):
            verifier.verify(keys["ec"].sign(claims(jti=f"t{number}")))

        assert 1 == jwks_server.requests


class TestRefusedClaims:
    @pytest.mark.parametrize(("override", "reason"), [
        ({"exp": int(NOW) - 61}, "expired"),
        ({"nbf": int(NOW) + 61}, "not_yet_valid"),
        ({"iat": int(NOW) + 61}, "not_yet_valid"),
        ({"aud": "another-service"}, "wrong_audience"),
        ({"aud": ["a", "b"]}, "wrong_audience"),
        ({"iss": "https://evil.example.com/"}, "wrong_issuer"),
        ({"exp": None}, "missing_claim"),
        ({"aud": None}, "missing_claim"),
        ({"iss": None}, "missing_claim"),
        ({"sub": None}, "missing_claim"),
        ({"sub": ""}, "invalid_claim"),
        ({"sub": 42}, "invalid_claim"),
        ({"exp": "tomorrow"}, "invalid_claim"),
        ({"nbf": True}, "invalid_claim"),
        ({"roles": [1, 2]}, "invalid_claim"),
        ({"roles": {"dba": True}}, "invalid_claim"),
        ({"jti": 7}, "invalid_claim"),
    ])
    def test_claims_that_fail(self, verifier, keys, override, reason):
        """Each failed claim check refuses the token with its own reason."""
        assert reason == refused(verifier, keys["rsa"].sign(claims(**override)))


class TestForgeries:
    def test_alg_none_is_refused(self, verifier, keys):
        """An unsigned token (alg none), even naming a known kid, is refused."""
        header = b64url(json.dumps({"alg": "none", "typ": "JWT", "kid": "rsa-1"}).encode())
        payload = b64url(json.dumps(claims()).encode())

        assert "alg_not_allowed" == refused(verifier, f"{header}.{payload}.")

    def test_hs256_signed_with_the_public_key_is_refused(self, verifier, keys):
        """The confusion attack: HMAC keyed with the RSA public key PEM, kid of that key."""
        pem = keys["rsa"].private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
        payload = b64url(json.dumps(claims(roles=["admin"])).encode())
        signature = b64url(hmac.new(pem, f"{header}.{payload}".encode(), "sha256").digest())

        assert "alg_not_allowed" == refused(verifier, f"{header}.{payload}.{signature}")

    def test_rs256_header_with_the_kid_of_an_ec_key_is_refused(self, verifier, keys):
        """alg RS256 but kid names the P-256 key: the key does not fit the algorithm."""
        token = jwt.encode(claims(), keys["rsa"].private, algorithm="RS256",
                           headers={"kid": "ec-1"})

        assert "key_mismatch" == refused(verifier, token)

    def test_a_signature_by_another_key_is_refused(self, verifier, keys):
        """Signed by a key that is not in the JWKS, under the kid of one that is."""
        token = jwt.encode(claims(), keys["rsa2"].private, algorithm="RS256",
                           headers={"kid": "rsa-1"})

        assert "bad_signature" == refused(verifier, token)

    def test_a_changed_payload_breaks_the_signature(self, verifier, keys):
        """A claim changed after signing (roles raised) is a bad signature."""
        header, _, signature = keys["ed"].sign(claims()).split(".")
        payload = b64url(json.dumps(claims(roles=["admin"])).encode())

        assert "bad_signature" == refused(verifier, f"{header}.{payload}.{signature}")

    def test_an_algorithm_not_allowed_by_the_configuration(self, jwks_server, keys, clocks):
        """With algorithms [ES256] only, a valid RS256 token is refused."""
        jwks_server.publish(keys["rsa"], keys["ec"])
        verifier = make_verifier(jwks_server.url, clocks, algorithms=("ES256",))

        assert "alg_not_allowed" == refused(verifier, keys["rsa"].sign(claims()))
        assert "erin" == verifier.verify(keys["ec"].sign(claims())).principal

    def test_a_jwk_declaring_another_alg_is_not_used_for_this_one(self, jwks_server, keys,
                                                                  clocks):
        """A key whose JWK says alg PS256 does not verify an RS256 token."""
        jwks_server.document = json.dumps(
            {"keys": [{**keys["rsa"].jwk(), "alg": "PS256"}]}).encode()
        verifier = make_verifier(jwks_server.url, clocks)

        assert "key_mismatch" == refused(verifier, keys["rsa"].sign(claims()))

    @pytest.mark.parametrize(("token", "reason"), [
        ("not a token", "malformed_token"), ("a.b", "malformed_token"),
        ("a.b.c.d", "malformed_token"), ("....", "malformed_token"),
        ("!!!.???.###", "malformed_token"), ("e30.e30.", "alg_not_allowed"),
        (b64url(b"[1,2]") + "." + b64url(b"{}") + ".c2ln", "malformed_token"),
        # The signature is checked before the payload is read at all.
        (b64url(b'{"alg":"RS256","kid":"rsa-1"}') + ".bm90IGpzb24.c2ln", "bad_signature"),
    ])
    def test_garbage_is_refused(self, verifier, token, reason):
        """Anything that is not a signed compact JWS is refused."""
        assert reason == refused(verifier, token)

    def test_an_oversized_token_is_refused_unread(self, verifier, keys, jwks_server):
        """A token over the size cap is refused before the JWKS is even fetched."""
        token = keys["rsa"].sign(claims(groups=["g" * 200] * 100))
        assert len(token) > MAX_TOKEN_BYTES

        assert "malformed_token" == refused(verifier, token)
        assert 0 == jwks_server.requests

    def test_a_token_without_kid(self, verifier, keys):
        """A header without kid names no key."""
        token = jwt.encode(claims(), keys["rsa"].private, algorithm="RS256")

        assert "missing_kid" == refused(verifier, token)


class TestJwksRefresh:
    def test_unknown_kid_then_rotated_in_is_accepted_after_refresh(self, verifier, keys,
                                                                  jwks_server, clocks):
        """A new kid fetches the JWKS again (once the refresh interval passed) and verifies."""
        verifier.verify(keys["rsa"].sign(claims()))
        jwks_server.publish(keys["rsa"], keys["rsa2"])
        clocks.monotonic += 31

        verified = verifier.verify(keys["rsa2"].sign(claims()))

        assert "erin" == verified.principal
        assert 2 == jwks_server.requests

    def test_unknown_kids_refetch_at_most_once_per_interval(self, verifier, keys, jwks_server,
                                                            clocks):
        """Within 30 s of a fetch, unknown kids are refused without asking the server."""
        verifier.verify(keys["rsa"].sign(claims()))  # first fetch
        clocks.monotonic += 31
        assert "unknown_kid" == refused(verifier, keys["rsa2"].sign(claims()))  # refetch
        jwks_server.publish(keys["rsa"], keys["rsa2"])  # rotated in just after
        clocks.monotonic += 10

        assert "unknown_kid" == refused(verifier, keys["rsa2"].sign(claims()))
        assert "unknown_kid" == refused(verifier, keys["rsa2"].sign(claims(jti="x")))
        assert 2 == jwks_server.requests
        assert "erin" == verifier.verify(keys["rsa"].sign(claims())).principal
        clocks.monotonic += 21
        assert "erin" == verifier.verify(keys["rsa2"].sign(claims())).principal
        assert 3 == jwks_server.requests

    def test_a_removed_key_stops_verifying_when_the_cache_ages(self, jwks_server, keys,
                                                               clocks):
        """After jwks_cache_seconds the JWKS is fetched again; a key taken out is unknown."""
        jwks_server.publish(keys["rsa"], keys["ec"])
        verifier = make_verifier(jwks_server.url, clocks, jwks_cache_seconds=600)
        verifier.verify(keys["rsa"].sign(claims()))
        jwks_server.publish(keys["ec"])
        clocks.monotonic += 601

        assert "unknown_kid" == refused(verifier, keys["rsa"].sign(claims()))
        assert 2 == jwks_server.requests


class TestJwksUnavailable:
    def test_unreachable_jwks_refuses(self, keys, clocks):
        """Nothing listens at the JWKS url: every token is refused (fail closed)."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        verifier = make_verifier(f"http://127.0.0.1:{port}/jwks.json", clocks,
                                 jwks_timeout_seconds=2)

        assert "jwks_unavailable" == refused(verifier, keys["rsa"].sign(claims()))

    @pytest.mark.parametrize(("status", "document"), [
        (500, b'{"keys": []}'),
        (200, b"<html>not json</html>"),
        (200, b'{"no": "keys"}'),
        (200, b'{"keys": [' + b'{"kty": "RSA"},' * (MAX_JWKS_BYTES // 14) + b"{}]}"),
    ])
    def test_a_broken_jwks_refuses(self, jwks_server, keys, clocks, status, document):
        """An error status, not JSON, no keys list, or over the size cap: jwks_unavailable."""
        jwks_server.status, jwks_server.document = status, document
        verifier = make_verifier(jwks_server.url, clocks)

        assert "jwks_unavailable" == refused(verifier, keys["rsa"].sign(claims()))

    def test_a_redirect_is_not_followed(self, jwks_server, keys, clocks):
        """A JWKS url answering 302 (here to the same JWKS) is refused, not followed."""
        jwks_server.publish(keys["rsa"])
        jwks_server.redirect = jwks_server.url
        verifier = make_verifier(jwks_server.url, clocks)

        assert "jwks_unavailable" == refused(verifier, keys["rsa"].sign(claims()))
        assert 1 == jwks_server.requests

    def test_a_slow_drip_is_cut_at_the_timeout(self, jwks_server, keys, clocks):
        """
        A server sending a byte every 0.2 s (30 bytes: 6 s) cannot hold a fetch much past
        its whole timeout of 1 s, though no single read waits that long.
        """
        jwks_server.publish(keys["rsa"])
        jwks_server.drip = True
        verifier = make_verifier(jwks_server.url, clocks, jwks_timeout_seconds=1)
        started = time.monotonic()

        assert "jwks_unavailable" == refused(verifier, keys["rsa"].sign(claims()))
        assert time.monotonic() - started < 3.5

    def test_a_stale_cache_whose_refetch_fails_refuses(self, jwks_server, keys, clocks):
        """Past its age, keys that cannot be fetched again are no longer trusted."""
        jwks_server.publish(keys["rsa"])
        verifier = make_verifier(jwks_server.url, clocks, jwks_cache_seconds=600)
        verifier.verify(keys["rsa"].sign(claims()))
        jwks_server.status = 503
        clocks.monotonic += 601

        assert "jwks_unavailable" == refused(verifier, keys["rsa"].sign(claims()))
        jwks_server.status = 200
        clocks.monotonic += 31
        assert "erin" == verifier.verify(keys["rsa"].sign(claims())).principal

    def test_a_jwks_file(self, tmp_path, keys, clocks):
        """jwks may be a file; a relative path is resolved against the configuration."""
        (tmp_path / "jwks.json").write_text(json.dumps({"keys": [keys["ed"].jwk()]}))
        settings = parse_oidc({"oidc": {"issuer": ISSUER, "audience": AUDIENCE,
                                        "jwks": "jwks.json"}}, base=tmp_path)
        assert settings is not None
        verifier = OidcVerifier(settings, clock=lambda: clocks.now)

        assert "erin" == verifier.verify(keys["ed"].sign(claims())).principal


class TestParseJwks:
    def test_symmetric_encryption_and_doubled_keys_are_left_out(self, keys):
        """oct keys, use enc, no kid, and a kid given twice are not signing keys here."""
        document = json.dumps({"keys": [
            {"kty": "oct", "kid": "hmac", "k": b64url(b"secret")},
            {**keys["rsa"].jwk(), "use": "enc", "kid": "enc"},
            {k: v for k, v in keys["ec"].jwk().items() if k != "kid"},
            {**keys["rsa"].jwk(), "kid": "twice"}, {**keys["ec"].jwk(), "kid": "twice"},
            keys["ed"].jwk(),
        ]}).encode()

        assert ["ed-1"] == sorted(parse_jwks(document))


class TestConfiguration:
    def test_defaults(self, tmp_path):
        """principal sub, no roles or groups claims, 60 s leeway, RS256/ES256/EdDSA."""
        settings = parse_oidc({"oidc": {"issuer": ISSUER, "audience": AUDIENCE,
                                        "jwks": "https://login.example.com/jwks"}},
                              base=tmp_path)

        assert settings == OidcSettings(ISSUER, AUDIENCE, "https://login.example.com/jwks")
        assert (60.0, ("RS256", "ES256", "EdDSA"), 30.0) == (
            settings.leeway_seconds, settings.algorithms, settings.jwks_refresh_seconds)

    @pytest.mark.parametrize(("oidc", "message"), [
        ({"issuer": ISSUER, "audience": AUDIENCE}, "'jwks' is a required property"),
        ({"issuer": ISSUER, "audience": AUDIENCE, "jwks": "x", "algorithms": ["HS256"]},
         "algorithms"),
        ({"issuer": ISSUER, "audience": AUDIENCE, "jwks": "x", "algorithms": ["none"]},
         "algorithms"),
        ({"issuer": ISSUER, "audience": AUDIENCE, "jwks": "x", "leeway_seconds": 3600},
         "leeway_seconds"),
        ({"issuer": ISSUER, "audience": AUDIENCE, "jwks": "http://login.example.com/jwks"},
         "https"),
        ({"issuer": ISSUER, "audience": AUDIENCE, "jwks": "ftp://login.example.com/jwks"},
         "https"),
        ({"issuer": ISSUER, "audience": AUDIENCE, "jwks": "x", "secret": "y"},
         "Additional properties"),
        ({"issuer": ISSUER, "audience": AUDIENCE, "jwks": "x", "jwks_refresh_seconds": 0},
         "jwks_refresh_seconds"),
        ({"issuer": ISSUER, "audience": AUDIENCE, "jwks": "x", "jwks_refresh_seconds": 60,
          "jwks_cache_seconds": 30}, "at least"),
    ])
    def test_invalid_sections(self, tmp_path, oidc, message):
        """HMAC or none cannot be allowed, plain HTTP only to loopback, no unknown keys."""
        with pytest.raises(ConfigurationError, match=message):
            parse_oidc({"oidc": oidc}, base=tmp_path)

    def test_looks_like_jwt(self):
        """Three base64url parts; a static token of letters and dashes is not one."""
        assert (True, False, False) == (looks_like_jwt("ab.cd.ef"),
                                        looks_like_jwt("alice-" + "a" * 40),
                                        looks_like_jwt("a.b.c.d"))

    def test_absent(self):
        """No auth section, or one without oidc: no verifier."""
        assert (None, None) == (parse_oidc(None, base=Path()), parse_oidc({}, base=Path()))


# -- through the MCP HTTP face -------------------------------------------------------

ALICE_TOKEN = "alice-" + "a" * 40


@pytest.fixture(name="face_url")
def _face_url(gateway: Gateway, store: SQLiteAuditStore, jwks_server: JwksServer,
              keys: dict[str, SigningKey]) -> Iterator[str]:
    """
    The example gateway served over HTTP with OIDC (the loopback JWKS) and alice's
    static token beside it; the verifier runs on the real clock.
    """
    jwks_server.publish(keys["rsa"], keys["ec"], keys["ed"])
    verifier = OidcVerifier(OidcSettings(issuer=ISSUER, audience=AUDIENCE, jwks=jwks_server.url,
                                         roles_claim="roles", groups_claim="groups"))
    tokens = parse_clients([{"principal": "alice", "token_sha256": token_sha256(ALICE_TOKEN)}])
    face = McpFace(gateway, principal="mallory")
    with serving(http_app(face, host="127.0.0.1", tokens=tokens, audit=store,
                          oidc=verifier)) as url:
        yield url


def live_claims(**override: Any) -> dict[str, Any]:
    """Claims valid on the real clock: erin, not in the policy file, with role dba."""
    now = int(time.time())
    return claims(**{"exp": now + 300, "iat": now - 5, "nbf": now - 5, **override})


async def as_client(url: str, token: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=60) as http, Client(
            streamable_http_client(url, http_client=http)) as client:
        listed = await client.list_tools()
        dropped = await client.call_tool("drop_table", {"table": "users"})
        squared = await client.call_tool("square", {"x": 3})
    return {"listed": sorted(tool.name for tool in listed.tools),
            "drop_table": dropped.structured_content["kind"],
            "square": squared.structured_content["kind"]}


async def raw_post(url: str, headers: dict[str, str]) -> httpx2.Response:
    initialize = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"}}}
    async with httpx2.AsyncClient(timeout=30) as http:
        return await http.post(url, json=initialize, headers={
            "accept": "application/json, text/event-stream", **headers})


class TestOidcFace:
    def test_a_token_role_allows_what_the_policy_permits_that_role(self, face_url, store,
                                                                   keys, tmp_path):
        """
        erin is in no policy file; the token's role dba lets her drop tables (a rule for
        Role dba) but not square (analysts and guests only); the listing agrees. Every
        call record names erin with the issuer and the jti's hash, never the token.
        """
        token = keys["ec"].sign(live_claims(jti="run-42"))

        seen = anyio.run(as_client, face_url, token)

        assert {"listed": ["drop_table"], "drop_table": "ok", "square": "permission"} == seen
        calls = [r for r in store.records() if r.kind.startswith("call.")]
        assert ["call.authorized", "call.completed", "call.denied"] == [r.kind for r in calls]
        expected = {"issuer": ISSUER, "roles": ["dba"], "groups": ["emea"],
                    "token_id_sha256": hashlib.sha256(b"run-42").hexdigest()}
        assert [expected] * 3 == [r.body["identity"] for r in calls]
        assert {"erin"} == {r.body["principal"] for r in calls if "principal" in r.body}
        store.close()
        stored = b"".join(path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())
        assert b"erin" in stored  # the records are readable here, so absence means absent
        assert b"run-42" not in stored
        assert token.encode() not in stored
        assert token.split(".")[2].encode() not in stored

    @pytest.mark.parametrize(("make_token", "reason", "described"), [
        (lambda keys: keys["rsa"].sign(live_claims(exp=int(time.time()) - 120)), "expired",
         "the token has expired"),
        (lambda keys: keys["rsa"].sign(live_claims(aud="another")), "wrong_audience",
         "the token is meant for another audience"),
        (lambda keys: keys["rsa2"].sign(live_claims()), "unknown_kid",
         "the token's signing key is not known"),
    ])
    def test_a_refused_token_is_a_401_with_a_challenge_and_audited(
            self, face_url, store, keys, make_token, reason, described):
        """401, WWW-Authenticate with error invalid_token and a general description,
        and a signed mcp.client_refused naming the reason and the issuer; no call ran."""
        token = make_token(keys)

        answer = anyio.run(raw_post, face_url, {"Authorization": f"Bearer {token}"})

        assert 401 == answer.status_code
        assert (f'Bearer realm="callward", error="invalid_token", '
                f'error_description="{described}"') == answer.headers["www-authenticate"]
        refused_records = [r for r in store.records() if r.kind == "mcp.client_refused"]
        assert [(reason, ISSUER)] == [(r.body["reason"], r.body["issuer"])
                                      for r in refused_records]
        assert token not in json.dumps(refused_records[0].body)
        assert not any(r.kind.startswith("call.") for r in store.records())

    def test_a_missing_token_is_challenged_without_an_error(self, face_url, store):
        """RFC 6750: a request with no credentials gets the realm and no error code."""
        answer = anyio.run(raw_post, face_url, {})

        assert (401, 'Bearer realm="callward"') == (answer.status_code,
                                                     answer.headers["www-authenticate"])
        assert ["missing_token"] == [r.body["reason"] for r in store.records()
                                     if r.kind == "mcp.client_refused"]

    def test_a_static_token_still_works_beside_oidc(self, face_url, store):
        """alice's configured token: alice's roles from the policy file, no identity."""
        seen = anyio.run(as_client, face_url, ALICE_TOKEN)

        assert {"listed": ["add", "capital", "spin", "square"], "drop_table": "permission",
                "square": "ok"} == seen
        calls = [r for r in store.records() if r.kind.startswith("call.")]
        assert all("identity" not in r.body for r in calls)
        assert {"alice"} == {r.body["principal"] for r in calls if "principal" in r.body}

    def test_an_unknown_static_token_is_still_refused(self, face_url, store):
        """A non-JWT token that is not configured is unknown_token, challenged as invalid."""
        answer = anyio.run(raw_post, face_url, {"Authorization": "Bearer not-configured"})

        assert 401 == answer.status_code
        assert 'error="invalid_token"' in answer.headers["www-authenticate"]
        assert ["unknown_token"] == [r.body["reason"] for r in store.records()
                                     if r.kind == "mcp.client_refused"]

    def test_oidc_alone_refuses_a_token_that_is_no_jwt(self, gateway, store, jwks_server,
                                                        keys):
        """
        Without static tokens, a bearer token that is not a JWT is malformed_token; a JWT is
        accepted, and without roles_claim its roles claim is not read (erin stays roleless).
        """
        jwks_server.publish(keys["ed"])
        verifier = OidcVerifier(OidcSettings(issuer=ISSUER, audience=AUDIENCE,
                                             jwks=jwks_server.url))
        app = http_app(McpFace(gateway, principal="mallory"), host="127.0.0.1", audit=store,
                       oidc=verifier)
        with serving(app) as url:
            answer = anyio.run(raw_post, url, {"Authorization": f"Bearer {ALICE_TOKEN}"})
            accepted = anyio.run(as_client, url, keys["ed"].sign(live_claims()))

        assert 401 == answer.status_code
        assert ["malformed_token"] == [r.body["reason"] for r in store.records()
                                       if r.kind == "mcp.client_refused"]
        assert ([], "permission") == (accepted["listed"], accepted["drop_table"])
