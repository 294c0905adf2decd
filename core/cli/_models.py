"""
``callward models list``: the model worker containers running on the Docker Engine.

Read from the engine by their labels (``callward.model_worker``), so it shows the
workers of every gateway on this engine, each with its owner process and the
memory it holds now; a worker stopped by ``callward tools unload`` or evicted
under the memory budget is gone from the list.
"""

from __future__ import annotations

import argparse

from callward.core.cli._common import EXIT_OK, Subcommands, print_json, subcommand_options
from callward.core.gateway._config import Home
from callward.core.types import MIB


def _list(args: argparse.Namespace, _home: Home) -> int:
    # The CLI edge loads the stage it reads.
    from callward.sandbox._model_runner import worker_containers  # noqa: PLC0415

    workers = worker_containers()
    if args.json:
        print_json([worker.to_json() for worker in workers])
        return EXIT_OK
    rows = [("WORKER", "CONTAINER", "PID", "STATE", "MEMORY_MIB", "LIMIT_MIB")]
    rows += [(w.worker, w.container_id[:12], w.owner_pid, w.state,
              "" if w.memory_bytes is None else f"{w.memory_bytes / MIB:.1f}",
              f"{w.memory_limit_bytes / MIB:.0f}") for w in workers]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    return EXIT_OK


def add_commands(commands: Subcommands) -> None:
    """Add ``models list``."""
    models = commands.add_parser("models", help="model workers: what runs and what it holds")
    sub = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    listing = sub.add_parser("list", parents=[subcommand_options()],
                             help="the model worker containers on the engine, with memory use")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_list)
