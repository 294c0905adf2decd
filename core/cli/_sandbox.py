"""``callward sandbox …``: operating the sandbox."""

from __future__ import annotations

import argparse

from callward.core.cli._common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    Subcommands,
    print_json,
    subcommand_options,
)
from callward.core.gateway._config import Home
from callward.core.types import RUNTIMES


def _build_image(args: argparse.Namespace, home: Home) -> int:
    from callward.sandbox import ensure_image  # noqa: PLC0415 - the CLI edge loads docker

    image = ensure_image(rebuild=args.rebuild)
    print_json({"tag": image.tag, "digest": image.digest})
    return EXIT_OK


def _doctor(args: argparse.Namespace, home: Home) -> int:
    from callward.sandbox import diagnose  # noqa: PLC0415 - the CLI edge loads docker

    checks = diagnose(("runc",) if args.runc_only else RUNTIMES)
    print_json({"ok": all(c.status != "fail" for c in checks),
                "checks": [c.to_json() for c in checks]})
    return EXIT_OK if all(c.status != "fail" for c in checks) else EXIT_CHECK_FAILED


def add_commands(commands: Subcommands) -> None:
    """Add ``sandbox build-image`` and ``sandbox doctor``."""
    sandbox = commands.add_parser("sandbox", help="operate the sandbox")
    sandbox_commands = sandbox.add_subparsers(dest="sandbox_command", required=True,
                                              metavar="COMMAND")
    build = sandbox_commands.add_parser("build-image", parents=[subcommand_options()],
                                        help="build the sandbox image offline (cached)")
    build.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    build.set_defaults(handler=_build_image)
    doctor = sandbox_commands.add_parser(
        "doctor", parents=[subcommand_options()],
        help="check the engine, runtimes, image and cgroups, and prove each limit live",
    )
    doctor.add_argument("--runc-only", action="store_true", help="skip gVisor (runsc)")
    doctor.set_defaults(handler=_doctor)
