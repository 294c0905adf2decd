"""
``callward policy …``: for policy authors and reviewers.

``lint``, ``test``, ``explain`` and ``replay`` never run a tool and never
write to the live state; ``approve`` and ``reject`` record a decision on a
proposed call in the policy state and in the audit log; ``status`` says which
policy is in force and how its last reloads went.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from callward.core.cli._audit import add_store_options, audit_source, source_name
from callward.core.cli._common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Subcommands,
    config_options,
    config_path,
    print_json,
    subcommand_options,
)
from callward.core.errors import CallwardError, MalformedCall
from callward.core.gateway import new_call_id
from callward.core.gateway._config import Home, load_config, load_registry
from callward.core.gateway._stores import anomaly_state_for, audit_store_for, policy_state_for
from callward.core.parse._front import parse_model_output
from callward.core.types import CallContext

if TYPE_CHECKING:
    from callward.audit import FileSigner
    from callward.core._postgres import StoreUrl
    from callward.policies import Policy


def _policy_path(args: argparse.Namespace, home: Home) -> Path:
    given = getattr(args, "policy", None)
    return Path(given) if given else load_config(config_path(args, home)).policy_path


def _lint(args: argparse.Namespace, home: Home) -> int:
    from callward.policies import Policy  # noqa: PLC0415 - the CLI edge loads stages lazily
    from callward.policies._lint import lint  # noqa: PLC0415

    path = _policy_path(args, home)
    policy = Policy.from_file(path)
    findings = lint(policy, load_registry(load_config(config_path(args, home))))
    errors = [f for f in findings if f.severity == "error"]
    print_json({"policy": str(path), "digest": policy.digest, "ok": not errors,
                "rules": len(policy.document.rules),
                "findings": [f.to_json() for f in findings]})
    return EXIT_CHECK_FAILED if errors else EXIT_OK


def _test(args: argparse.Namespace, home: Home) -> int:
    from callward.policies._cases import load_cases, run_cases  # noqa: PLC0415

    cases_path = Path(args.file)
    cases = load_cases(cases_path)
    policy_path = Path(args.policy) if args.policy else _cases_policy(cases_path, args, home)
    results = run_cases(policy_path, load_registry(load_config(config_path(args, home))), cases,
                        signer=_EphemeralSigner())
    failed = [r for r in results if not r.passed]
    print_json({"policy": str(policy_path), "cases": len(results), "passed":
                len(results) - len(failed), "failed": [r.to_json() for r in failed]})
    for result in failed:
        print(f"FAIL {result.name}: {result.why}", file=sys.stderr)
    return EXIT_CHECK_FAILED if failed else EXIT_OK


def _cases_policy(cases_path: Path, args: argparse.Namespace, home: Home) -> Path:
    import yaml  # noqa: PLC0415

    raw = yaml.safe_load(cases_path.read_text(encoding="utf-8"))
    named = raw.get("policy") if isinstance(raw, dict) else None
    return (cases_path.parent / named) if isinstance(named, str) else _policy_path(args, home)


class _EphemeralSigner:
    """A fresh Ed25519 key for ``policy test``: approvals in a test run are real signatures."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
            Ed25519PrivateKey,
        )

        self._key = Ed25519PrivateKey.generate()

    @property
    def key_id(self) -> str:
        return "policy-test"

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def public_key_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _explain(args: argparse.Namespace, home: Home) -> int:
    from callward.policies import Policy  # noqa: PLC0415

    config = load_config(config_path(args, home))
    registry = load_registry(config)
    # Read the live state (labels, approvals, counters) without changing it: the
    # home's files, or the fleet's store.
    state = policy_state_for(config, home, existing_only=True)
    anomalies = anomaly_state_for(config, home, existing_only=True)
    policy = Policy.from_file(Path(args.policy) if args.policy else config.policy_path,
                              state=state, anomalies=anomalies)
    text = sys.stdin.read() if args.text == "-" else args.text
    try:
        calls = parse_model_output(text, parameter_order=registry.parameter_order,
                                   new_id=new_call_id)
    except MalformedCall as exc:
        print_json({"error": "malformed", "message": exc.message, "offset": exc.offset})
        return EXIT_USAGE
    context = CallContext(args.principal, args.session)
    traces = [
        {"call": {"id": call.id, "name": call.name, "arguments": call.arguments},
         **policy.explain(call, registry.get(call.name), context).to_json()}
        for call in calls
    ]
    state.close()
    anomalies.close()
    print_json({"policy": policy.digest, "principal": args.principal, "calls": traces})
    return EXIT_OK


def _replay(args: argparse.Namespace, home: Home) -> int:
    from callward.audit import read_records  # noqa: PLC0415
    from callward.policies._replay import replay  # noqa: PLC0415

    log_path = audit_source(args, home, option="log")
    if isinstance(log_path, Path) and not log_path.is_file():
        print(f"no audit log at {log_path}", file=sys.stderr)
        return EXIT_USAGE
    registry = load_registry(load_config(config_path(args, home)))
    records = ((r.kind, r.ts, r.body) for r in read_records(log_path))
    report = replay(records, Path(args.policy), registry)
    print_json({"log": source_name(log_path), "candidate": str(args.policy),
                **report.to_json()})
    changed = sum(report.changes.values())
    return EXIT_CHECK_FAILED if changed and args.fail_on_change else EXIT_OK


