"""
Principals from OIDC access tokens: signed JWTs checked against the issuer's JWKS.

Configured under ``mcp.auth.oidc`` in callward.yaml (``parse_oidc``); the HTTP
face's middleware (``callward.core.mcp._auth``) hands every bearer token that
looks like a JWT to ``OidcVerifier.verify``.

Invariants:

- A token is accepted only when all of these hold, checked in this order: it is
  at most ``MAX_TOKEN_BYTES`` and three base64url parts; its header's ``alg`` is
  one the operator allowed (never ``none``, never an HMAC: the schema admits only
  RSA, ECDSA and EdDSA names, so a token signed with the public key as an HMAC
  secret is refused before any key is looked at); its ``kid`` names a key of the
  JWKS whose type (and curve) fits that ``alg``; the signature verifies with that
  key; ``iss`` equals the configured issuer, ``aud`` is or contains the audience;
  ``exp`` is present and not past, ``nbf`` and ``iat`` not in the future (each
  with ``leeway_seconds``); the principal claim is a string of 1 to 256
  characters, the roles and groups claims (when configured) strings or lists of
  strings. Any other token is refused with a ``TokenRefused`` naming the reason.
- Claims are looked at only after the signature verified, so an unsigned or
  forged token learns nothing but ``bad_signature``.
- The JWKS is fetched when first needed and cached for ``jwks_cache_seconds``;
  an unknown ``kid`` fetches it again, at most once per
  ``jwks_refresh_seconds``. A JWKS that cannot be fetched or read, or a cache
  older than its age with no fresh copy, refuses every token
  (``jwks_unavailable``): it fails closed, never open. Fetches are HTTPS (HTTP
  only to a loopback host), with a timeout, no redirects and a size cap; or a
  local file.
- ``jti`` replay is not refused: an access token is a bearer token that a client
  sends with every request of its lifetime. The ``jti``'s SHA-256 is recorded with
  every call, so a reviewer can see one token's calls together; never the token.
"""

from __future__ import annotations

import functools
import hashlib
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import jwt
import structlog
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry

from callward.core.errors import ConfigurationError
from callward.core.mcp._jwks import (
    ASYMMETRIC_ALGORITHMS,
    JwksKey,
    JwksUnavailable,
    fetch_jwks,
    key_fits,
    parse_jwks,
    require_jwks_url,
)
from callward.core.types import MAX_IDENTITY_NAMES, Identity

log = structlog.get_logger()

Clock = Callable[[], float]
RefusalReason = Literal[
    "malformed_token", "alg_not_allowed", "missing_kid", "unknown_kid", "key_mismatch",
    "bad_signature", "wrong_issuer", "wrong_audience", "expired", "not_yet_valid",
    "missing_claim", "invalid_claim", "jwks_unavailable",
]
#: The largest token read at all, in bytes (a JWT with many groups stays well under).
MAX_TOKEN_BYTES: Final = 16384
DEFAULT_ALGORITHMS: Final = ("RS256", "ES256", "EdDSA")
_JWT_SHAPE: Final = re.compile(r"\A[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\Z")
_CLAIM_NAME: Final = {"type": "string", "minLength": 1, "maxLength": 256}

OIDC_SCHEMA: Final = {
    "type": "object",
    "additionalProperties": False,
    "required": ["issuer", "audience", "jwks"],
    "properties": {
        "issuer": {"type": "string", "minLength": 1, "maxLength": 1024},
        "audience": {"type": "string", "minLength": 1, "maxLength": 1024},
        "jwks": {"type": "string", "minLength": 1, "maxLength": 2048},
        "principal_claim": _CLAIM_NAME,
        "roles_claim": _CLAIM_NAME,
        "groups_claim": _CLAIM_NAME,
        "leeway_seconds": {"type": "number", "minimum": 0, "maximum": 300},
        "algorithms": {"type": "array", "minItems": 1, "uniqueItems": True,
                       "items": {"enum": list(ASYMMETRIC_ALGORITHMS)}},
        "jwks_refresh_seconds": {"type": "number", "minimum": 1, "maximum": 86400},
        "jwks_cache_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 604800},
        "jwks_timeout_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 60},
    },
}
AUTH_SCHEMA: Final = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"oidc": OIDC_SCHEMA},
}
_AUTH_VALIDATOR: Final = Draft202012Validator(AUTH_SCHEMA, registry=Registry())

