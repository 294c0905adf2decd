"""
The ``callward`` command. Exit codes: 0 success, 1 a check failed, 2 bad usage or input.

This is the only module that configures logging (JSON lines on stderr) and
reads the environment (``CALLWARD_HOME``, ``CALLWARD_CONFIG``, ``DOCKER_HOST``).
Each group of subcommands lives in its own module (``_audit``,
``_sandbox``, …) with an ``add_commands(commands)`` function.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import structlog

from callward.core.cli import (
    _agent,
    _audit,
    _console,
    _mcp,
    _models,
    _plan,
    _policy,
    _sandbox,
    _stats,
    _tools,
)
from callward.core.cli._common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Subcommands,
    common_options,
    config_options,
    config_path,
    fail,
    print_json,
    skip_probes,
    subcommand_options,
)
from callward.core.cli._demo import add_fleet_options
from callward.core.errors import CallwardError, ConfigurationError, VerificationFailed
from callward.core.gateway._config import Home


def _configure_logging(level_name: str) -> None:
    level = logging.getLevelNamesMapping().get(level_name.upper(), logging.WARNING)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def _demo(args: argparse.Namespace, home: Home) -> int:
    from callward.core.cli._demo import run_demo_command  # noqa: PLC0415 - docker only when used

    return run_demo_command(args, home, unsafe_skip_probes=skip_probes(args))


def _call(args: argparse.Namespace, home: Home) -> int:
    from callward.core.gateway import Gateway  # noqa: PLC0415

    text = sys.stdin.read() if args.text == "-" else args.text
    with Gateway.from_config(config_path(args, home), home=home.root,
                             unsafe_skip_probes=skip_probes(args)) as gateway:
        results = gateway.handle_text(text, principal=args.principal, session_id=args.session)
    print_json([result.to_json() for result in results])
    if any(result.kind == "malformed" for result in results):
        return EXIT_USAGE
    return EXIT_OK if all(result.ok for result in results) else EXIT_CHECK_FAILED


def _add_core_commands(commands: Subcommands) -> None:
    demo = commands.add_parser("demo", parents=[subcommand_options(), config_options()],
                               help="the main job: model output through the full path, verified")
    demo.add_argument("--no-model", action="store_true",
                      help="feed model output in several dialects instead of running the model")
    add_fleet_options(demo)
    demo.set_defaults(handler=_demo)

    call = commands.add_parser("call", parents=[subcommand_options(), config_options()],
                               help="run every call in model output TEXT ('-' for stdin)")
    call.add_argument("text", metavar="TEXT")
    call.add_argument("--principal", required=True)
    call.add_argument("--session", default="")
    call.set_defaults(handler=_call)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callward",
        parents=[common_options(None, os.environ.get("CALLWARD_LOG_LEVEL", "warning"))],
        description="Run model tool calls through policy, a hardened sandbox and a signed log.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_core_commands(commands)
    _audit.add_commands(commands)
    _policy.add_commands(commands)
    _sandbox.add_commands(commands)
    _agent.add_commands(commands)
    _mcp.add_commands(commands)
    _plan.add_commands(commands)
    _stats.add_commands(commands)
    _tools.add_commands(commands)
    _models.add_commands(commands)
    _console.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    home = Home.resolve(args.home)
    try:
        code = args.handler(args, home)
    except VerificationFailed as exc:
        code = fail(exc, EXIT_CHECK_FAILED)
    except CallwardError as exc:
        code = fail(exc, EXIT_USAGE if isinstance(exc, ConfigurationError) else
                    EXIT_CHECK_FAILED)
    except BrokenPipeError:  # the reader went away (| head): nothing left to tell it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_CHECK_FAILED
    except Exception as exc:  # noqa: BLE001 - the command's boundary: one line, never a traceback
        structlog.get_logger().debug("command_failed", exc_info=True)
        print(f"[internal] {type(exc).__name__}: {exc}\n  what to do: this is a bug in "
              "callward; run again with --log-level debug for the traceback and report it",
              file=sys.stderr)
        code = EXIT_CHECK_FAILED
    sys.exit(code)
