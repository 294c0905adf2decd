"""
``callward plan run FILE`` and ``callward plan validate FILE``.

``run`` prints each step's outcome and receipt as JSON and exits 0 when every
step ended ``ok``, 1 when any was denied, failed or skipped, and 2 when the
plan is refused (audited as ``plan.rejected``; nothing ran). ``validate``
checks a plan against the configured registry without running or recording
anything: 0 valid, 2 refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from callward.core.cli._common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Subcommands,
    config_options,
    config_path,
    fail,
    print_json,
    skip_probes,
    subcommand_options,
)
from callward.core.gateway._config import Home, load_config, load_registry
from callward.core.plans._document import MAX_PARALLEL, PlanInvalid, load_plan


def _max_parallel(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_PARALLEL:
        raise argparse.ArgumentTypeError(f"from 1 to {MAX_PARALLEL}")
    return value


def _run(args: argparse.Namespace, home: Home) -> int:
    from callward.core.gateway import Gateway  # noqa: PLC0415
    from callward.core.plans._run import run_plan_file  # noqa: PLC0415 - loads the gateway's parts

    with Gateway.from_config(config_path(args, home), home=home.root,
                             unsafe_skip_probes=skip_probes(args)) as gateway:
        try:
            report = run_plan_file(gateway, Path(args.file), principal=args.principal,
                                   session_id=args.session or None,
                                   max_parallel=args.max_parallel)
        except PlanInvalid as exc:
            print_json({"ok": False, "problems": [p.to_json() for p in exc.problems]})
            return fail(exc, EXIT_USAGE)
    print_json(report.to_json())
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


def _validate(args: argparse.Namespace, home: Home) -> int:
    registry = load_registry(load_config(config_path(args, home)))
    try:
        plan = load_plan(Path(args.file), tools={spec.name for spec in registry})
    except PlanInvalid as exc:
        print_json({"ok": False, "problems": [p.to_json() for p in exc.problems]})
        return fail(exc, EXIT_USAGE)
    print_json({"ok": True, **plan.to_json(), "order": list(plan.order)})
    return EXIT_OK


def add_commands(commands: Subcommands) -> None:
    plan = commands.add_parser("plan", help="plans: tool calls that take earlier calls' outputs")
    plan_commands = plan.add_subparsers(dest="plan_command", required=True, metavar="COMMAND")

    run = plan_commands.add_parser("run", parents=[subcommand_options(), config_options()],
                                   help="run every step of a plan through the gateway")
    run.add_argument("file", metavar="FILE", help="the plan (YAML, or .json)")
    run.add_argument("--principal", required=True)
    run.add_argument("--session", default="",
                     help="the policy session of the steps (default: a fresh one per run)")
    run.add_argument("--max-parallel", type=_max_parallel, default=None,
                     help="at most this many steps at once (default: the plan's, else 4)")
    run.set_defaults(handler=_run)

    validate = plan_commands.add_parser("validate",
                                        parents=[subcommand_options(), config_options()],
                                        help="check a plan against the registry; runs nothing")
    validate.add_argument("file", metavar="FILE")
    validate.set_defaults(handler=_validate)
