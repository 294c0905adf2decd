"""
``callward audit …``: security review of the audit log.

The readers (verify, show, query, prove, consistency, export, report) take one log: an
SQLite file (``--db PATH``, default ``HOME/audit.db``) or a fleet's PostgreSQL store
(``--store URL``, or a ``postgresql://`` URL where a path goes, or the ``store:`` of
the configuration). A fleet's log is verified against a set of trusted keys given
explicitly (``--public-key``, ``--keys-dir``): a replica's own key is no fleet's trust.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

import yaml

from callward.core._postgres import StoreUrl, is_store_url
from callward.core._yaml import strict_yaml_load
from callward.core.cli._common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    Subcommands,
    fail,
    print_json,
    subcommand_options,
)
from callward.core.errors import ConfigurationError, VerificationFailed
from callward.core.gateway._config import Home

#: What a reader reads: an SQLite audit database, or a fleet's store.
AuditLogSource = Path | StoreUrl


def _configuration_file(args: argparse.Namespace, home: Home) -> Path | None:
    """The operator's ``callward.yaml`` (never the shipped example), or None."""
    if getattr(args, "config", None):
        return Path(args.config)
    if env := os.environ.get("CALLWARD_CONFIG"):
        return Path(env)
    return home.config if home.config.is_file() else None


def store_url_from_config(args: argparse.Namespace, home: Home) -> StoreUrl | None:
    """
    The fleet store the configuration names (``store: {url, password_file}``), or None
    when there is no configuration or it names no store.

    Read from the file's YAML directly, so that a reader needs none of what the
    gateway's configuration loads (tools, policy).

    Raises:
        ConfigurationError: The file cannot be read as YAML, or its store is invalid
            (a URL with a password is refused).
    """
    path = _configuration_file(args, home)
    if path is None:
        return None
    try:
        raw: Any = strict_yaml_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigurationError(
            f"configuration {path} cannot be read ({type(exc).__name__})",
            remediation="fix the file, or name the log with --db PATH or --store URL",
        ) from exc
    store = raw.get("store") if isinstance(raw, dict) else None
    if store is None:
        return None
    if not isinstance(store, dict):
        raise ConfigurationError(f"configuration {path}: store must be a mapping")
    password_file = store.get("password_file")
    if isinstance(password_file, str):
        password_file = str((path.parent / password_file).resolve())
    return StoreUrl.parse(store.get("url"), password_file=password_file)


def audit_source(args: argparse.Namespace, home: Home, *, option: str = "db") -> AuditLogSource:
    """
    The log a reading command reads: ``--store URL``; else ``--db``/``--log`` (named by
    ``option``), a path or a ``postgresql://`` URL; else the configuration's store;
    else ``HOME/audit.db``.

    Raises:
        ConfigurationError: Both given, or a URL that is invalid or holds a password.
    """
    store = getattr(args, "store", None)
    given = getattr(args, option, None)
    if store and given:
        raise ConfigurationError(f"give --store or --{option}, not both")
    if store:
        return StoreUrl.parse(store)
    if given:
        return StoreUrl.parse(given) if is_store_url(given) else Path(given)
    configured = store_url_from_config(args, home)
    return configured if configured is not None else home.audit_db


def source_name(source: AuditLogSource) -> str:
    """How output names the log: its path, or its URL (which never holds a password)."""
    return source.url if isinstance(source, StoreUrl) else str(source)


def _db(args: argparse.Namespace, home: Home) -> Path:
    """The SQLite file a writing command (checkpoint, rotate-key) changes."""
    given = getattr(args, "db", None)
    if is_store_url(given):
        raise ConfigurationError(
            "this command changes an SQLite audit database; a fleet's store is written "
            "by its replicas", remediation="pass --db PATH of an audit.db")
    return Path(given) if given else home.audit_db