#: What a client is told of each refusal: general terms, never key material or claims.
DESCRIPTIONS: Final[Mapping[RefusalReason, str]] = {
    "malformed_token": "the token is not a well-formed JWT",
    "alg_not_allowed": "the token's signature algorithm is not accepted",
    "missing_kid": "the token names no signing key",
    "unknown_kid": "the token's signing key is not known",
    "key_mismatch": "the token's signing key does not fit its algorithm",
    "bad_signature": "the token's signature is not valid",
    "wrong_issuer": "the token was issued by another issuer",
    "wrong_audience": "the token is meant for another audience",
    "expired": "the token has expired",
    "not_yet_valid": "the token is not valid yet",
    "missing_claim": "the token lacks a required claim",
    "invalid_claim": "a claim of the token has the wrong form",
    "jwks_unavailable": "the issuer's signing keys cannot be read now",
}


class TokenRefused(Exception):
    """A bearer token that does not identify a principal; ``reason`` says why."""

    def __init__(self, reason: RefusalReason) -> None:
        super().__init__(DESCRIPTIONS[reason])
        self.reason: RefusalReason = reason
        self.description = DESCRIPTIONS[reason]


@dataclass(frozen=True, slots=True)
class OidcSettings:
    """
    The ``mcp.auth.oidc`` section: whose tokens are accepted, and how they are read.

    Attributes:
        jwks: An ``https://`` URL (``http://`` only on loopback), or an absolute path.
        leeway_seconds: Clock skew allowed on ``exp``, ``nbf`` and ``iat``.
        jwks_refresh_seconds: The least time between two fetches of the JWKS.
        jwks_cache_seconds: How long a fetched JWKS is used before it is fetched again.
    """

    issuer: str
    audience: str
    jwks: str
    principal_claim: str = "sub"
    roles_claim: str | None = None
    groups_claim: str | None = None
    leeway_seconds: float = 60.0
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    jwks_refresh_seconds: float = 30.0
    jwks_cache_seconds: float = 3600.0
    jwks_timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        if not set(self.algorithms) <= set(ASYMMETRIC_ALGORITHMS) or not self.algorithms:
            raise ValueError("only RSA, ECDSA and EdDSA algorithms can be allowed")
        if self.jwks_cache_seconds < self.jwks_refresh_seconds:
            raise ValueError("jwks_cache_seconds is at least jwks_refresh_seconds, or a "
                             "JWKS could age out while no fetch is allowed")
        if "://" in self.jwks:
            require_jwks_url(self.jwks)
        elif not Path(self.jwks).is_absolute():
            raise ValueError("a JWKS file path is absolute (parse_oidc resolves it)")


def parse_oidc(section: object, *, base: Path) -> OidcSettings | None:
    """
    The OIDC settings of a configuration's ``mcp.auth`` section (None when absent);
    a relative JWKS path is relative to ``base``.

    Raises:
        ConfigurationError: The section is invalid.
    """
    if section is None:
        return None
    error = best_match(_AUTH_VALIDATOR.iter_errors(section))
    if error is not None:
        raise ConfigurationError(f"mcp auth invalid at {error.json_path}: {error.message}")
    raw = section.get("oidc") if isinstance(section, dict) else None
    if raw is None:
        return None
    jwks = str(raw["jwks"])
    if "://" not in jwks:
        jwks = str((base / jwks).resolve())
    try:
        return OidcSettings(
            issuer=raw["issuer"], audience=raw["audience"], jwks=jwks,
            principal_claim=raw.get("principal_claim", "sub"),
            roles_claim=raw.get("roles_claim"), groups_claim=raw.get("groups_claim"),
            leeway_seconds=float(raw.get("leeway_seconds", 60.0)),
            algorithms=tuple(raw.get("algorithms", DEFAULT_ALGORITHMS)),
            jwks_refresh_seconds=float(raw.get("jwks_refresh_seconds", 30.0)),
            jwks_cache_seconds=float(raw.get("jwks_cache_seconds", 3600.0)),
            jwks_timeout_seconds=float(raw.get("jwks_timeout_seconds", 5.0)),
        )
    except ValueError as exc:
        raise ConfigurationError(f"mcp auth oidc: {exc}") from exc


