"""
The gateway ``callward mcp serve`` runs: the configured one, plus upstream MCP servers.

Approved upstream tools join the registry under ``<server>__<tool>``; the
policy is wrapped in a ``PinGate`` (unapproved and changed tools are denied)
and the runner in an ``UpstreamRunner`` (upstream tools go to their server).
Everything else is the configured gateway's: the same policy, audit log and
invariants for native and upstream tools.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from callward.core.gateway import Gateway
from callward.core.gateway._config import Home, load_config
from callward.core.mcp._pins import PINS_FILE, PinGate, PinStore
from callward.core.mcp._runner import UpstreamRunner
from callward.core.mcp._section import parse_mcp_section, raw_mcp_section
from callward.core.mcp._upstream import Upstreams, connected_upstreams

if TYPE_CHECKING:
    from callward.core.mcp._pins_postgres import PostgresPinStore


def pin_store(home: Path, *, config: Path | None = None) -> PinStore | PostgresPinStore:
    """
    The operator's approvals of upstream tools: the fleet's table when the configuration
    has a ``store`` (a pin made on one replica holds on all), else a file at home.
    """
    fleet = None if config is None else load_config(config).store
    if fleet is not None:
        from callward.core.mcp._pins_postgres import PostgresPinStore  # noqa: PLC0415

        return PostgresPinStore(fleet.url)
    return PinStore(Home.resolve(home).root / PINS_FILE)


@contextlib.contextmanager
def open_upstreams(path: Path, *, home: Path, servers: tuple[str, ...] | None = None,
                   unsafe_skip_probes: bool = False) -> Iterator[tuple[Gateway, Upstreams]]:
    """
    The gateway of a configuration with its upstream MCP servers, and the connected
    upstreams (for approval and their resources and prompts), all closed on exit.

    Args:
        servers: Connect only these upstreams (all when None).
        unsafe_skip_probes: Start without proving the sandbox first (recorded).

    Raises:
        ConfigurationError: The configuration is invalid or an upstream cannot be reached.
        SandboxUnavailable: An upstream's container could not be started.
    """
    configs = parse_mcp_section(raw_mcp_section(path), base=path.parent)
    if servers is not None:
        configs = tuple(config for config in configs if config.name in servers)
    pins = pin_store(home, config=path)
    with contextlib.ExitStack() as stack:
        if hasattr(pins, "close"):  # the fleet's pin table holds a connection pool
            stack.callback(pins.close)
        base = stack.enter_context(Gateway.from_config(
            path, home=home, unsafe_skip_probes=unsafe_skip_probes))
        upstreams = stack.enter_context(connected_upstreams(configs, audit=base.audit,
                                                            pins=pins))
        for spec in upstreams.specs:
            base.registry.add(spec)
        gateway = Gateway(registry=base.registry,
                          policy=PinGate(base.policy, upstreams.blocked, upstreams.recheck,
                                         upstreams.recheck_awaited),
                          runner=UpstreamRunner(base.runner, upstreams.routes,
                                                frozenset(upstreams.routes)
                                                | frozenset(upstreams.blocked)),
                          audit=base.audit, new_id=base.new_id, observers=base.observers,
                          tracing=base.tracing)
        gateway.share_fleet_membership(base)
        yield gateway, upstreams