def _public_keys(
    args: argparse.Namespace, home: Home, source: AuditLogSource | None = None
) -> list[Path]:
    """
    ``--public-key`` (repeatable: the keys before and after a rotation, or a fleet's
    set) and every ``*.pub`` of ``--keys-dir``; else HOME's, except for a fleet's
    store, whose trusted keys must be named.
    """
    keys = [Path(k) for k in (args.public_key or [])]
    keys_dir = getattr(args, "keys_dir", None)
    if keys_dir:
        found = sorted(Path(keys_dir).glob("*.pub")) if Path(keys_dir).is_dir() else []
        if not found:
            raise ConfigurationError(f"--keys-dir {keys_dir} holds no *.pub public key",
                                     remediation="pass a directory of PEM public keys")
        keys += found
    if not keys:
        if isinstance(source, StoreUrl):
            raise ConfigurationError(
                f"a fleet's log ({source.url}) is verified against the set of keys its "
                "replicas sign with, and none was given",
                remediation="pass --public-key PATH (repeatable) or --keys-dir DIR")
        keys = [home.public_key]
    for key in keys:
        if not key.is_file():
            raise ConfigurationError(f"public key {key} does not exist",
                                     remediation="pass --public-key PATH")
    return keys


def _failed(exc: VerificationFailed, **where: object) -> int:
    print_json({"verdict": "FAILED", "seq": exc.seq, "reason": exc.message, **where})
    return EXIT_CHECK_FAILED


def _verify(args: argparse.Namespace, home: Home) -> int:
    from callward.audit import verify  # noqa: PLC0415 - the CLI edge loads the stage it runs

    try:
        db = audit_source(args, home)
        keys = _public_keys(args, home, db)
    except ConfigurationError as exc:
        return fail(exc)
    witnesses = [Path(w) for w in args.witness or []]
    try:
        verified = verify(db, list(keys), workers=args.workers, witnesses=witnesses)
    except VerificationFailed as exc:
        return _failed(exc, log=source_name(db))
    print_json({"verdict": "OK", "records": verified.records, "head": verified.head_hash,
                "root": verified.root_hash, "checkpoints": verified.checkpoints,
                "witnesses": verified.witnessed, "key_ids": list(verified.key_ids),
                "first_ts": verified.first_ts, "last_ts": verified.last_ts,
                "log": source_name(db)})
    return EXIT_OK


def _show(args: argparse.Namespace, home: Home) -> int:
    from callward.audit import read_records  # noqa: PLC0415

    db = audit_source(args, home)
    for record in read_records(db, start=args.seq or 1, last=args.last, kind=args.kind):
        print(json.dumps({"seq": record.seq, "ts": record.ts, "kind": record.kind,
                          "prev": record.prev, "hash": record.record_hash,
                          "key_id": record.key_id, "body": record.body}, ensure_ascii=False))
        if args.seq and not args.last and not args.kind:
            break
    return EXIT_OK


def _prove(args: argparse.Namespace, home: Home) -> int:
    from callward.audit import prove  # noqa: PLC0415

    print_json(prove(audit_source(args, home), args.seq, tree_size=args.tree_size))
    return EXIT_OK


def _verify_receipt(args: argparse.Namespace, home: Home) -> int:
    from callward.audit import load_public_key, verify_receipt  # noqa: PLC0415

    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text("utf-8")
        receipt = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return fail(ConfigurationError(f"cannot read receipt {args.file} as JSON ({exc})"))
    if isinstance(receipt, dict) and isinstance(receipt.get("receipt"), dict):
        receipt = receipt["receipt"]  # a whole ToolResult, as `callward call` prints it
    if not isinstance(receipt, dict):
        return fail(ConfigurationError(f"receipt {args.file} is not a JSON object"))
    keys = [load_public_key(key) for key in _public_keys(args, home)]
    try:
        verified = verify_receipt(receipt, keys)
    except VerificationFailed as exc:
        return _failed(exc, receipt=args.file)
    print_json({"verdict": "OK", "seq": verified.seq, "record_hash": verified.record_hash,
                "log": verified.origin, "tree_size": verified.tree_size,
                "root": verified.root_hash, "record_checked": verified.record_checked})
    return EXIT_OK


