"""What every ``callward`` subcommand module shares: exit codes, options, output."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeAlias

from callward.core.errors import CallwardError
from callward.core.gateway._config import Home, example_config_path

EXIT_OK: Final = 0
EXIT_CHECK_FAILED: Final = 1
EXIT_USAGE: Final = 2

Handler = Callable[[argparse.Namespace, Home], int]


#: What ``ArgumentParser.add_subparsers()`` returns; argparse names no public type for it.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def common_options(default_home: object, default_level: object) -> argparse.ArgumentParser:
    """
    The options every command takes, before or after its name.

    Subcommands get their own copies with ``argparse.SUPPRESS`` defaults, so a
    value given before the command name is not reset (parents share action
    objects, so one parser cannot serve both).
    """
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--home", default=default_home,
                         help="state directory (default $CALLWARD_HOME or ~/.callward)")
    options.add_argument("--log-level", default=default_level,
                         help="operational log level on stderr (default warning)")
    return options


def subcommand_options() -> argparse.ArgumentParser:
    return common_options(argparse.SUPPRESS, argparse.SUPPRESS)


def config_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--config", help="gateway configuration (callward.yaml)")
    options.add_argument(
        "--unsafe-skip-probes", action="store_true",
        help="UNSAFE: serve without first proving the sandbox's protections live "
        "(the start record says so)")
    return options


def skip_probes(args: argparse.Namespace) -> bool:
    """Whether the operator asked to start without the start probes (recorded)."""
    return bool(getattr(args, "unsafe_skip_probes", False))


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def fail(error: CallwardError, code: int = EXIT_USAGE) -> int:
    """Print the error's diagnostics on stderr and return the exit code."""
    print(error.diagnostics(), file=sys.stderr)
    return code


def config_path(args: argparse.Namespace, home: Home) -> Path:
    """``--config``, else ``$CALLWARD_CONFIG``, else ``HOME/callward.yaml``, else the example."""
    if getattr(args, "config", None):
        return Path(args.config)
    if env := os.environ.get("CALLWARD_CONFIG"):
        return Path(env)
    if home.config.is_file():
        return home.config
    return example_config_path()
