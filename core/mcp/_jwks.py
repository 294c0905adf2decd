"""
The issuer's signing keys: a JWKS fetched (or read from a file), parsed, and matched
against a token's algorithm.

Invariants:

- Only asymmetric signing keys are kept: RSA, EC and OKP with a ``kid``, ``use`` absent
  or ``sig``, an ``alg`` (when stated) that is an asymmetric one, and only their public
  half; a ``kid`` listed twice keeps neither. A symmetric (``oct``) key is never kept,
  so no token can be checked with an HMAC here.
- ``key_fits`` says whether a key may check a token of an algorithm: its type, its curve
  for ECDSA, at least 2048 bits for RSA, and its own ``alg`` when it states one.
- A JWKS is fetched over HTTPS (HTTP only to a loopback host), with a timeout, without
  redirects or a proxy, and read up to ``MAX_JWKS_BYTES``; any failure is a
  ``JwksUnavailable``, which the verifier turns into a refusal (fail closed).
"""

from __future__ import annotations

import ipaddress
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

log = structlog.get_logger()

#: The signature algorithms a configuration may allow: asymmetric only.
ASYMMETRIC_ALGORITHMS: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                "ES256", "ES384", "ES512", "EdDSA")
#: The largest JWKS document read, in bytes.
MAX_JWKS_BYTES: Final = 256 * 1024
_MIN_RSA_BITS: Final = 2048
#: The curve each ECDSA algorithm signs on (RFC 7518 section 3.4).
_EC_CURVES: Final = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


class JwksUnavailable(Exception):
    """The JWKS could not be fetched or read (mapped to ``jwks_unavailable``)."""


@dataclass(frozen=True, slots=True)
class JwksKey:
    """One signing key of the JWKS: its type, curve, declared ``alg`` and public key."""

    kty: str
    crv: str | None
    alg: str | None
    public_key: Any


def require_jwks_url(url: str) -> None:
    """
    Raises:
        ValueError: ``url`` is not HTTPS, nor HTTP to a loopback host.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return
    if parts.scheme == "http":
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return
    raise ValueError("the JWKS url is https:// (http:// only on a loopback address)")


def key_fits(key: JwksKey, alg: str) -> bool:
    """Whether a key of this type (and curve) signs with ``alg``, as the key itself says."""
    if key.alg is not None and key.alg != alg:
        return False
    if alg.startswith(("RS", "PS")):
        return (key.kty == "RSA" and isinstance(key.public_key, rsa.RSAPublicKey)
                and key.public_key.key_size >= _MIN_RSA_BITS)
    if alg in _EC_CURVES:
        return (key.kty == "EC" and key.crv == _EC_CURVES[alg]
                and isinstance(key.public_key, ec.EllipticCurvePublicKey))
    if alg == "EdDSA":
        return key.kty == "OKP" and isinstance(
            key.public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
    return False


def parse_jwks(document: bytes) -> dict[str, JwksKey]:
    """
    The signing keys of a JWKS document, by ``kid``. Keys without a ``kid``, for
    encryption (``use: enc``), symmetric (``oct``) or unreadable are left out; a
    ``kid`` given twice keeps neither (which one would verify is ambiguous).

    Raises:
        JwksUnavailable: The document is not a JWKS.
    """
    try:
        parsed = json.loads(document)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JwksUnavailable("the JWKS is not JSON") from exc
    entries = parsed.get("keys") if isinstance(parsed, dict) else None
    if not isinstance(entries, list):
        raise JwksUnavailable("the JWKS has no keys list")
    keys: dict[str, JwksKey] = {}
    doubled: set[str] = set()
    for entry in entries:
        key = _jwk(entry)
        if key is None:
            continue
        kid, value = key
        if kid in keys:
            doubled.add(kid)
        keys[kid] = value
    for kid in doubled:
        del keys[kid]
    return keys


def _jwk(entry: object) -> tuple[str, JwksKey] | None:
    if not isinstance(entry, dict):
        return None
    kid, kty, use, alg = (entry.get(n) for n in ("kid", "kty", "use", "alg"))
    if not isinstance(kid, str) or not kid or kty not in {"RSA", "EC", "OKP"}:
        return None
    if use not in (None, "sig") or (alg is not None and alg not in ASYMMETRIC_ALGORITHMS):
        return None
    crv = entry.get("crv")
    try:
        public_key = jwt.PyJWK(entry).key
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        log.warning("oidc_jwk_unreadable", kid=kid[:64], problem=type(exc).__name__)
        return None
    # Only the public half is ever used, even when a JWKS carries a private one by mistake.
    if hasattr(public_key, "public_key"):
        public_key = public_key.public_key()
    return kid, JwksKey(str(kty), crv if isinstance(crv, str) else None,
                        alg if isinstance(alg, str) else None, public_key)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects)


def fetch_jwks(source: str, *, timeout_seconds: float) -> bytes:
    """
    The JWKS document's bytes: over HTTP(S) within ``timeout_seconds`` in all, without
    redirects or a proxy and at most ``MAX_JWKS_BYTES``; or from a file.

    Raises:
        JwksUnavailable: It could not be read.
    """
    if "://" not in source:
        try:
            with Path(source).open("rb") as file:
                body = file.read(MAX_JWKS_BYTES + 1)
        except OSError as exc:
            raise JwksUnavailable("the JWKS file cannot be read") from exc
    else:
        try:
            require_jwks_url(source)
        except ValueError as exc:
            raise JwksUnavailable(str(exc)) from exc
        body = _http_body(source, timeout_seconds)
    if len(body) > MAX_JWKS_BYTES:
        raise JwksUnavailable(f"the JWKS is over {MAX_JWKS_BYTES} bytes")
    return body


def _http_body(url: str, timeout_seconds: float) -> bytes:
    """The body of a GET of ``url`` (checked by ``require_jwks_url``), read to a deadline."""
    deadline = time.monotonic() + timeout_seconds
    request = urllib.request.Request(  # noqa: S310 - https, or http to loopback (checked)
        url, headers={"Accept": "application/json"})
    chunks: list[bytes] = []
    size = 0
    try:
        with _OPENER.open(request, timeout=timeout_seconds) as answer:
            # Each read waits at most timeout_seconds; the deadline bounds them all, so a
            # server that sends one byte at a time cannot hold a fetch for long.
            while size <= MAX_JWKS_BYTES:
                if time.monotonic() > deadline:
                    raise JwksUnavailable("the JWKS url did not answer in time")
                chunk = answer.read1(16384)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise JwksUnavailable("the JWKS url did not answer with it") from exc
    return b"".join(chunks)
