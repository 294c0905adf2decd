"""``callward audit …``: security review of the audit log."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from callward.core._cli_common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    Subcommands,
    fail,
    print_json,
    subcommand_options,
)
from callward.core._config import Home
from callward.core.errors import ConfigurationError, VerificationFailed


def _verify(args: argparse.Namespace, home: Home) -> int:
    from callward.audit import verify  # noqa: PLC0415 - the CLI edge loads the stage it runs

    db = Path(args.db) if args.db else home.audit_db
    public_key = Path(args.public_key) if args.public_key else home.public_key
    if not public_key.is_file():
        return fail(ConfigurationError(f"public key {public_key} does not exist",
                                       remediation="pass --public-key PATH"))
    try:
        verified = verify(db, public_key)
    except VerificationFailed as exc:
        print_json({"verdict": "FAILED", "seq": exc.seq, "reason": exc.message, "log": str(db)})
        return EXIT_CHECK_FAILED
    print_json({"verdict": "OK", "records": verified.records, "head": verified.head_hash,
                "first_ts": verified.first_ts, "last_ts": verified.last_ts, "log": str(db)})
    return EXIT_OK


def _show(args: argparse.Namespace, home: Home) -> int:
    from callward.audit import read_records  # noqa: PLC0415

    db = Path(args.db) if args.db else home.audit_db
    for record in read_records(db, start=args.seq or 1, last=args.last, kind=args.kind):
        print(json.dumps({"seq": record.seq, "ts": record.ts, "kind": record.kind,
                          "prev": record.prev, "hash": record.record_hash,
                          "key_id": record.key_id, "body": record.body}, ensure_ascii=False))
        if args.seq and not args.last and not args.kind:
            break
    return EXIT_OK


def add_commands(commands: Subcommands) -> None:
    """Add ``audit verify`` and ``audit show``."""
    audit = commands.add_parser("audit", help="security review of the audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    verify = audit_commands.add_parser("verify", parents=[subcommand_options()],
                                       help="verify the log offline with the public key")
    verify.add_argument("--db", help="audit database (default HOME/audit.db)")
    verify.add_argument("--public-key", help="PEM public key (default HOME/keys/...pub)")
    verify.set_defaults(handler=_verify)
    show = audit_commands.add_parser("show", parents=[subcommand_options()],
                                     help="print records as JSON lines")
    show.add_argument("--db", help="audit database (default HOME/audit.db)")
    show.add_argument("--seq", type=int, help="the record with this seq (or start here)")
    show.add_argument("--last", type=int, help="only the last N records")
    show.add_argument("--kind", help="only records of this kind, e.g. call.denied")
    show.set_defaults(handler=_show)