def _live(args: argparse.Namespace, home: Home) -> tuple[Policy, FileSigner]:
    from callward.audit import FileSigner  # noqa: PLC0415
    from callward.policies import Policy  # noqa: PLC0415

    signer = FileSigner.load_or_create(home.keys_dir)
    state = policy_state_for(load_config(config_path(args, home)), home)
    policy = Policy.from_file(_policy_path(args, home), state=state, signer=signer)
    return policy, signer


def _decide_proposal(args: argparse.Namespace, home: Home, *, approve: bool) -> int:
    from callward.policies import ApprovalRefused  # noqa: PLC0415
    from callward.policies._approvals import approval_record  # noqa: PLC0415

    policy, signer = _live(args, home)
    # The decision is signed into the log the gateways write: the fleet's, with a store.
    store = audit_store_for(load_config(config_path(args, home)), home, signer)
    store.open()
    try:
        settle = policy.approve if approve else policy.reject
        proposal = settle(args.id, by=args.by, audit=store)
    except ApprovalRefused as exc:
        print_json({"ok": False, "proposal": args.id, "message": exc.message})
        return EXIT_CHECK_FAILED
    finally:
        store.close()
        policy.state.close()
    print_json({"ok": True, **approval_record(proposal, policy.digest)})
    return EXIT_OK


def _approve(args: argparse.Namespace, home: Home) -> int:
    return _decide_proposal(args, home, approve=True)


def _reject(args: argparse.Namespace, home: Home) -> int:
    return _decide_proposal(args, home, approve=False)


def _approvals(args: argparse.Namespace, home: Home) -> int:
    import time  # noqa: PLC0415

    state = policy_state_for(load_config(config_path(args, home)), home, existing_only=True)
    now = time.time()
    print_json([{"id": p.id, "status": p.status_at(now), "rule": p.rule_id,
                 "principal": p.principal, "tool": p.tool, "call_id": p.call_id,
                 "arguments_sha256": p.arguments_sha256, "created": p.created,
                 "expires": p.expires, "decided_by": p.decided_by,
                 "used_by_call": p.used_call_id} for p in state.proposals()])
    state.close()
    return EXIT_OK


def _status(args: argparse.Namespace, home: Home) -> int:
    from callward.audit import read_records  # noqa: PLC0415
    from callward.policies import Policy  # noqa: PLC0415

    path = _policy_path(args, home)
    status: dict[str, Any] = {"policy": str(path)}
    try:
        status.update(loads=True, digest=Policy.from_file(path).digest)
    except CallwardError as exc:
        status.update(loads=False, error=exc.message)
    store = _status_store(args, home)
    # The log the gateways write: the fleet's one log (once a replica made it), or the
    # home's file if there is one.
    log: Path | StoreUrl | None = (
        (store if _has_audit_log(store) else None) if store is not None
        else home.audit_db if home.audit_db.is_file() else None)
    events: list[dict[str, Any]] = []
    if log is not None:
        for kind in ("policy.reloaded", "policy.reload_failed"):
            events += [{"seq": r.seq, "ts": r.ts, "kind": r.kind, **r.body}
                       for r in read_records(log, kind=kind, last=5)]
    events.sort(key=lambda e: e["seq"])
    status["recent_reloads"] = events[-5:]
    good = [e for e in events if e["kind"] == "policy.reloaded"]
    status["last_good_digest"] = good[-1]["digest"] if good else None
    status["last_reload_failed"] = bool(events) and events[-1]["kind"] == "policy.reload_failed"
    # The digest the gateway last decided a call with: the policy in force.
    last_calls = []
    if log is not None:
        for kind in ("call.authorized", "call.denied"):
            last_calls += list(read_records(log, kind=kind, last=1))
    last_call = max(last_calls, key=lambda r: r.seq, default=None)
    decision = None if last_call is None else last_call.body.get("decision")
    status["in_force_digest"] = (decision.get("policy_digest")
                                 if isinstance(decision, dict) else None)
    status["shadow_differences"] = _shadow_differences(log)
    if store is not None:  # a fleet: which replicas enforce which policy
        status["replicas"] = _replicas_status(store)
    print_json(status)
    if store is not None:
        print(status["replicas"]["summary"], file=sys.stderr)
    replicas_failed = store is not None and "error" in status["replicas"]
    return EXIT_CHECK_FAILED if not status["loads"] or replicas_failed else EXIT_OK


