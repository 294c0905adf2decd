"""
Upstream MCP resources and prompts, behind the policy: off unless enabled, always audited.

Invariants:

- A resource (by its upstream URI) or a prompt (by its upstream name) reaches a
  client only when a rule of the policy's ``mcp_content`` enables it for that
  server and principal; everything else is refused, and every refusal is
  audited (``mcp.resource_refused``, ``mcp.prompt_refused``) with the reason.
- They are namespaced like tools, so two servers cannot shadow each other: a
  resource's URI is ``callward://<server>/<upstream URI, percent-encoded>`` and a
  prompt's name ``<server>__<prompt>``. A name that does not map is refused.
- Every ``resources/read`` and ``prompts/get`` is signed into the audit log
  (``mcp.resource_read``, ``mcp.prompt_get``) with the server digest, the URI or
  name, the rule that enabled it and the hash of exactly what the client gets,
  after the result rules (redaction) applied: a resource is treated as the
  result of a tool named ``<server>__resources``, a prompt as that of
  ``<server>__<prompt>``. If that record cannot be written, nothing is returned.
- Listings show only what the principal could read or get.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, TypeVar
from urllib.parse import quote, unquote, urlsplit

import mcp_types as types
import structlog
from mcp.shared.exceptions import MCPError

from callward.core._canonical import JSONValue, canonical_bytes, canonical_loads, sha256_hex
from callward.core.mcp._connection import UpstreamConnection
from callward.core.mcp._pins import McpContentPolicy
from callward.core.mcp._section import NAMESPACE_SEPARATOR, namespaced
from callward.core.protocols import AuditLog, PolicyEngine
from callward.core.types import Identity, RuleId

if TYPE_CHECKING:
    from callward.core.gateway import Gateway

log = structlog.get_logger()

URI_SCHEME: Final = "callward"
CONTENT_RULE_OFF: Final = RuleId("mcp.content-off")
#: The most a prompt's arguments may weigh, in canonical bytes.
MAX_PROMPT_ARGUMENTS_BYTES: Final = 64 << 10
_WALL_SECONDS: Final = 30.0

Kind = Literal["resource", "prompt"]
_Item = TypeVar("_Item", types.Resource, types.Prompt)
_Result = TypeVar("_Result", types.ReadResourceResult, types.GetPromptResult)


class ContentRefused(MCPError):
    """A resource or prompt the policy does not enable, or that could not be fetched."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(types.INVALID_PARAMS, message, {"callward/kind": "denied",
                                                          "reason": reason})
        self.reason = reason


def resource_uri(server: str, uri: str) -> str:
    """The namespaced URI of an upstream resource."""
    return f"{URI_SCHEME}://{server}/{quote(uri, safe='')}"


def split_resource_uri(uri: str) -> tuple[str, str] | None:
    """(server, upstream URI) of a namespaced resource URI, or None."""
    parts = urlsplit(uri)
    if parts.scheme != URI_SCHEME or not parts.netloc or parts.query or parts.fragment:
        return None
    original = unquote(parts.path.removeprefix("/"))
    return (parts.netloc, original) if original and "/" not in parts.path[1:] else None


@dataclass(frozen=True, slots=True)
class _Served:
    """What one read or get produced, ready to audit and return."""

    content_json: bytes
    rules: tuple[str, ...]
    redactions: int
    keep_body: bool


