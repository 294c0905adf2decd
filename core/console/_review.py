"""
What the console reads and writes, through the functions the command line uses.

The console is a view over the log and the state, never a second source of truth:
records come from ``callward.audit.read_records``/``query_calls``, receipts from
``prove``, the health check from ``verify`` (exactly what ``callward audit verify``
runs), pending proposals from the configuration's policy state, and a decision on a
proposal goes through ``Policy.approve``/``Policy.reject`` with the configuration's audit
store, as ``callward policy approve`` does, so the same signed records appear.

Invariants:

- Reading never writes: the log is opened read-only by the audit readers.
- Every write (a login, a refused login, an approval) is one signed record in the log
  the gateways write, appended before the console answers; a write that fails fails
  the request.
"""

from __future__ import annotations

import base64
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from callward.audit import (
    CallFilter,
    DirectoryWitness,
    FileSigner,
    VerifiedLog,
    key_id_of,
    load_public_key,
    prove,
    query_calls,
    read_records,
    store_settings,
    verify,
)
from callward.audit._query import _matches, call_view
from callward.core._canonical import JSONValue, canonical_bytes
from callward.core._postgres import StoreUrl
from callward.core.console._charts import (
    Chart,
    StatsFunction,
    calls_over_time,
    denials_by_rule,
    latency_per_stage,
)
from callward.core.console._sessions import Role
from callward.core.errors import CallwardError
from callward.core.gateway._config import GatewayConfig, Home, load_registry
from callward.core.gateway._stores import (
    anomaly_state_for,
    audit_store_for,
    policy_state_for,
)
from callward.core.mcp._auth import ClientTokens
from callward.core.mcp._oidc import OidcVerifier
from callward.core.observe._anomaly import resolve
from callward.core.types import AuditRecord
from callward.policies import Policy
from callward.policies._anomaly_state import Anomaly
from callward.policies._replay import replay
from callward.policies._state import Proposal

#: Rows a list page shows at most (the newest); a filter narrows the log first.
MAX_ROWS = 500


@dataclass(frozen=True, slots=True)
class ConsoleSources:
    """
    Where the console reads and writes: the configuration's state and log.

    Attributes:
        audit_source: The log: the home's ``audit.db``, or the fleet's store.
        public_keys: The keys the log is verified against (``callward audit verify``'s).
        tokens: The bearer tokens that may sign in (``mcp.clients``), as hashes; None
            when none are configured.
        oidc: Verifies JWT access tokens (``mcp.auth.oidc``, the verifier the MCP face
            uses); None when OIDC is not configured.
    """

    config: GatewayConfig
    home: Home
    audit_source: Path | StoreUrl
    public_keys: tuple[Path, ...]
    tokens: ClientTokens | None
    oidc: OidcVerifier | None = None

    def __post_init__(self) -> None:
        if self.tokens is None and self.oidc is None:
            raise ValueError("the console signs people in with static tokens, OIDC, or both")


@dataclass(frozen=True, slots=True)
class CallQuery:
    """The calls list's filters: each one that is set must match (see ``matches_rest``)."""

    principal: str | None = None
    tool: str | None = None
    kind: str | None = None
    rule: str | None = None
    since: str | None = None
    until: str | None = None
    session: str | None = None

    def call_filter(self) -> CallFilter:
        return CallFilter(principal=self.principal, tool=self.tool, kind=self.kind,
                          since=self.since, until=self.until, session=self.session)

    def matches_rest(self, view: Mapping[str, JSONValue]) -> bool:
        """
        The filters ``CallFilter`` has no field for: the rule among a denial's reasons, and,
        without a ``kind`` filter, only call records (``call.*``; a kind shows any record).
        """
        reasons = view.get("reasons")
        if self.kind is None and not str(view.get("kind", "")).startswith("call."):
            return False
        return self.rule is None or (isinstance(reasons, list) and self.rule in reasons)