def _has_audit_log(store: StoreUrl) -> bool:
    """
    Whether a replica has made the fleet's audit tables yet (a fleet whose replicas never
    appended has none). A store that cannot be read says so later, where it is read.
    """
    from psycopg import Error  # noqa: PLC0415 - only for a fleet

    from callward.core._postgres import connect  # noqa: PLC0415

    try:
        with connect(store, application_name="callward-policy-status") as conn:
            (table,) = conn.execute("SELECT to_regclass('callward_schema')").fetchone() or (None,)
            if table is None:
                return False
            row = conn.execute("SELECT 1 FROM callward_schema WHERE component = 'audit'"
                               ).fetchone()
    except Error:
        return True  # let the reader report what is wrong with it
    return row is not None


def _status_store(args: argparse.Namespace, home: Home) -> StoreUrl | None:
    """``--store``, else the configuration's ``store.url``, else None (no fleet)."""
    from callward.core._postgres import StoreUrl  # noqa: PLC0415

    if getattr(args, "store", None):
        return StoreUrl.parse(args.store)
    try:
        fleet = load_config(config_path(args, home)).store
    except CallwardError:  # a --policy given and no readable configuration: no fleet
        return None
    return None if fleet is None else fleet.url


def _replicas_status(store: StoreUrl) -> dict[str, Any]:
    """The fleet's replicas, and whether the live ones enforce one policy."""
    from callward.core.gateway._replicas import policy_digests, replicas  # noqa: PLC0415

    try:
        members = replicas(store)
    except CallwardError as exc:
        return {"store": str(store), "error": exc.message,
                "summary": f"replicas: cannot be read ({exc.message})"}
    digests = policy_digests(members)
    live = sum(member.alive for member in members)
    if len(digests) > 1:
        summary = (f"WARNING: the {live} live replicas enforce {len(digests)} policies: "
                   + ", ".join(digest[:12] for digest in digests))
    elif digests:
        summary = f"replicas: all {live} live replicas enforce policy {digests[0][:12]}"
    else:
        summary = "replicas: none alive"
    return {
        "store": str(store),
        "members": [{"id": m.replica_id, "host": m.host, "pid": m.pid, "version": m.version,
                     "policy_digest": m.policy_digest[:12],
                     "image_digest": m.image_digest[:12],
                     "heartbeat_age_seconds": round(m.age_seconds, 1), "alive": m.alive,
                     "stopped": m.stopped is not None} for m in members],
        "live": live,
        "policy_digests": list(digests),
        "same_policy": len(digests) <= 1,
        "summary": summary,
    }


def _shadow_differences(log: Path | StoreUrl | None) -> dict[str, Any]:
    """The shadow policy's divergences, as the gateway signed them into the audit log."""
    from callward.audit import read_records  # noqa: PLC0415

    if log is None:
        return {"count": 0, "recent": []}
    count = 0
    recent: list[dict[str, Any]] = []
    for record in read_records(log, kind="policy.shadow_diverged"):
        count += 1
        recent = [*recent[-4:], {"seq": record.seq, "ts": record.ts, **record.body}]
    return {"count": count, "recent": recent[::-1]}


def add_commands(commands: Subcommands) -> None:
    """Add ``policy lint / test / explain / replay / status / approve / reject / approvals``."""
    policy = commands.add_parser("policy", help="policy authors and reviewers")
    sub = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")

    def add(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, parents=[subcommand_options(), config_options()],
                                help=help_text)
        parser.set_defaults(handler=handler)
        return parser

    lint = add("lint", _lint, "validate the policy against the registry; unreachable and "
               "shadowed rules")
    lint.add_argument("--policy", help="policy file (default: the configuration's)")
    test = add("test", _test, "run a file of cases; a failing case exits 1")
    test.add_argument("file", metavar="FILE")
    test.add_argument("--policy", help="policy file (default: the cases file's, else config's)")
    explain = add("explain", _explain, "the full decision trace of calls in TEXT, run nowhere")
    explain.add_argument("text", metavar="TEXT")
    explain.add_argument("--principal", required=True)
    explain.add_argument("--session", default="")
    explain.add_argument("--policy", help="policy file (default: the configuration's)")
    replay = add("replay", _replay, "re-decide an audit log under a candidate policy")
    replay.add_argument("--log", help="audit database, or a fleet's postgresql:// store URL "
                                      "(default: the configuration's store, else "
                                      "HOME/audit.db)")
    add_store_options(replay, config=False)  # --config is every policy command's already
    replay.add_argument("--policy", required=True, help="the candidate policy")
    replay.add_argument("--fail-on-change", action="store_true",
                        help="exit 1 when any decision would change")
    status = add("status", _status, "the policy in force, and its recent reloads")
    status.add_argument("--policy", help="policy file (default: the configuration's)")
    status.add_argument("--store", help="the fleet's postgresql:// URL, to list its replicas "
                        "(default: the configuration's store.url, if any)")
    for name, handler, text in (("approve", _approve, "record a signed, single-use approval"),
                                ("reject", _reject, "deny a proposed call")):
        parser = add(name, handler, text)
        parser.add_argument("id", metavar="ID", help="the proposal id (apr_…)")
        parser.add_argument("--by", required=True, help="the approving principal")
        parser.add_argument("--policy", help="policy file (default: the configuration's)")
    add("approvals", _approvals, "proposed calls and what became of them")
