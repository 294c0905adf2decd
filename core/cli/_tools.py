"""
``callward tools list / history / load / unload / activate / rollback``: the live registry.

The commands change ``HOME/registry.db`` and write each change, with the tool's
digest, to ``HOME/audit.db``; a gateway running on the same home picks the
change up before its next call. With a ``store`` in the configuration they change
the fleet's registry and write to its one log: every replica picks the change up
before its next call. The base set is the configuration's ``tools:``
and its ``models_as_tools`` (listed by digest without loading a model; ``unload``
withdraws a model tool and a running gateway stops its worker, ``activate``
reinstates it).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from callward.core.cli._common import (
    EXIT_OK,
    Subcommands,
    config_options,
    config_path,
    print_json,
    subcommand_options,
)
from callward.core.gateway._config import GatewayConfig, Home, load_config, open_live_registry
from callward.core.registry._live import LiveRegistry
from callward.core.registry._registry import ToolRegistry
from callward.core.registry._store import RegistryStore
from callward.core.types import ToolSpec

if TYPE_CHECKING:
    from callward.core.registry._store_postgres import PostgresRegistryStore


@contextlib.contextmanager
def _registry(config: GatewayConfig, home: Home
              ) -> Iterator[tuple[ToolRegistry, RegistryStore | PostgresRegistryStore]]:
    home.create()
    registry, store = open_live_registry(config, home)
    try:
        yield registry, store
    finally:
        store.close()


@contextlib.contextmanager
def _live(args: argparse.Namespace, home: Home) -> Iterator[LiveRegistry]:
    """
    The live registry, writing to the audit log as the configured gateway does (the
    fleet's store and log when the configuration has a ``store``).
    """
    from callward.core.gateway._stores import audit_store_for  # noqa: PLC0415

    config = load_config(config_path(args, home))
    with _registry(config, home) as (registry, store), \
            audit_store_for(config, home) as audit:
        yield LiveRegistry(registry, store, audit)


def _list(args: argparse.Namespace, home: Home) -> int:
    with _registry(load_config(config_path(args, home)), home) as (registry, _store):
        entries = sorted((*registry.versions(), *registry.withdrawn()),
                         key=lambda e: (e.spec.name, e.spec.version))
    if args.json:
        print_json([entry.to_json() for entry in entries])
        return EXIT_OK
    rows = [("NAME", "VERSION", "ACTIVE", "DIGEST", "ORIGIN", "LABELS", "MODEL", "SOURCE")]
    rows += [(e.spec.name, e.spec.version,
              "unloaded" if e.withdrawn else "*" if e.active else "", e.spec.digest[:16],
              e.origin, ",".join(e.spec.labels), _model(e.spec), e.source_path)
             for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)),
                         row[-1]]).rstrip())
    return EXIT_OK


def _model(spec: ToolSpec) -> str:
    model = spec.model
    return "" if model is None else f"{model.name}@{model.version}:{model.sha256[:16]}"


def _history(args: argparse.Namespace, home: Home) -> int:
    with _registry(load_config(config_path(args, home)), home) as (registry, store):
        entries = store.history(args.name)
        active = registry.active_version(args.name)
    print_json({"name": args.name, "active": active,
                "history": [{"seq": e.seq, "action": e.action, "version": e.version,
                             "previous": e.previous, "at": e.at} for e in entries]})
    return EXIT_OK


def _load(args: argparse.Namespace, home: Home) -> int:
    with _live(args, home) as live:
        changes = live.load(Path(args.path), activate=not args.inactive)
    print_json([change.to_json() for change in changes])
    return EXIT_OK


def _unload(args: argparse.Namespace, home: Home) -> int:
    with _live(args, home) as live:
        changes = live.unload(args.ref, force=args.force)
    print_json([change.to_json() for change in changes])
    return EXIT_OK


def _activate(args: argparse.Namespace, home: Home) -> int:
    with _live(args, home) as live:
        change = live.activate(args.ref)
    print_json([] if change is None else [change.to_json()])
    return EXIT_OK


def _rollback(args: argparse.Namespace, home: Home) -> int:
    with _live(args, home) as live:
        change = live.rollback(args.name)
    print_json([change.to_json()])
    return EXIT_OK


def add_commands(commands: Subcommands) -> None:
    """Add ``tools list / history / load / unload / activate / rollback``."""
    tools = commands.add_parser("tools", help="the tool registry: versions, loading, rollback")
    sub = tools.add_subparsers(dest="tools_command", required=True, metavar="COMMAND")
    parents = [subcommand_options(), config_options()]

    listing = sub.add_parser("list", parents=parents,
                             help="every version with its digest, origin, model "
                                  "(name@version:weights sha256), active or unloaded")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_list)

    history = sub.add_parser("history", parents=parents,
                             help="how NAME's active version changed (what rollback walks)")
    history.add_argument("name", metavar="NAME")
    history.set_defaults(handler=_history)

    load = sub.add_parser("load", parents=parents,
                          help="load the @tool functions of a .py file as new versions (audited)")
    load.add_argument("path", metavar="PATH")
    load.add_argument("--inactive", action="store_true",
                      help="load without making the new versions active")
    load.set_defaults(handler=_load)

    unload = sub.add_parser("unload", parents=parents,
                            help="remove a loaded version NAME@VERSION, or withdraw a model "
                                 "tool (its worker stops; `activate` brings it back) (audited)")
    unload.add_argument("ref", metavar="NAME@VERSION")
    unload.add_argument("--force", action="store_true",
                        help="also unload the active version; the previous one takes over")
    unload.set_defaults(handler=_unload)

    activate = sub.add_parser("activate", parents=parents,
                              help="make NAME@VERSION the version calls to NAME run, or "
                                   "reinstate an unloaded model tool (audited)")
    activate.add_argument("ref", metavar="NAME@VERSION")
    activate.set_defaults(handler=_activate)

    rollback = sub.add_parser("rollback", parents=parents,
                              help="re-activate the version active before the current one")
    rollback.add_argument("name", metavar="NAME")
    rollback.set_defaults(handler=_rollback)