def _size_or_file(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _consistency(args: argparse.Namespace, home: Home) -> int:
    from callward.audit import consistency, load_public_key  # noqa: PLC0415

    db = audit_source(args, home)
    keys = [load_public_key(key) for key in _public_keys(args, home, db)]
    try:
        proof = consistency(db, _size_or_file(args.old), _size_or_file(args.new), keys)
    except VerificationFailed as exc:
        return _failed(exc, old=args.old, new=args.new)
    print_json({"verdict": "OK", **proof})
    return EXIT_OK


def _checkpoint(args: argparse.Namespace, home: Home) -> int:
    from callward.audit import FileSigner, SQLiteAuditStore  # noqa: PLC0415

    signer = FileSigner.load_or_create(home.keys_dir)
    with SQLiteAuditStore(_db(args, home), signer) as store:
        checkpoint = store.checkpoint()
    if checkpoint is None:
        print_json({"checkpoint": None, "size": 0})
    else:
        print_json({"checkpoint": checkpoint.note, "size": checkpoint.size})
    return EXIT_OK


def _rotate_key(args: argparse.Namespace, home: Home) -> int:
    from callward.audit import rotate_file_key  # noqa: PLC0415

    old, new = rotate_file_key(home.keys_dir, _db(args, home))
    print_json({"previous_key_id": old, "key_id": new,
                "public_key": str(home.public_key),
                "retired_public_key": str(home.keys_dir / "retired" / f"{old}.pub"),
                "note": "restart running gateways: they refuse to append with the old key"})
    return EXIT_OK


def _query(args: argparse.Namespace, home: Home) -> int:
    from callward.audit import CallFilter, query_calls  # noqa: PLC0415

    selected = CallFilter(principal=args.principal, tool=args.tool, kind=args.kind,
                          outcome=args.outcome, since=args.since, until=args.until,
                          session=args.session, call_id=args.call_id)
    for row in query_calls(audit_source(args, home), selected):
        print(json.dumps(row, ensure_ascii=False))
    return EXIT_OK


def _export(args: argparse.Namespace, home: Home) -> int:
    from callward.audit import export_records  # noqa: PLC0415

    db = audit_source(args, home)
    out = sys.stdout if args.output in (None, "-") else Path(args.output).open(  # noqa: SIM115
        "w", encoding="utf-8")
    try:
        count = export_records(db, out, format=args.format)
    finally:
        if out is not sys.stdout:
            out.close()
    print(json.dumps({"exported": count, "format": args.format}), file=sys.stderr)
    return EXIT_OK


def _report(args: argparse.Namespace, home: Home) -> int:
    from callward.audit import load_public_key, render_report  # noqa: PLC0415

    db = audit_source(args, home)
    keys = [load_public_key(key) for key in _public_keys(args, home, db)]
    html = render_report(db, keys, witnesses=[Path(w) for w in args.witness or []])
    Path(args.output).write_text(html, encoding="utf-8")
    print_json({"report": args.output, "bytes": len(html.encode())})
    return EXIT_OK


def _with_db(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--db", help="audit database (default HOME/audit.db)")
    return parser


def add_store_options(parser: argparse.ArgumentParser, *, config: bool = True) -> None:
    """``--store URL`` (and ``--config``, whose ``store:`` is the default) for a reader."""
    parser.add_argument("--store", metavar="URL",
                        help="a fleet's PostgreSQL store, postgresql://USER@HOST:PORT/DB "
                             "(never a password: libpq reads PGPASSWORD or a 0600 password "
                             "file); default: the configuration's store, if any")
    if config:
        parser.add_argument("--config", help="configuration whose store: to read "
                                             "(default $CALLWARD_CONFIG or HOME/callward.yaml)")


def _with_source(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--db", help="audit database, or a fleet's postgresql:// store URL "
                                     "(default: the configuration's store, else "
                                     "HOME/audit.db)")
    add_store_options(parser)
    return parser


def _with_keys(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--public-key", action="append",
                        help="PEM public key (default HOME/keys/...pub); repeat for a key set")
    parser.add_argument("--keys-dir", metavar="DIR",
                        help="trust every *.pub in DIR (a fleet's replicas' public keys)")
    return parser


def _workers(text: str) -> int | Literal["auto"]:
    if text == "auto":
        return "auto"
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a number of processes, or auto") from None
    if count < 1:
        raise argparse.ArgumentTypeError("at least 1 process")
    return count


def add_commands(commands: Subcommands) -> None:
    """Add ``audit verify / show / prove / verify-receipt / consistency / checkpoint /
    rotate-key / query / export / report``."""
    audit = commands.add_parser("audit", help="security review of the audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return audit_commands.add_parser(name, parents=[subcommand_options()], help=help_text)

    verify = _with_keys(_with_source(command(
        "verify", "verify the log offline with the public key(s)")))
    verify.add_argument("--witness", action="append",
                        help="a witness's checkpoint file or directory (repeatable)")
    verify.add_argument("--workers", type=_workers, default="auto",
                        help="processes checking signatures: a number, or auto (the default: "
                             "one per core for logs of 50,000 records or more)")
    verify.set_defaults(handler=_verify)

    show = _with_source(command("show", "print records as JSON lines"))
    show.add_argument("--seq", type=int, help="the record with this seq (or start here)")
    show.add_argument("--last", type=int, help="only the last N records")
    show.add_argument("--kind", help="only records of this kind, e.g. call.denied")
    show.set_defaults(handler=_show)

    prove = _with_source(command(
        "prove", "print the receipt of record SEQ with its inclusion proof"))
    prove.add_argument("seq", type=int, metavar="SEQ")
    prove.add_argument("--tree-size", type=int, help="under the checkpoint of this size")
    prove.set_defaults(handler=_prove)

    receipt = _with_keys(command("verify-receipt", "check a receipt with only the public key"))
    receipt.add_argument("file", metavar="FILE", help="receipt JSON ('-' for stdin)")
    receipt.set_defaults(handler=_verify_receipt)

    consistency = _with_keys(_with_source(command(
        "consistency", "prove the log only grew between checkpoints OLD and NEW")))
    consistency.add_argument("old", metavar="OLD", help="a checkpoint's tree size, or its file")
    consistency.add_argument("new", metavar="NEW", help="a checkpoint's tree size, or its file")
    consistency.set_defaults(handler=_consistency)

    checkpoint = _with_db(command("checkpoint", "sign and store a checkpoint of the log now"))
    checkpoint.set_defaults(handler=_checkpoint)

    rotate = _with_db(command("rotate-key", "hand the log to a new key, signed by the old"))
    rotate.set_defaults(handler=_rotate_key)

    query = _with_source(command("query", "calls matching every filter given, as JSON lines"))
    for option in ("principal", "tool", "kind", "outcome", "session", "call-id"):
        query.add_argument(f"--{option}")
    query.add_argument("--since", help="RFC 3339 UTC time, inclusive")
    query.add_argument("--until", help="RFC 3339 UTC time, exclusive")
    query.set_defaults(handler=_query)

    export = _with_source(command("export", "every record, for a SIEM"))
    export.add_argument("--format", choices=("jsonl", "ocsf"), default="jsonl",
                        help="JSON Lines of records, or OCSF API Activity events")
    export.add_argument("--output", help="file to write (default stdout)")
    export.set_defaults(handler=_export)

    report = _with_keys(_with_source(command("report", "a self-contained HTML security review")))
    report.add_argument("--output", default="callward-report.html")
    report.add_argument("--witness", action="append")
    report.set_defaults(handler=_report)
