"""
The ``mcp`` section of a configuration: which upstream servers, and how they run.

Also how an upstream tool is named (``<server>__<tool>``) and pinned (the digest of
its definition); ``callward.core.mcp._upstream`` connects the servers.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import mcp_types as types
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry

from callward.core._canonical import Sha256Hex, canonical_sha256
from callward.core.errors import ConfigurationError
from callward.core.types import ResourceLimits, is_egress_target, is_tool_name

NAMESPACE_SEPARATOR: Final = "__"
_SERVER_NAME = r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$"
#: An upstream tool's own name: snake_case without a leading, trailing or double underscore.
_TOOL_PART: Final = re.compile(r"\A[a-z0-9]+(_[a-z0-9]+)*\Z")
_LIMITS_SCHEMA: Final = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        name: {"type": "number" if name in ("wall_seconds", "cpus") else "integer",
               "exclusiveMinimum": 0}
        for name in ("wall_seconds", "memory_bytes", "pids", "cpus", "output_bytes",
                     "tmp_bytes", "open_files")
    },
}
MCP_SECTION_SCHEMA: Final = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "clients": {"type": "array"},  # validated by callward.core.mcp._auth
        "auth": {"type": "object"},  # validated by callward.core.mcp._oidc
        "servers": {
            "type": "object",
            "propertyNames": {"pattern": _SERVER_NAME, "maxLength": 24},
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "oneOf": [{"required": ["command"]}, {"required": ["url"]}],
                "properties": {
                    "command": {"type": "array", "minItems": 1,
                                "items": {"type": "string", "minLength": 1}},
                    "files": {"type": "object",
                              "additionalProperties": {"type": "string", "minLength": 1}},
                    "python_distributions": {"type": "array",
                                             "items": {"type": "string", "minLength": 1}},
                    "limits": _LIMITS_SCHEMA,
                    "url": {"type": "string", "pattern": "^https?://"},
                    "recheck_seconds": {"type": "number", "minimum": 0, "maximum": 86400},
                    # host:port targets a stdio server may reach via the egress proxy.
                    "egress": {"type": "array", "uniqueItems": True, "maxItems": 64,
                               "items": {"type": "string", "minLength": 3}},
                },
            },
        },
    },
}
_SECTION_VALIDATOR: Final = Draft202012Validator(MCP_SECTION_SCHEMA, registry=Registry())


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """
    One upstream MCP server as the operator listed it.

    Attributes:
        command: The server's argument list inside its container (stdio servers).
        files: Files copied into the container's image, by path under the service root.
        python_distributions: Installed distributions the server imports (``mcp``).
        url: A Streamable HTTP endpoint on this machine (HTTP servers).
        recheck_seconds: How old the last ``tools/list`` may be when a call is decided;
            an older one is fetched again, so a definition changed mid-session blocks
            its tool. 0 lists again before every call.
        egress: ``host:port`` targets a stdio server may reach through the egress
            proxy; without, its container has no network.
    """

    name: str
    command: tuple[str, ...] = ()
    files: tuple[tuple[str, Path], ...] = ()
    python_distributions: tuple[str, ...] = ()
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    url: str = ""
    recheck_seconds: float = 30.0
    egress: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if bool(self.command) == bool(self.url):
            raise ValueError("an upstream has a command or a url, not both")
        if self.egress and not self.command:
            raise ValueError("egress is for a stdio server (command), which runs in a container")
        for target in self.egress:
            if not is_egress_target(target):
                raise ValueError(f"egress target {target!r} is not host:port")
        if self.url:
            require_loopback_url(self.url)


def require_loopback_url(url: str) -> None:
    """
    Raises:
        ConfigurationError: ``url`` is not on a loopback address of this machine.
    """
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigurationError(f"an upstream MCP url must be on loopback, not {host!r}")


def parse_mcp_section(section: object, *, base: Path) -> tuple[UpstreamConfig, ...]:
    """
    The upstreams of a configuration's ``mcp`` section; paths are relative to ``base``.

    Raises:
        ConfigurationError: The section is invalid.
    """
    if section is None:
        return ()
    error = best_match(_SECTION_VALIDATOR.iter_errors(section))
    if error is not None:
        raise ConfigurationError(f"mcp section invalid at {error.json_path}: {error.message}")
    if not isinstance(section, dict):
        raise ConfigurationError("mcp section is not a mapping")
    upstreams = []
    for name, raw in sorted((section.get("servers") or {}).items()):
        try:
            limits = _limits(raw.get("limits") or {})
            upstreams.append(UpstreamConfig(
                name=name,
                command=tuple(raw.get("command") or ()),
                files=tuple((target, (base / source).resolve())
                            for target, source in sorted((raw.get("files") or {}).items())),
                python_distributions=tuple(raw.get("python_distributions") or ()),
                limits=limits,
                url=raw.get("url", ""),
                recheck_seconds=float(raw.get("recheck_seconds", 30.0)),
                egress=tuple(raw.get("egress") or ()),
            ))
        except ValueError as exc:
            raise ConfigurationError(f"mcp server {name}: {exc}") from exc
    return tuple(upstreams)


def _limits(given: dict[str, Any]) -> ResourceLimits:
    """An upstream's container limits: the defaults, with what the operator set."""
    default = ResourceLimits()
    return ResourceLimits(
        wall_seconds=float(given.get("wall_seconds", default.wall_seconds)),
        memory_bytes=given.get("memory_bytes", default.memory_bytes),
        pids=given.get("pids", default.pids),
        cpus=float(given.get("cpus", default.cpus)),
        output_bytes=given.get("output_bytes", default.output_bytes),
        tmp_bytes=given.get("tmp_bytes", default.tmp_bytes),
        open_files=given.get("open_files", default.open_files),
    )


def upstream_tool_digest(server: str, tool: types.Tool) -> Sha256Hex:
    """SHA-256 of the canonical definition: server, name, description, input schema."""
    return canonical_sha256({"server": server, "name": tool.name,
                             "description": tool.description or "",
                             "input_schema": tool.input_schema})


def namespaced(server: str, tool_name: str) -> str | None:
    """``server__tool`` when that is a valid callward tool name, else None."""
    name = f"{server}{NAMESPACE_SEPARATOR}{tool_name}"
    return name if is_tool_name(name) and _TOOL_PART.match(tool_name) else None


def raw_mcp_section(config_path: Path) -> Any:
    """The configuration file's ``mcp`` section (validated by ``parse_mcp_section``)."""
    import yaml  # noqa: PLC0415 - as _config reads it

    raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    return raw.get("mcp") if isinstance(raw, dict) else None