class Review:
    """
    The console's reads and writes over one configuration.

    Args:
        sources: The configuration's log, state, keys and tokens.
        clock: Seconds since the epoch.
        stats: ``callward stats``'s summary of records, for the latency chart (none: no
            latency chart).
    """

    def __init__(self, sources: ConsoleSources, *, clock: Any = time.time,
                 stats: StatsFunction | None = None) -> None:
        self.sources = sources
        self._clock = clock
        self._stats = stats
        self._write_lock = threading.Lock()
        self.last_verify: dict[str, JSONValue] | None = None

    # -- who may do what ------------------------------------------------------

    def policy(self) -> Policy:
        """The policy document in force now (read from its file, as a reload would)."""
        return Policy.from_file(self.sources.config.policy_path)

    def role_of(self, principal: str) -> Role:
        """
        ``approver`` when an approval rule of the policy in force names the principal as an
        approver (by name, or by a role or group the policy file gives it; a rule open to
        anyone names nobody), else ``reader``.

        The roles and groups of an OIDC token do not count here: ``Policy.approve`` checks
        an approver against the policy file's roles and groups only, so a console role
        from a token's roles would offer approvals that the policy then refuses.
        """
        document = self.policy().document
        roles, groups = document.roles_of(principal), document.groups_of(principal)
        for rule in document.approval_rules:
            if not rule.approvers.anyone and rule.approvers.matches(principal, roles, groups):
                return "approver"
        return "reader"

    # -- writes ---------------------------------------------------------------

    def append(self, kind: str, body: Mapping[str, JSONValue]) -> AuditRecord:
        """Sign one record into the configuration's log (the gateways' log)."""
        with self._write_lock:
            store = audit_store_for(self.sources.config, self.sources.home, self._signer())
            store.open()
            try:
                return store.append(kind, body)
            finally:
                store.close()

    def settle(self, proposal_id: str, *, by: str, approve: bool) -> Proposal:
        """
        Approve or reject a proposal as ``by``, exactly as ``callward policy approve`` does:
        ``Policy.approve``/``reject`` on the live state, audited in the gateways' log.

        Raises:
            ApprovalRefused: Unknown, closed or expired proposal, an approver the rule
                does not name, or the proposer approving their own call (audited as
                ``approval.refused``).
        """
        with self._write_lock:
            signer = self._signer()
            state = policy_state_for(self.sources.config, self.sources.home)
            policy = Policy.from_file(self.sources.config.policy_path, state=state,
                                      signer=signer)
            store = audit_store_for(self.sources.config, self.sources.home, signer)
            store.open()
            try:
                settle = policy.approve if approve else policy.reject
                return settle(proposal_id, by=by, audit=store)
            finally:
                store.close()
                state.close()

    def _signer(self) -> FileSigner:
        return FileSigner.load_or_create(self.sources.home.keys_dir)

    # -- reads ----------------------------------------------------------------

    def calls(self, query: CallQuery) -> list[dict[str, JSONValue]]:
        """The newest ``MAX_ROWS`` call records matching ``query``, newest first."""
        rows: deque[dict[str, JSONValue]] = deque(maxlen=MAX_ROWS)
        for view in query_calls(self.sources.audit_source, query.call_filter()):
            if query.matches_rest(view):
                rows.append(view)
        return list(reversed(rows))

    def head(self) -> AuditRecord | None:
        """The newest record, or None for an empty log."""
        return next(iter(read_records(self.sources.audit_source, last=1)), None)

    def calls_after(self, seq: int, query: CallQuery, opened: dict[int, dict[str, JSONValue]]
                    ) -> tuple[int, list[dict[str, JSONValue]]]:
        """
        The call records after ``seq`` matching ``query``, oldest first, and the newest seq
        read. ``opened`` carries the calls still running between polls (``call_view``).
        """
        selected = query.call_filter()
        found: list[dict[str, JSONValue]] = []
        last = seq
        for record in read_records(self.sources.audit_source, start=seq + 1):
            last = record.seq
            view = call_view(record, opened)
            if _matches(view, selected) and query.matches_rest(view):
                found.append(view)
        return last, found

    def record(self, seq: int) -> AuditRecord | None:
        """Record ``seq``, or None."""
        found = next(iter(read_records(self.sources.audit_source, start=seq)), None)
        return found if found is not None and found.seq == seq else None

    def story(self, record: AuditRecord) -> dict[str, Any]:
        """
        Everything the log holds about the call of ``record``: its records in order, the
        model turn that emitted it (when the call names one), provenance links.
        """
        body = record.body
        call_id = _call_id(body)
        related: list[AuditRecord] = []
        if call_id is not None:
            seqs = [int(str(view["seq"])) for view in
                    query_calls(self.sources.audit_source, CallFilter(call_id=call_id))]
            related = [r for r in (self.record(s) for s in seqs) if r is not None]
        if not related:
            related = [record]
        origin = next((r.body.get("model") for r in related
                       if isinstance(r.body.get("model"), dict)), None)
        turn = self._model_turn(origin) if isinstance(origin, dict) else None
        provenance = next((r.body.get("provenance") for r in related
                           if isinstance(r.body.get("provenance"), dict)), None)
        return {"call_id": call_id, "records": related, "origin": origin, "turn": turn,
                "provenance": provenance}

    def _model_turn(self, origin: Mapping[str, JSONValue]) -> AuditRecord | None:
        for turn in read_records(self.sources.audit_source, kind="model.turn"):
            if (turn.body.get("run_id") == origin.get("run_id")
                    and turn.body.get("turn") == origin.get("turn")):
                return turn
        return None

    def receipt(self, seq: int) -> tuple[dict[str, JSONValue] | None, str | None]:
        """The receipt of record ``seq`` (``callward audit prove``), or None and why not."""
        try:
            return prove(self.sources.audit_source, seq), None
        except CallwardError as exc:
            return None, exc.message

    def public_keys_raw(self) -> dict[str, str]:
        """The trusted public keys, raw and base64, by key id: what the page verifies with."""
        keys = {}
        for path in self.sources.public_keys:
            try:
                key = load_public_key(path)
            except CallwardError:
                continue
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            keys[str(key_id_of(key))] = base64.b64encode(raw).decode()
        return keys

    def proposals(self) -> list[dict[str, Any]]:
        """Every proposal still open, with its call's canonical arguments from the log."""
        state = policy_state_for(self.sources.config, self.sources.home, existing_only=True)
        try:
            proposals = state.proposals()
        finally:
            state.close()
        now = self._clock()
        pending = [p for p in proposals if p.status_at(now) == "proposed"]
        arguments = self._arguments_of({p.call_id for p in pending})
        return [{"proposal": p, "seconds_left": max(0, int(p.expires - now)),
                 "arguments": arguments.get(p.call_id)} for p in pending]

    def _arguments_of(self, call_ids: set[str]) -> dict[str, tuple[int, str]]:
        """The seq and canonical arguments of the denials that proposed these calls."""
        found: dict[str, tuple[int, str]] = {}
        if not call_ids:
            return found
        for record in read_records(self.sources.audit_source, kind="call.denied"):
            call = record.body.get("call")
            if isinstance(call, dict) and call.get("id") in call_ids:
                arguments = call.get("arguments")
                found[str(call["id"])] = (record.seq, canonical_bytes(
                    arguments if arguments is not None else {}).decode())
        return found

    def anomalies(self) -> list[Anomaly]:
        """The open anomalies, as ``callward anomalies list`` shows them."""
        state = anomaly_state_for(self.sources.config, self.sources.home, existing_only=True)
        try:
            return list(state.listing(status="open"))
        finally:
            state.close()

    def resolve_anomaly(self, anomaly_id: str, *, by: str, reason: str) -> Anomaly | None:
        """
        Close an open anomaly as ``callward anomalies resolve`` does: one
        ``anomaly.resolved`` record, holding the reviewer's reason, signed before the
        anomaly closes.

        Returns:
            The resolved anomaly, or None when none with that id is open (nothing written).
        """
        with self._write_lock:
            state = anomaly_state_for(self.sources.config, self.sources.home)
            store = audit_store_for(self.sources.config, self.sources.home, self._signer())
            store.open()
            try:
                return resolve(state, store, anomaly_id, by=by, now=self._clock(),
                               reason=reason)
            finally:
                store.close()
                state.close()

    def policy_status(self) -> dict[str, Any]:
        """
        The policy document in force, its recent reloads and failures and the shadow
        policy's recent divergences, as ``callward policy status`` reports them.
        """
        status: dict[str, Any] = {"path": str(self.sources.config.policy_path)}
        try:
            document = self.policy().document
        except CallwardError as exc:
            status.update(loads=False, error=exc.message)
        else:
            status.update(loads=True, digest=document.digest, version=document.version,
                          cedar=[name for name, _ in document.cedar_sources],
                          rules=len(document.rules),
                          approval_rules=[{"id": r.id, "tools": sorted(r.tools),
                                           "expires_seconds": r.expires_seconds}
                                          for r in document.approval_rules])
        source = self.sources.audit_source
        events = [r for kind in ("policy.reloaded", "policy.reload_failed")
                  for r in read_records(source, kind=kind, last=5)]
        status["reloads"] = list(iter_json(sorted(events, key=lambda r: r.seq)[-5:]))
        status["shadow"] = list(iter_json(read_records(source, kind="policy.shadow_diverged",
                                                       last=5)))
        last = max((r for kind in ("call.authorized", "call.denied")
                    for r in read_records(source, kind=kind, last=1)),
                   key=lambda r: r.seq, default=None)
        decision = None if last is None else last.body.get("decision")
        status["in_force_digest"] = (decision.get("policy_digest")
                                     if isinstance(decision, dict) else None)
        return status

    def replay(self, candidate_text: str) -> dict[str, JSONValue]:
        """
        ``callward policy replay`` on a pasted candidate: which recorded calls it would
        decide differently. Never writes the live state or the log.

        Raises:
            PolicyInvalid: The candidate is not a valid policy.
        """
        registry = load_registry(self.sources.config)
        with tempfile.TemporaryDirectory(prefix="callward-replay-") as directory:
            candidate = Path(directory) / "candidate.yaml"
            candidate.write_text(candidate_text, encoding="utf-8")
            records = ((r.kind, r.ts, r.body) for r in read_records(self.sources.audit_source))
            return replay(records, candidate, registry).to_json()

    def _witness_directories(self) -> list[Path]:
        settings = store_settings(self.sources.config.audit or {},
                                  base=self.sources.config.source.parent)
        directories = [w.path_for("log").parent for w in settings.witnesses
                       if isinstance(w, DirectoryWitness)]
        return [d for d in directories if d.is_dir()]  # none written yet: nothing to hold

    def witnesses(self, origin: str | None) -> list[dict[str, str | None]]:
        """
        The configured witnesses, and for a directory witness the checkpoint it holds of
        log ``origin`` (unverified text: ``verify_now`` checks it against the log).
        """
        settings = store_settings(self.sources.config.audit or {},
                                  base=self.sources.config.source.parent)
        found: list[dict[str, str | None]] = []
        for witness in settings.witnesses:
            note = None
            if isinstance(witness, DirectoryWitness) and origin is not None:
                try:
                    note = witness.path_for(origin).read_text(encoding="utf-8")[:4096]
                except (OSError, UnicodeDecodeError):
                    note = None
            found.append({"name": witness.name, "checkpoint": note})
        return found

    def charts(self) -> dict[str, Chart]:
        """The charts page: calls over time by kind, denials by rule, latency per stage."""
        records = list(read_records(self.sources.audit_source))
        return {"calls": calls_over_time(records), "denials": denials_by_rule(records),
                "latency": latency_per_stage(records, self._stats)}

    def verify_now(self) -> dict[str, JSONValue]:
        """
        Run ``callward audit verify``'s check over the log, with the configured directory
        witnesses; keep and return the verdict.
        """
        started = self._clock()
        try:
            verified: VerifiedLog = verify(self.sources.audit_source,
                                           list(self.sources.public_keys),
                                           witnesses=self._witness_directories())
        except CallwardError as exc:
            result: dict[str, JSONValue] = {
                "verdict": "FAILED", "seq": getattr(exc, "seq", None), "reason": exc.message}
        else:
            result = {"verdict": "OK", "records": verified.records, "head": verified.head_hash,
                      "root": verified.root_hash, "checkpoints": verified.checkpoints,
                      "key_ids": list(verified.key_ids), "last_ts": verified.last_ts,
                      "witnessed": verified.witnessed}
        result["checked_at"] = started
        self.last_verify = result
        return result


def _call_id(body: Mapping[str, JSONValue]) -> str | None:
    call = body.get("call")
    if isinstance(call, dict) and isinstance(call.get("id"), str):
        return str(call["id"])
    value = body.get("call_id")
    return value if isinstance(value, str) else None


def iter_json(records: Iterable[AuditRecord]) -> Iterator[dict[str, JSONValue]]:
    """Records as ``callward audit show`` prints them."""
    for record in records:
        yield {"seq": record.seq, "ts": record.ts, "kind": record.kind, "prev": record.prev,
               "hash": record.record_hash, "key_id": record.key_id, "body": record.body}


__all__ = ["MAX_ROWS", "CallQuery", "ConsoleSources", "Review", "iter_json"]
