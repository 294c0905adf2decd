"""
``callward console``: the review console in a browser, on loopback.

The command resolves what ``callward audit`` and ``callward policy`` would (the
configuration, its log and state, the trusted public keys) and hands it to
``callward.core.console``.
"""

from __future__ import annotations

import argparse

from callward.core.cli._audit import _public_keys, audit_source
from callward.core.cli._common import (
    EXIT_OK,
    Subcommands,
    config_path,
    subcommand_options,
)
from callward.core.cli._stats import stats_from_records
from callward.core.errors import ConfigurationError
from callward.core.gateway._config import Home, load_config

DEFAULT_PORT = 8760


def _console(args: argparse.Namespace, home: Home) -> int:
    # The web stack loads only when the command runs.
    from callward.core.console import ConsoleSources, LoginLimit, Review, serve  # noqa: PLC0415
    from callward.core.mcp._auth import parse_clients  # noqa: PLC0415
    from callward.core.mcp._oidc import OidcVerifier, parse_oidc  # noqa: PLC0415
    from callward.core.mcp._section import raw_mcp_section  # noqa: PLC0415

    path = config_path(args, home)
    config = load_config(path)
    section = raw_mcp_section(path)
    tokens = parse_clients(section.get("clients") if isinstance(section, dict) else None)
    if tokens is not None and not tokens.principals:
        tokens = None
    oidc_settings = parse_oidc(section.get("auth") if isinstance(section, dict) else None,
                               base=path.parent)
    oidc = None if oidc_settings is None else OidcVerifier(oidc_settings)
    if tokens is None and oidc is None:
        raise ConfigurationError(
            "the console signs people in with the bearer tokens of mcp.clients or the "
            f"OIDC tokens of mcp.auth.oidc, and the configuration {path} names neither",
            remediation="add mcp.clients entries (principal, token_sha256) or an "
            "mcp.auth.oidc section to the configuration")
    args.config = str(path)
    source = audit_source(args, home)
    keys = tuple(_public_keys(args, home, source))
    sources = ConsoleSources(config=config, home=home, audit_source=source,
                             public_keys=keys, tokens=tokens, oidc=oidc)
    serve(Review(sources, stats=stats_from_records), host=args.host, port=args.port,
          idle_seconds=args.idle_minutes * 60.0, absolute_seconds=args.absolute_hours * 3600.0,
          unsafe_allow_remote=args.unsafe_allow_remote,
          login_limit=LoginLimit(max_failures=args.login_attempts,
                                 window_seconds=args.login_window_minutes * 60.0))
    return EXIT_OK


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a positive number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("a positive number")
    return value


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a whole number of at least 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError("a whole number of at least 1")
    return value


def add_commands(commands: Subcommands) -> None:
    """Add ``console``."""
    console = commands.add_parser(
        "console", parents=[subcommand_options()],
        help="the review console in a browser: calls, receipts, approvals, log health")
    console.add_argument("--config", help="gateway configuration (callward.yaml)")
    console.add_argument("--host", default="127.0.0.1", help="loopback address (default "
                         "127.0.0.1)")
    console.add_argument("--port", type=int, default=DEFAULT_PORT,
                         help=f"port (default {DEFAULT_PORT})")
    console.add_argument("--public-key", action="append",
                         help="PEM public key the log is verified against (default "
                              "HOME/keys/...pub); repeat for a key set")
    console.add_argument("--keys-dir", metavar="DIR",
                         help="trust every *.pub in DIR (a fleet's replicas' public keys)")
    console.add_argument("--idle-minutes", type=_positive, default=15.0,
                         help="a session unused this long ends (default 15)")
    console.add_argument("--absolute-hours", type=_positive, default=8.0,
                         help="a session this old ends however busy (default 8)")
    console.add_argument("--login-attempts", type=_at_least_one, default=10,
                         help="refused sign-ins one client address may make per window "
                              "before it is refused 429 (default 10)")
    console.add_argument("--login-window-minutes", type=_positive, default=5.0,
                         help="the window of --login-attempts (default 5)")
    console.add_argument("--unsafe-allow-remote", action="store_true",
                         help="UNSAFE: listen on a non-loopback address (plain HTTP: put a "
                              "TLS proxy in front)")
    console.set_defaults(handler=_console)
