"""``callward sandbox …``: operating the sandbox."""

from __future__ import annotations

import argparse

from callward.core._cli_common import EXIT_OK, Subcommands, print_json, subcommand_options
from callward.core._config import Home


def _build_image(args: argparse.Namespace, home: Home) -> int:
    from callward.sandbox import ensure_image  # noqa: PLC0415 - the CLI edge loads docker

    image = ensure_image(rebuild=args.rebuild)
    print_json({"tag": image.tag, "digest": image.digest})
    return EXIT_OK


def add_commands(commands: Subcommands) -> None:
    """Add ``sandbox build-image``."""
    sandbox = commands.add_parser("sandbox", help="operate the sandbox")
    sandbox_commands = sandbox.add_subparsers(dest="sandbox_command", required=True,
                                              metavar="COMMAND")
    build = sandbox_commands.add_parser("build-image", parents=[subcommand_options()],
                                        help="build the sandbox image offline (cached)")
    build.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    build.set_defaults(handler=_build_image)
