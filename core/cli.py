"""
The ``callward`` command. Exit codes: 0 success, 1 a check failed, 2 bad usage or input.

This is the only module that configures logging (JSON lines on stderr) and
reads the environment (``CALLWARD_HOME``, ``CALLWARD_CONFIG``, ``DOCKER_HOST``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final, NoReturn

import structlog

from callward.core._config import Home, example_config_path, load_config, load_registry
from callward.core.errors import CallwardError, ConfigurationError, VerificationFailed

EXIT_OK: Final = 0
EXIT_CHECK_FAILED: Final = 1
EXIT_USAGE: Final = 2


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


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _fail(error: CallwardError, code: int = EXIT_USAGE) -> int:
    print(error.diagnostics(), file=sys.stderr)
    return code


def _config_path(args: argparse.Namespace, home: Home) -> Path:
    if args.config:
        return Path(args.config)
    if env := os.environ.get("CALLWARD_CONFIG"):
        return Path(env)
    if home.config.is_file():
        return home.config
    return example_config_path()


# -- commands -----------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace, home: Home) -> int:
    from callward.core._demo import run_demo  # noqa: PLC0415 - loads docker only when used

    return run_demo(home=home, config=Path(args.config) if args.config else None)


def _cmd_call(args: argparse.Namespace, home: Home) -> int:
    from callward.core.gateway import Gateway  # noqa: PLC0415

    text = sys.stdin.read() if args.text == "-" else args.text
    gateway = Gateway.from_config(_config_path(args, home), home=home.root)
    try:
        results = gateway.handle_text(text, principal=args.principal, session_id=args.session)
    finally:
        gateway.close()
    _print_json([result.to_json() for result in results])
    if any(result.kind == "malformed" for result in results):
        return EXIT_USAGE
    return EXIT_OK if all(result.ok for result in results) else EXIT_CHECK_FAILED


def _cmd_audit_verify(args: argparse.Namespace, home: Home) -> int:
    from callward.audit import verify  # noqa: PLC0415

    db = Path(args.db) if args.db else home.audit_db
    public_key = Path(args.public_key) if args.public_key else home.public_key
    if not public_key.is_file():
        return _fail(ConfigurationError(f"public key {public_key} does not exist",
                                        remediation="pass --public-key PATH"))
    try:
        verified = verify(db, public_key)
    except VerificationFailed as exc:
        _print_json({"verdict": "FAILED", "seq": exc.seq, "reason": exc.message,
                     "log": str(db)})
        return EXIT_CHECK_FAILED
    _print_json({"verdict": "OK", "records": verified.records, "head": verified.head_hash,
                 "first_ts": verified.first_ts, "last_ts": verified.last_ts, "log": str(db)})
    return EXIT_OK


def _cmd_audit_show(args: argparse.Namespace, home: Home) -> int:
    from callward.audit import read_records  # noqa: PLC0415

    db = Path(args.db) if args.db else home.audit_db
    for record in read_records(db, start=args.seq or 1, last=args.last, kind=args.kind):
        print(json.dumps({"seq": record.seq, "ts": record.ts, "kind": record.kind,
                          "prev": record.prev, "hash": record.record_hash,
                          "key_id": record.key_id, "body": record.body}, ensure_ascii=False))
        if args.seq and not args.last and not args.kind:
            break
    return EXIT_OK


def _cmd_sandbox_build_image(args: argparse.Namespace, home: Home) -> int:
    from callward.sandbox import ensure_image  # noqa: PLC0415

    image = ensure_image(rebuild=args.rebuild)
    _print_json({"tag": image.tag, "digest": image.digest})
    return EXIT_OK


def _cmd_tools_list(args: argparse.Namespace, home: Home) -> int:
    registry = load_registry(load_config(_config_path(args, home)))
    _print_json([{"name": spec.name, "version": spec.version, "digest": spec.digest,
                  "description": spec.description, "labels": list(spec.labels),
                  "parameters": spec.parameters} for spec in registry])
    return EXIT_OK


# -- parser -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # The options every command takes, before or after its name. Subcommands get
    # their own copies with SUPPRESS, so that a value given before the command name
    # is not reset (parents share action objects, so one parser cannot serve both).
    def common_options(default_home: object, default_level: object) -> argparse.ArgumentParser:
        options = argparse.ArgumentParser(add_help=False)
        options.add_argument("--home", default=default_home,
                             help="state directory (default $CALLWARD_HOME or ~/.callward)")
        options.add_argument("--log-level", default=default_level,
                             help="operational log level on stderr (default warning)")
        return options

    top = common_options(None, os.environ.get("CALLWARD_LOG_LEVEL", "warning"))
    common = common_options(argparse.SUPPRESS, argparse.SUPPRESS)
    with_config = argparse.ArgumentParser(add_help=False)
    with_config.add_argument("--config", help="gateway configuration (callward.yaml)")

    parser = argparse.ArgumentParser(
        prog="callward", parents=[top],
        description="Run model tool calls through policy, a hardened sandbox and a signed log.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", parents=[common, with_config],
                               help="the main job: model output through the full path, verified")
    demo.set_defaults(handler=_cmd_demo)

    call = commands.add_parser("call", parents=[common, with_config],
                               help="run every call in model output TEXT ('-' for stdin)")
    call.add_argument("text", metavar="TEXT")
    call.add_argument("--principal", required=True)
    call.add_argument("--session", default="")
    call.set_defaults(handler=_cmd_call)

    audit = commands.add_parser("audit", help="security review of the audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    verify = audit_commands.add_parser("verify", parents=[common],
                                       help="verify the log offline with the public key")
    verify.add_argument("--db", help="audit database (default HOME/audit.db)")
    verify.add_argument("--public-key", help="PEM public key (default HOME/keys/...pub)")
    verify.set_defaults(handler=_cmd_audit_verify)
    show = audit_commands.add_parser("show", parents=[common], help="print records as JSON lines")
    show.add_argument("--db", help="audit database (default HOME/audit.db)")
    show.add_argument("--seq", type=int, help="the record with this seq (or start here)")
    show.add_argument("--last", type=int, help="only the last N records")
    show.add_argument("--kind", help="only records of this kind, e.g. call.denied")
    show.set_defaults(handler=_cmd_audit_show)

    sandbox = commands.add_parser("sandbox", help="operate the sandbox")
    sandbox_commands = sandbox.add_subparsers(dest="sandbox_command", required=True,
                                              metavar="COMMAND")
    build = sandbox_commands.add_parser("build-image", parents=[common],
                                        help="build the sandbox image offline (cached)")
    build.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    build.set_defaults(handler=_cmd_sandbox_build_image)

    tools = commands.add_parser("tools", help="the tool registry")
    tools_commands = tools.add_subparsers(dest="tools_command", required=True, metavar="COMMAND")
    tools_list = tools_commands.add_parser("list", parents=[common, with_config],
                                           help="registered tools with versions and digests")
    tools_list.set_defaults(handler=_cmd_tools_list)
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    home = Home.resolve(args.home)
    try:
        code = args.handler(args, home)
    except VerificationFailed as exc:
        code = _fail(exc, EXIT_CHECK_FAILED)
    except CallwardError as exc:
        code = _fail(exc, EXIT_USAGE if isinstance(exc, ConfigurationError) else
                     EXIT_CHECK_FAILED)
    sys.exit(code)


if __name__ == "__main__":
    main()