def looks_like_jwt(token: str) -> bool:
    """Three base64url parts separated by dots (a JWS in compact form)."""
    return _JWT_SHAPE.match(token) is not None


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """
    The principal a verified token names, and what else it says of it.

    Attributes:
        expires_at: The token's ``exp`` (seconds since the epoch), without the leeway:
            a session made from the token ends by then (the console's sign-in).
    """

    principal: str
    identity: Identity
    expires_at: float | None = None


@dataclass(slots=True)
class _Cache:
    """The keys last fetched, when (monotonic), and when a fetch was last tried."""

    keys: dict[str, JwksKey] | None = None
    fetched_at: float = 0.0
    attempted_at: float | None = None
    #: Guards the fields; never held while fetching.
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: One fetch at a time; a verifier that needs the keys waits for it.
    fetching: threading.Lock = field(default_factory=threading.Lock)


class OidcVerifier:
    """
    Verifies access tokens of one issuer. Safe to call from several threads.

    Args:
        settings: The issuer, audience, JWKS and claims.
        clock: Seconds since the epoch, for ``exp``, ``nbf`` and ``iat``.
        monotonic: A monotonic clock, for the JWKS cache and its refresh limit.
        fetch: Reads the JWKS document's bytes (default: ``fetch_jwks`` of ``settings.jwks``).
    """

    def __init__(self, settings: OidcSettings, *, clock: Clock = time.time,
                 monotonic: Clock = time.monotonic,
                 fetch: Callable[[], bytes] | None = None) -> None:
        self.settings = settings
        self._clock = clock
        self._monotonic = monotonic
        self._fetch = fetch if fetch is not None else functools.partial(
            fetch_jwks, settings.jwks, timeout_seconds=settings.jwks_timeout_seconds)
        self._cache = _Cache()

    @property
    def issuer(self) -> str:
        return self.settings.issuer

    def verify(self, token: str) -> VerifiedToken:
        """
        The principal and identity of a valid token. May fetch the JWKS (blocking).

        Raises:
            TokenRefused: The token is not valid; ``reason`` says which check failed.
        """
        settings = self.settings
        if len(token.encode("utf-8", "surrogatepass")) > MAX_TOKEN_BYTES:
            raise TokenRefused("malformed_token")
        if not looks_like_jwt(token):
            raise TokenRefused("malformed_token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenRefused("malformed_token") from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in settings.algorithms:
            raise TokenRefused("alg_not_allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRefused("missing_kid")
        key = self._key(kid)
        if not key_fits(key, alg):
            raise TokenRefused("key_mismatch")
        claims = self._verified_claims(token, key, alg)
        self._check_times(claims)
        return self._identified(claims)

    # -- the steps --------------------------------------------------------------

    def _verified_claims(self, token: str, key: JwksKey, alg: str) -> dict[str, Any]:
        """The payload, once the signature, ``iss`` and ``aud`` are checked."""
        settings = self.settings
        try:
            return jwt.decode(
                token, key=key.public_key, algorithms=[alg], audience=settings.audience,
                issuer=settings.issuer,
                # Times are checked against the injected clock in _check_times.
                options={"require": ["exp", "iss", "aud"], "verify_exp": False,
                         "verify_nbf": False, "verify_iat": False, "strict_aud": False,
                         "enforce_minimum_key_length": True})
        except jwt.InvalidSignatureError as exc:
            raise TokenRefused("bad_signature") from exc
        except jwt.InvalidAudienceError as exc:
            raise TokenRefused("wrong_audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise TokenRefused("wrong_issuer") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRefused("missing_claim") from exc
        except jwt.InvalidAlgorithmError as exc:
            raise TokenRefused("alg_not_allowed") from exc
        except (jwt.exceptions.InvalidSubjectError, jwt.exceptions.InvalidJTIError) as exc:
            raise TokenRefused("invalid_claim") from exc
        except jwt.PyJWTError as exc:
            raise TokenRefused("malformed_token") from exc

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now, leeway = self._clock(), self.settings.leeway_seconds
        exp, nbf, iat = (claims.get(name) for name in ("exp", "nbf", "iat"))
        for value in (exp, nbf, iat):
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, float))):
                raise TokenRefused("invalid_claim")
        if exp is None:
            raise TokenRefused("missing_claim")
        if now > exp + leeway:
            raise TokenRefused("expired")
        if (nbf is not None and now + leeway < nbf) or (iat is not None and now + leeway < iat):
            raise TokenRefused("not_yet_valid")

    def _identified(self, claims: Mapping[str, Any]) -> VerifiedToken:
        settings = self.settings
        principal = claims.get(settings.principal_claim)
        if principal is None:
            raise TokenRefused("missing_claim")
        if not isinstance(principal, str) or not 0 < len(principal) <= 256:
            raise TokenRefused("invalid_claim")
        jti = claims.get("jti")
        if jti is not None and not isinstance(jti, str):
            raise TokenRefused("invalid_claim")
        try:
            identity = Identity(
                issuer=settings.issuer,
                roles=_names(claims, settings.roles_claim),
                groups=_names(claims, settings.groups_claim),
                token_id_sha256=None if jti is None
                else hashlib.sha256(jti.encode("utf-8", "surrogatepass")).hexdigest())
        except ValueError as exc:
            raise TokenRefused("invalid_claim") from exc
        return VerifiedToken(principal, identity, expires_at=float(claims["exp"]))

    # -- the JWKS -------------------------------------------------------------

    def _key(self, kid: str) -> JwksKey:
        """
        The JWKS key ``kid``, fetching the JWKS when the cache is empty, too old, or
        lacks that kid (at most once per ``jwks_refresh_seconds``).
        """
        cache = self._cache
        known = self._cached(kid)
        if known is not None:
            return known
        with cache.fetching:
            known = self._cached(kid)  # fetched while this one waited
            if known is not None:
                return known
            now = self._monotonic()
            with cache.lock:
                due = cache.attempted_at is None or (
                    now - cache.attempted_at >= self.settings.jwks_refresh_seconds)
                if due:
                    cache.attempted_at = now
            if due:
                try:
                    keys = parse_jwks(self._fetch())
                except JwksUnavailable as exc:
                    log.warning("oidc_jwks_unavailable", problem=str(exc))
                else:
                    log.info("oidc_jwks_fetched", keys=len(keys))
                    with cache.lock:
                        cache.keys, cache.fetched_at = keys, now
        with cache.lock:
            if cache.keys is None or not self._fresh(cache.fetched_at):
                raise TokenRefused("jwks_unavailable")
            key = cache.keys.get(kid)
        if key is None:
            raise TokenRefused("unknown_kid")
        return key

    def _fresh(self, fetched_at: float) -> bool:
        return self._monotonic() - fetched_at < self.settings.jwks_cache_seconds

    def _cached(self, kid: str) -> JwksKey | None:
        """Key ``kid`` of a JWKS younger than ``jwks_cache_seconds``, else None."""
        cache = self._cache
        with cache.lock:
            if cache.keys is None or not self._fresh(cache.fetched_at):
                return None
            return cache.keys.get(kid)


def _names(claims: Mapping[str, Any], claim: str | None) -> frozenset[str]:
    """The role or group names of a claim: a string or a list of strings (absent: none)."""
    if claim is None or claims.get(claim) is None:
        return frozenset()
    value = claims[claim]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_IDENTITY_NAMES or not all(
            isinstance(name, str) for name in value):
        raise TokenRefused("invalid_claim")
    return frozenset(value)
