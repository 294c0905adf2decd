"""
Who an MCP client over Streamable HTTP is: a bearer token, mapped to a principal.

Invariants:

- The operator configures static tokens only as SHA-256 hashes, each mapped to
  one principal (``mcp.clients`` in callward.yaml); no token is stored in clear.
- With OIDC configured (``mcp.auth.oidc``), a bearer token that looks like a JWT
  is verified as one (``callward.core.mcp._oidc``) and names its principal, roles
  and groups; any other token is looked up among the static ones.
- When either is configured, every HTTP request must carry
  ``Authorization: Bearer <token>`` that one of them accepts; anything else is
  answered 401 before the request reaches the MCP server, with a
  ``WWW-Authenticate`` challenge (RFC 6750: ``error="invalid_token"`` and a
  description in general terms; no error when no token was sent), and audited
  (``mcp.client_refused``, with the reason and never the token).
- An accepted request carries its principal in the ASGI scope under
  ``PRINCIPAL_SCOPE_KEY``, and a verified JWT's ``Identity`` under
  ``IDENTITY_SCOPE_KEY``; the MCP face decides each call as that principal with
  that identity, so two clients with two tokens are two principals to the policy
  and the log.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import anyio.to_thread
import structlog
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry
from starlette.types import ASGIApp, Receive, Scope, Send

from callward.core.errors import ConfigurationError
from callward.core.mcp._oidc import DESCRIPTIONS, OidcVerifier, TokenRefused, looks_like_jwt
from callward.core.protocols import AuditLog

log = structlog.get_logger()

PRINCIPAL_SCOPE_KEY: Final = "callward.principal"
IDENTITY_SCOPE_KEY: Final = "callward.identity"
#: The RFC 6750 error code and description a client is told for each refusal reason.
_CHALLENGES: Final[Mapping[str, tuple[str | None, str | None]]] = {
    "missing_token": (None, None),
    "not_bearer": (None, None),
    "several_authorization_headers": ("invalid_request", "send one Authorization header"),
    "unknown_token": ("invalid_token", "the token is not known"),
    **{reason: ("invalid_token", text) for reason, text in DESCRIPTIONS.items()},
}
CLIENTS_SCHEMA: Final = {
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["principal", "token_sha256"],
        "properties": {
            "principal": {"type": "string", "minLength": 1, "maxLength": 256},
            "token_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        },
    },
}
_CLIENTS_VALIDATOR: Final = Draft202012Validator(CLIENTS_SCHEMA, registry=Registry())
_MAX_TOKEN_BYTES: Final = 4096


def token_sha256(token: str) -> str:
    """The hash an operator configures for a token (hex SHA-256 of its UTF-8 bytes)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class ClientTokens:
    """The configured token hashes and the principal each one maps to."""

    principals: Mapping[str, str]

    def principal_for(self, token: str) -> str | None:
        """The principal of ``token``, or None; compares every hash in constant time."""
        if len(token.encode("utf-8", "surrogatepass")) > _MAX_TOKEN_BYTES:
            return None
        presented = token_sha256(token)
        found = None
        for digest, principal in self.principals.items():
            if hmac.compare_digest(digest, presented):
                found = principal
        return found


def parse_clients(section: object) -> ClientTokens | None:
    """
    The ``clients`` list of a configuration's ``mcp`` section (None when absent).

    Raises:
        ConfigurationError: The list is invalid, or one hash maps to two principals.
    """
    if section is None:
        return None
    error = best_match(_CLIENTS_VALIDATOR.iter_errors(section))
    if error is not None:
        raise ConfigurationError(f"mcp clients invalid at {error.json_path}: {error.message}")
    principals: dict[str, str] = {}
    for entry in section if isinstance(section, list) else ():
        digest, principal = entry["token_sha256"], entry["principal"]
        if principals.get(digest, principal) != principal:
            raise ConfigurationError("mcp clients: one token hash maps to two principals")
        principals[digest] = principal
    return ClientTokens(principals)


class BearerPrincipals:
    """
    ASGI middleware: a request gets the principal of its bearer token, or a 401.

    Args:
        app: The MCP HTTP app behind it.
        tokens: The configured static token hashes (None: none are).
        audit: Where each refusal is signed.
        oidc: Verifies JWT access tokens (None: only static tokens are accepted).

    Raises:
        ValueError: Neither static tokens nor OIDC are given.
    """

    def __init__(self, app: ASGIApp, tokens: ClientTokens | None, audit: AuditLog, *,
                 oidc: OidcVerifier | None = None) -> None:
        if tokens is None and oidc is None:
            raise ValueError("bearer principals need static tokens, OIDC, or both")
        self._app = app
        self._tokens = tokens
        self._audit = audit
        self._oidc = oidc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        token, reason = _bearer(scope)
        if token is None:
            await self._refuse(scope, send, reason or "missing_token")
            return
        if self._oidc is not None and looks_like_jwt(token):
            try:
                # Verification may fetch the JWKS: never on the serving loop.
                verified = await anyio.to_thread.run_sync(self._oidc.verify, token)
            except TokenRefused as refused:
                await self._refuse(scope, send, refused.reason, issuer=self._oidc.issuer)
                return
            await self._app({**scope, PRINCIPAL_SCOPE_KEY: verified.principal,
                             IDENTITY_SCOPE_KEY: verified.identity}, receive, send)
            return
        principal = None if self._tokens is None else self._tokens.principal_for(token)
        if principal is None:
            await self._refuse(scope, send,
                               "unknown_token" if self._tokens is not None else "malformed_token")
            return
        await self._app({**scope, PRINCIPAL_SCOPE_KEY: principal}, receive, send)

    async def _refuse(self, scope: Scope, send: Send, reason: str, *,
                      issuer: str | None = None) -> None:
        client = scope.get("client")
        body: dict[str, Any] = {"reason": reason, "method": str(scope.get("method", ""))[:16],
                                "path": str(scope.get("path", ""))[:256],
                                "client": client[0] if client else None}
        if issuer is not None:
            body["issuer"] = issuer
        # A refusal that cannot be audited is still a refusal (the audit error is logged).
        try:
            await anyio.to_thread.run_sync(self._audit.append, "mcp.client_refused", body)
        except Exception:
            log.exception("mcp_client_refusal_unaudited", reason=reason)
        log.warning("mcp_client_refused", reason=reason)
        payload = json.dumps({"error": "unauthorized", "reason": reason}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"),
            (b"www-authenticate", challenge(reason).encode("ascii")),
            (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def challenge(reason: str) -> str:
    """
    The ``WWW-Authenticate`` value of a refusal (RFC 6750 section 3): the realm, and
    for a token that was sent, ``error`` and a description in general terms.
    """
    error, description = _CHALLENGES.get(reason, ("invalid_token", "the token is not valid"))
    value = 'Bearer realm="callward"'
    if error is not None:
        value += f', error="{error}"'
    if description is not None:
        value += f', error_description="{description}"'
    return value


def _bearer(scope: Scope) -> tuple[str | None, str | None]:
    """The bearer token of a request, or None and why not."""
    values = [value for name, value in scope.get("headers", ()) if name == b"authorization"]
    if not values:
        return None, "missing_token"
    if len(values) > 1:
        return None, "several_authorization_headers"
    scheme, _, token = values[0].decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None, "not_bearer"
    return token.strip(), None
