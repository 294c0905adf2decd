"""``callward mcp …``: callward as an MCP gateway."""

from __future__ import annotations

import argparse

import structlog

from callward.core.cli._common import (
    EXIT_OK,
    Subcommands,
    config_options,
    config_path,
    print_json,
    skip_probes,
    subcommand_options,
)
from callward.core.errors import ConfigurationError
from callward.core.gateway._config import Home

DEFAULT_PORT = 8750

log = structlog.get_logger()


def _serve(args: argparse.Namespace, home: Home) -> int:
    # The CLI edge loads the SDK, docker and the stages only when the command runs.
    from callward.core.mcp._auth import parse_clients  # noqa: PLC0415
    from callward.core.mcp._content import UpstreamContent  # noqa: PLC0415
    from callward.core.mcp._gateway import open_upstreams  # noqa: PLC0415
    from callward.core.mcp._oidc import OidcVerifier, parse_oidc  # noqa: PLC0415
    from callward.core.mcp._section import raw_mcp_section  # noqa: PLC0415
    from callward.core.mcp._server import (  # noqa: PLC0415
        McpFace,
        require_loopback,
        run_stdio,
        serve_http,
    )
    from callward.core.observe._metrics import serving_metrics  # noqa: PLC0415

    path = config_path(args, home)
    section = raw_mcp_section(path)
    tokens = parse_clients(section.get("clients") if isinstance(section, dict) else None)
    oidc_settings = parse_oidc(section.get("auth") if isinstance(section, dict) else None,
                               base=path.parent)
    oidc = None if oidc_settings is None else OidcVerifier(oidc_settings)
    if args.transport == "http":
        require_loopback(args.host)
    if args.principal is None and (args.transport == "stdio" or (tokens is None
                                                                  and oidc is None)):
        raise ConfigurationError("--principal is needed unless HTTP clients are configured "
                                 "with bearer tokens (mcp.clients) or OIDC (mcp.auth.oidc)")
    with open_upstreams(path, home=home.root,
                        unsafe_skip_probes=skip_probes(args)) as (gateway, upstreams), \
            serving_metrics(gateway, args.metrics_port):
        face = McpFace(gateway, principal=args.principal or "", session_id=args.session,
                       content=UpstreamContent.of(gateway, upstreams.connections))
        if args.transport == "stdio":
            try:
                run_stdio(face, portal=upstreams.portal)
            except KeyboardInterrupt:  # Ctrl-C stops a server; the log still closes in order
                log.info("mcp_serve_interrupted")
        else:
            serve_http(face, host=args.host, port=args.port, tokens=tokens,
                       audit=gateway.audit, oidc=oidc)
    return EXIT_OK


def _tools(args: argparse.Namespace, home: Home) -> int:
    from callward.core.mcp._gateway import open_upstreams  # noqa: PLC0415

    with open_upstreams(config_path(args, home), home=home.root) as (_gateway, upstreams):
        print_json([status.to_json() for status in upstreams.statuses])
    return EXIT_OK


def _approve(args: argparse.Namespace, home: Home) -> int:
    from callward.core.mcp._gateway import open_upstreams  # noqa: PLC0415

    with open_upstreams(config_path(args, home), home=home.root,
                        servers=(args.server,)) as (_gateway, upstreams):
        if args.server not in upstreams.connections:
            raise ConfigurationError(f"no upstream MCP server is named {args.server}")
        approved = upstreams.approve(args.server, tuple(args.tool or ()))
    print_json([status.to_json() for status in approved])
    return EXIT_OK


def add_commands(commands: Subcommands) -> None:
    """Add ``mcp serve``, ``mcp tools`` and ``mcp approve``."""
    mcp = commands.add_parser("mcp", help="callward as an MCP gateway")
    mcp_commands = mcp.add_subparsers(dest="mcp_command", required=True, metavar="COMMAND")
    serve = mcp_commands.add_parser(
        "serve", parents=[subcommand_options(), config_options()],
        help="serve the registry's tools (and approved upstream tools) over MCP")
    serve.add_argument("--principal", help="who the calls are made as (over HTTP with "
                       "mcp.clients configured, each client is its bearer token's principal)")
    serve.add_argument("--session", default="", help="the policy session of the calls")
    serve.add_argument("--transport", choices=("stdio", "http"), default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="loopback address for http")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port for http")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="serve Prometheus metrics on 127.0.0.1:PORT/metrics")
    serve.set_defaults(handler=_serve)

    tools = mcp_commands.add_parser(
        "tools", parents=[subcommand_options(), config_options()],
        help="connect the upstream MCP servers and show each tool's digest and status")
    tools.set_defaults(handler=_tools)

    approve = mcp_commands.add_parser(
        "approve", parents=[subcommand_options(), config_options()],
        help="pin the current definitions of an upstream server's tools (audited)")
    approve.add_argument("server", help="the upstream server, as named in the configuration")
    approve.add_argument("--tool", action="append",
                         help="the upstream tool name (repeat; all pending or changed if none)")
    approve.set_defaults(handler=_approve)