class UpstreamContent:
    """
    The resources and prompts of connected upstreams, as the policy lets a principal see them.

    Args:
        connections: The connected upstreams by server name (held, not copied).
        policy: Decides what is enabled and treats what is returned; a policy without
            ``mcp_content`` support enables nothing.
        audit: Where every read, get and refusal is signed.
        before: Run before each decision (the gateway's ``poll_policy_reload``, so an
            edited policy applies to the next read as to the next call).
    """

    def __init__(self, connections: Mapping[str, UpstreamConnection], policy: PolicyEngine,
                 audit: AuditLog, *, before: Callable[[], None] | None = None) -> None:
        self._connections = connections
        self._policy = policy if isinstance(policy, McpContentPolicy) else None
        self._audit = audit
        self._before = before

    @classmethod
    def of(cls, gateway: Gateway, connections: Mapping[str, UpstreamConnection]
           ) -> UpstreamContent:
        """The content of ``connections`` under ``gateway``'s policy, audit log and reloads."""
        return cls(connections, gateway.policy, gateway.audit, before=gateway.poll_policy_reload)

    def _rule(self, server: str, kind: Kind, name: str, principal: str,
              identity: Identity | None) -> RuleId | None:
        if self._policy is None:
            return None
        if self._before is not None:
            self._before()
        return self._policy.mcp_content_rule(server, kind, name, principal, identity)

    # -- listings -------------------------------------------------------------

    def list_resources(self, principal: str,
                       identity: Identity | None = None) -> list[types.Resource]:
        """The enabled resources of every upstream, namespaced."""
        listed = []
        for server, connection in sorted(self._connections.items()):
            for resource in self._listing(server, connection.list_resources):
                if self._rule(server, "resource", resource.uri, principal,
                              identity) is not None:
                    listed.append(resource.model_copy(update={
                        "uri": resource_uri(server, resource.uri),
                        "name": f"{server}{NAMESPACE_SEPARATOR}{resource.name}"}))
        return listed

    def list_prompts(self, principal: str,
                     identity: Identity | None = None) -> list[types.Prompt]:
        """The enabled prompts of every upstream, namespaced."""
        listed = []
        for server, connection in sorted(self._connections.items()):
            for prompt in self._listing(server, connection.list_prompts):
                name = namespaced(server, prompt.name)
                if name is not None and self._rule(server, "prompt", prompt.name,
                                                   principal, identity) is not None:
                    listed.append(prompt.model_copy(update={"name": name}))
        return listed

    @staticmethod
    def _listing(server: str, fetch: Callable[[], list[_Item]]) -> list[_Item]:
        """A server's listing; one that fails (or offers none) lists nothing."""
        try:
            return fetch()
        except Exception as exc:  # noqa: BLE001 - e.g. "method not found": nothing to list
            log.info("mcp_content_unlisted", server=server, error=type(exc).__name__)
            return []

    # -- reads ----------------------------------------------------------------

    def read_resource(self, uri: str, *, principal: str, session_id: str = "",
                      identity: Identity | None = None) -> types.ReadResourceResult:
        """
        Read one enabled resource, treated by the result rules and audited.

        Raises:
            ContentRefused: Not enabled, unknown, or the upstream failed (audited).
            AuditUnavailable: The record could not be written; nothing is returned.
        """
        body: dict[str, JSONValue] = {"uri": uri[:2048], "principal": principal,
                                      "session_id": session_id, **_identity_fields(identity)}
        split = split_resource_uri(uri)
        if split is None:
            raise self._refuse("resource", body, "unknown_uri",
                               "no upstream resource has that URI")
        server, original = split
        body.update(server=server, upstream_uri=original[:2048])
        connection, rule = self._enabled(server, "resource", original, principal, body,
                                         identity=identity)
        try:
            result = connection.read_resource(original, _WALL_SECONDS)
        except Exception as exc:  # timeouts and protocol errors alike: refused, audited
            raise self._refuse("resource", body, "upstream_error",
                               f"the upstream could not read it ({type(exc).__name__})") from exc
        served, out = self._treat("resource", f"{server}{NAMESPACE_SEPARATOR}resources", result,
                                  body, connection)
        self._record("mcp.resource_read", body, connection, rule, served)
        return out

    def get_prompt(self, name: str, arguments: Mapping[str, str] | None, *, principal: str,
                   session_id: str = "",
                   identity: Identity | None = None) -> types.GetPromptResult:
        """
        Get one enabled prompt, treated by the result rules and audited.

        Raises:
            ContentRefused: Not enabled, unknown, arguments too large, or the upstream
                failed (audited).
            AuditUnavailable: The record could not be written; nothing is returned.
        """
        given = dict(arguments or {})
        arguments_json = canonical_bytes(given)
        body: dict[str, JSONValue] = {"name": name[:256], "principal": principal,
                                      "session_id": session_id,
                                      "arguments_sha256": sha256_hex(arguments_json),
                                      **_identity_fields(identity)}
        server, _, prompt = name.partition(NAMESPACE_SEPARATOR)
        if not prompt or namespaced(server, prompt) != name:
            raise self._refuse("prompt", body, "unknown_name", "no upstream prompt has that name")
        body.update(server=server, prompt=prompt)
        if len(arguments_json) > MAX_PROMPT_ARGUMENTS_BYTES:
            raise self._refuse("prompt", body, "arguments_too_large",
                               "the prompt's arguments are over 64 KiB")
        connection, rule = self._enabled(server, "prompt", prompt, principal, body,
                                         identity=identity)
        try:
            result = connection.get_prompt(prompt, given, _WALL_SECONDS)
        except Exception as exc:  # timeouts and protocol errors alike: refused, audited
            raise self._refuse("prompt", body, "upstream_error",
                               f"the upstream could not give it ({type(exc).__name__})") from exc
        served, out = self._treat("prompt", name, result, body, connection)
        self._record("mcp.prompt_get", body, connection, rule, served)
        return out

    # -- steps ----------------------------------------------------------------

    def _enabled(self, server: str, kind: Kind, name: str, principal: str,
                 body: dict[str, JSONValue], *,
                 identity: Identity | None) -> tuple[UpstreamConnection, RuleId]:
        connection = self._connections.get(server)
        if connection is None:
            raise self._refuse(kind, body, "unknown_server", f"no upstream server is named "
                               f"{server[:64]!r}")
        rule = self._rule(server, kind, name, principal, identity)
        if rule is None:
            raise self._refuse(kind, body, "not_enabled",
                               f"the policy does not enable this {kind} for {principal!r}",
                               connection)
        return connection, rule

    def _treat(self, kind: Kind, name: str, result: _Result, body: dict[str, JSONValue],
               connection: UpstreamConnection) -> tuple[_Served, _Result]:
        """
        The result rules applied; what comes out must still be a valid MCP result, no
        larger than the server's ``output_bytes`` limit.
        """
        try:
            content_json = canonical_bytes(result.model_dump(mode="json", by_alias=True,
                                                             exclude_none=True))
        except ValueError as exc:
            raise self._refuse(kind, body, "not_i_json", "the upstream's answer is not I-JSON",
                               connection) from exc
        if len(content_json) > connection.config.limits.output_bytes:
            raise self._refuse(kind, body, "output_limit", "the upstream's answer is over the "
                               "server's output limit", connection)
        try:
            treatment = self._content_policy().treat_content(name, content_json)
            out = type(result).model_validate(canonical_loads(treatment.content_json))
        except Exception as exc:  # redaction left no valid result (or the rules failed): withheld
            raise self._refuse(kind, body, "result_rules_failed", "the result rules could not "
                               f"treat it ({type(exc).__name__})", connection) from exc
        served = _Served(treatment.content_json, tuple(treatment.rules), treatment.redactions,
                         treatment.keep_body)
        return served, out

    def _content_policy(self) -> McpContentPolicy:
        """
        Raises:
            TypeError: There is none (then nothing was enabled, so this is never reached).
        """
        if self._policy is None:
            raise TypeError("no policy treats upstream content")
        return self._policy

    def _record(self, kind: str, body: dict[str, JSONValue], connection: UpstreamConnection,
                rule: RuleId, served: _Served) -> None:
        policy_digest = self._policy.digest if self._policy is not None else None
        record = self._audit.append(kind, {
            **body, "server_digest": connection.digest, "rule": rule,
            "policy_digest": policy_digest,
            "content_sha256": sha256_hex(served.content_json),
            "content_bytes": len(served.content_json),
            "result_rules": list(served.rules), "redactions": served.redactions,
            "content": canonical_loads(served.content_json) if served.keep_body else None,
        })
        log.info("mcp_content_served", kind=kind, seq=record.seq, server=body.get("server"))

    def _refuse(self, kind: Kind, body: dict[str, JSONValue], reason: str, message: str,
                connection: UpstreamConnection | None = None) -> ContentRefused:
        """Audit a refusal and return the error to raise (a failed write raises itself)."""
        self._audit.append(f"mcp.{kind}_refused", {
            **body, "reason": reason, "rule": CONTENT_RULE_OFF if reason == "not_enabled"
            else None, "server_digest": connection.digest if connection else None,
            "policy_digest": self._policy.digest if self._policy is not None else None})
        log.info("mcp_content_refused", kind=kind, reason=reason)
        return ContentRefused(message, reason)


def _identity_fields(identity: Identity | None) -> dict[str, JSONValue]:
    """The caller's token identity for a record (issuer, roles, groups, ``jti`` hash)."""
    return {} if identity is None else {"identity": identity.to_json()}
