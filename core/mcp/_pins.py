"""
The operator's approvals of upstream tools, and the policy gate that enforces them.

``PinStore`` holds the pinned digests (a fleet's ``PostgresPinStore`` in its database;
both are ``Pins``); ``PinGate`` denies calls to unapproved or changed upstream tools as
``approval_required`` and asks the policy about the rest.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final, Literal, Protocol, runtime_checkable

from callward.core._canonical import JSONValue, Sha256Hex
from callward.core.errors import ConfigurationError
from callward.core.protocols import PolicyEngine, PolicyHooks, PolicyReload, ShadowingPolicy
from callward.core.types import (
    CallContext,
    Decision,
    Identity,
    ResultTreatment,
    RuleId,
    ToolCall,
    ToolSpec,
)

PINS_FILE: Final = "mcp-pins.json"
UNAPPROVED_RULE: Final = RuleId("mcp.unapproved")
RUG_PULL_RULE: Final = RuleId("mcp.rug-pull")
#: The tool re-checked by ``PinGate.rechecked`` in this context, and how its listing failed.
_RECHECKED: contextvars.ContextVar[tuple[str, Exception | None] | None] = contextvars.ContextVar(
    "callward_mcp_rechecked", default=None)


@runtime_checkable
class McpContentPolicy(Protocol):
    """What a policy says about upstream resources and prompts (``callward.policies.Policy``)."""

    @property
    def digest(self) -> Sha256Hex: ...

    def mcp_content_rule(self, server: str, kind: Literal["resource", "prompt"], name: str,
                         principal: str, identity: Identity | None = None
                         ) -> RuleId | None: ...

    def treat_content(self, name: str, content_json: bytes) -> ResultTreatment: ...


class Pins(Protocol):
    """The operator's approvals, by server and tool: ``PinStore`` or ``PostgresPinStore``."""

    def load(self) -> dict[str, dict[str, str]]:
        """
        Every pin: ``{server: {tool: digest}}``.

        Raises:
            ConfigurationError: The pins cannot be read.
        """
        ...

    def get(self, server: str, tool: str) -> str | None: ...

    def pin(self, server: str, tool: str, digest: str) -> None:
        """Approve ``digest`` for ``server``'s ``tool``, replacing an earlier approval."""
        ...


class PinStore:
    """
    The operator's approvals: ``{server: {tool: digest}}`` in one JSON file.

    Written whole to a temporary file and renamed, so a crash leaves the old or
    the new approvals, never half of them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, dict[str, str]]:
        """
        Raises:
            ConfigurationError: The file exists but is not a pin file.
        """
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"pin file {self.path} cannot be read") from exc
        servers = raw.get("servers") if isinstance(raw, dict) else None
        if not isinstance(servers, dict):
            raise ConfigurationError(f"pin file {self.path} is not a pin file")
        return {str(s): {str(t): str(d) for t, d in tools.items()}
                for s, tools in servers.items() if isinstance(tools, dict)}

    def get(self, server: str, tool: str) -> str | None:
        return self.load().get(server, {}).get(tool)

    def pin(self, server: str, tool: str, digest: str) -> None:
        pins = self.load()
        pins.setdefault(server, {})[tool] = digest
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"version": 1, "servers": pins}, indent=2,
                                        sort_keys=True), encoding="utf-8")
        temporary.chmod(0o600)
        os.replace(temporary, self.path)


class PinGate:
    """
    The policy, in front of which calls to unapproved or changed upstream tools are denied.

    Everything else (schema, permissions, result rules, reloads) is ``inner``'s.
    """

    def __init__(self, inner: PolicyEngine, blocked: Mapping[str, RuleId],
                 recheck: Callable[[str], None] | None = None,
                 recheck_awaited: Callable[[str], Awaitable[None]] | None = None) -> None:
        self._inner = inner
        self._hooks = inner if isinstance(inner, PolicyHooks) else None
        # A Protocol isinstance costs microseconds: once here, not per call.
        self._shadowing = inner if isinstance(inner, ShadowingPolicy) else None
        # Held, not copied: ``recheck`` may block a tool mid-session.
        self._blocked = blocked
        self._recheck = recheck
        self._recheck_awaited = recheck_awaited

    @contextlib.asynccontextmanager
    async def rechecked(self, name: str) -> AsyncIterator[None]:
        """
        Re-check ``name`` here, the listing awaited (on the upstream client's loop);
        within the block, deciding ``name`` uses that re-check instead of listing
        again, which would wait on this loop from its own thread. A failed listing
        fails the decision, as it does in ``decide``.
        """
        error: Exception | None = None
        if self._recheck_awaited is not None:
            try:
                await self._recheck_awaited(name)
            except Exception as exc:  # noqa: BLE001 - raised again by decide, which denies
                error = exc
        token = _RECHECKED.set((name, error))
        try:
            yield
        finally:
            _RECHECKED.reset(token)

    @property
    def digest(self) -> Sha256Hex:
        return self._inner.digest

    def may_discover(self, spec: ToolSpec, context: CallContext) -> bool:
        """A blocked upstream tool leaves listings too; anything else, as the policy says."""
        return spec.name not in self._blocked and self._inner.may_discover(spec, context)

    def decide(self, call: ToolCall, spec: ToolSpec | None, context: CallContext) -> Decision:
        """
        Deny a blocked upstream tool, else ask the policy.

        A failed re-check raises, which the gateway turns into a denial.
        """
        return self.decide_with_shadow(call, spec, context)[0]

    def decide_with_shadow(self, call: ToolCall, spec: ToolSpec | None, context: CallContext
                           ) -> tuple[Decision, Mapping[str, JSONValue] | None]:
        """``decide``, with the inner policy's shadow divergence for the gateway to audit."""
        if self._recheck is not None:
            rechecked = _RECHECKED.get()
            if rechecked is None or rechecked[0] != call.name:
                self._recheck(call.name)
            elif rechecked[1] is not None:
                raise rechecked[1]
        rule = self._blocked.get(call.name)
        if rule is not None:
            message = ("this upstream tool changed since an operator approved it"
                       if rule == RUG_PULL_RULE else
                       "this upstream tool has not been approved by an operator")
            return Decision("deny", (rule,), self._inner.digest, kind="approval_required",
                            message=message), None
        if self._shadowing is not None:
            return self._shadowing.decide_with_shadow(call, spec, context)
        return self._inner.decide(call, spec, context), None

    def mcp_content_rule(self, server: str, kind: Literal["resource", "prompt"], name: str,
                         principal: str, identity: Identity | None = None) -> RuleId | None:
        """The inner policy's rule enabling an upstream resource or prompt (None: off)."""
        if not isinstance(self._inner, McpContentPolicy):
            return None
        return self._inner.mcp_content_rule(server, kind, name, principal, identity)

    def treat_content(self, name: str, content_json: bytes) -> ResultTreatment:
        """
        Raises:
            TypeError: The inner policy has no result rules for content (never enabled then).
        """
        if not isinstance(self._inner, McpContentPolicy):
            raise TypeError("the policy has no result rules for upstream content")
        return self._inner.treat_content(name, content_json)

    def observe_result(self, call: ToolCall, spec: ToolSpec, context: CallContext,
                       content_json: bytes) -> ResultTreatment:
        if self._hooks is None:
            return ResultTreatment(content_json=content_json)
        return self._hooks.observe_result(call, spec, context, content_json)

    def poll_reload(self) -> PolicyReload | None:
        return None if self._hooks is None else self._hooks.poll_reload()
