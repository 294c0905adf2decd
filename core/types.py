"""
The values that flow through callward's pipeline.

Each is a frozen dataclass validated in ``__post_init__``, so an invalid one
cannot exist. JSON payloads (arguments, schemas, results) are held as RFC 8785
canonical bytes, which are immutable and are exactly what gets hashed; the
``arguments``/``value`` properties decode a fresh copy on every access.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, NewType, cast, get_args

from callward.core._canonical import (
    JSONValue,
    Sha256Hex,
    canonical_bytes,
    canonical_loads,
    sha256_hex,
)
from callward.core.errors import (
    DENY_KINDS,
    RESULT_KINDS,
    TOOL_FAILURE_KINDS,
    DenyKind,
    InfrastructureError,
    InfrastructureKind,
    PolicyDenied,
    ResultKind,
    ToolFailed,
    ToolFailureKind,
)

RuleId = NewType("RuleId", str)
KeyId = NewType("KeyId", str)
CallId = NewType("CallId", str)

Dialect = Literal["article", "openai", "openai_responses", "hermes", "api", "anthropic", "json",
                  "llama", "mistral", "mcp"]
Effect = Literal["allow", "deny"]
#: Where a call runs: a fresh container (``call``) or its agent session's (``session``).
Isolation = Literal["call", "session"]
#: The OCI runtime a container runs on: ``runc``, or ``runsc`` (gVisor's user-space kernel).
Runtime = Literal["runc", "runsc"]
ISOLATIONS: Final[tuple[Isolation, ...]] = get_args(Isolation)
RUNTIMES: Final[tuple[Runtime, ...]] = get_args(Runtime)

_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
_TOOL_NAME = re.compile(r"\A[a-z][a-z0-9_]{0,63}\Z")
_VERSION = re.compile(r"\A[0-9A-Za-z][0-9A-Za-z.+-]{0,31}\Z")
_SECRET_NAME = re.compile(r"\A[A-Z][A-Z0-9_]{0,63}\Z")
#: ``host:port`` of an egress grant: a lower-case DNS name or IPv4 address, a TCP port.
_EGRESS_TARGET = re.compile(
    r"\A[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?:(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}"
    r"|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])\Z"
)
MIB: Final = 1 << 20


def is_tool_name(name: str) -> bool:
    """Tool names are ASCII snake_case, so look-alike Unicode names cannot exist."""
    return bool(_TOOL_NAME.match(name))


def is_secret_name(name: str) -> bool:
    """Secret names are upper-case ASCII identifiers (``GITHUB_TOKEN``), never values."""
    return bool(_SECRET_NAME.match(name))


def is_egress_target(target: str) -> bool:
    """Whether ``target`` is a ``host:port`` an egress allowlist can hold."""
    return bool(_EGRESS_TARGET.match(target))


def _require_secret_names(names: tuple[str, ...]) -> None:
    if not isinstance(names, tuple) or not all(
        isinstance(n, str) and is_secret_name(n) for n in names
    ):
        raise ValueError("secret names are a tuple of upper-case identifiers like GITHUB_TOKEN")
    if len(set(names)) != len(names):
        raise ValueError("secret names are unique")


def _require_egress_targets(targets: tuple[str, ...]) -> None:
    if not isinstance(targets, tuple) or not all(
        isinstance(t, str) and is_egress_target(t) for t in targets
    ):
        raise ValueError("egress is a tuple of host:port targets")


def _require_placing(isolation: str, runtime: str | None) -> None:
    if isolation not in ISOLATIONS:
        raise ValueError("isolation is call or session")
    if runtime is not None and runtime not in RUNTIMES:
        raise ValueError("runtime is runc, runsc or None")


def _require_sha256(value: str, what: str) -> None:
    if not _HEX64.match(value):
        raise ValueError(f"{what} must be 64 lower-case hex digits")


@dataclass(frozen=True, slots=True)
class ResourceLimits:
    """
    What one execution may use. Every limit is finite; the defaults are tight.

    Attributes:
        wall_seconds: Wall-clock time from start to result; the container is killed after it.
        memory_bytes: Memory, with no swap on top.
        pids: Processes and threads, the runner included.
        cpus: CPU share, in cores.
        output_bytes: Bytes the tool may write to stdout and stderr together.
        tmp_bytes: Size of the writable /tmp (the only writable path).
        open_files: Open file descriptors.
    """

    wall_seconds: float = 5.0
    memory_bytes: int = 128 * MIB
    pids: int = 32
    cpus: float = 0.5
    output_bytes: int = 64 * 1024
    tmp_bytes: int = 8 * MIB
    open_files: int = 64

    def __post_init__(self) -> None:
        if not (math.isfinite(self.wall_seconds) and 0 < self.wall_seconds <= 3600):
            raise ValueError("wall_seconds must be in (0, 3600]")
        if not (math.isfinite(self.cpus) and 0 < self.cpus <= 64):
            raise ValueError("cpus must be in (0, 64]")
        for name, low in (
            ("memory_bytes", 16 * MIB),
            ("pids", 4),
            ("output_bytes", 1),
            ("tmp_bytes", 4096),
            ("open_files", 16),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer of at least {low}")

    def tightened_by(self, other: ResourceLimits) -> ResourceLimits:
        """The stricter of two limits, field by field: a policy can only tighten a tool."""
        return ResourceLimits(
            wall_seconds=min(self.wall_seconds, other.wall_seconds),
            memory_bytes=min(self.memory_bytes, other.memory_bytes),
            pids=min(self.pids, other.pids),
            cpus=min(self.cpus, other.cpus),
            output_bytes=min(self.output_bytes, other.output_bytes),
            tmp_bytes=min(self.tmp_bytes, other.tmp_bytes),
            open_files=min(self.open_files, other.open_files),
        )

    def to_json(self) -> dict[str, JSONValue]:
        return {
            "wall_seconds": self.wall_seconds,
            "memory_bytes": self.memory_bytes,
            "pids": self.pids,
            "cpus": self.cpus,
            "output_bytes": self.output_bytes,
            "tmp_bytes": self.tmp_bytes,
            "open_files": self.open_files,
        }


@dataclass(frozen=True, slots=True)
class ToolCall:
    """
    One call, as the model asked for it, in any dialect.

    Attributes:
        id: The call id (the model's own where it gave one, else generated).
        name: The tool name as the model wrote it (not yet checked).
        arguments_json: The arguments object, RFC 8785 canonical.
        dialect: Which syntax it was parsed from.
        expected_json: The article syntax's expected output, canonical; never trusted,
            only compared with the result afterwards.
    """

    id: CallId
    name: str
    arguments_json: bytes
    dialect: Dialect
    expected_json: bytes | None = None

    def __post_init__(self) -> None:
        if not self.id or len(self.id) > 128:
            raise ValueError("a call id must have 1 to 128 characters")
        if not isinstance(canonical_loads(self.arguments_json), dict):
            raise TypeError("arguments must be a JSON object")

    @classmethod
    def create(
        cls,
        *,
        id: str,
        name: str,
        arguments: Mapping[str, JSONValue],
        dialect: Dialect,
        expected: JSONValue = None,
        has_expected: bool = False,
    ) -> ToolCall:
        """
        Build a call from decoded arguments.

        Raises:
            CanonicalizationError: The arguments are not I-JSON.
        """
        return cls(
            id=CallId(id),
            name=name,
            arguments_json=canonical_bytes(dict(arguments)),
            dialect=dialect,
            expected_json=canonical_bytes(expected) if has_expected else None,
        )

    @property
    def arguments(self) -> dict[str, JSONValue]:
        """A fresh copy of the arguments."""
        value: dict[str, JSONValue] = canonical_loads(self.arguments_json)
        return value

    @property
    def arguments_sha256(self) -> Sha256Hex:
        return sha256_hex(self.arguments_json)

    @property
    def expected(self) -> JSONValue:
        return None if self.expected_json is None else canonical_loads(self.expected_json)


@dataclass(frozen=True, slots=True)
class ModelRef:
    """
    The model a tool runs, as its audit records name it.

    Attributes:
        name: The model's name (``all-MiniLM-L6-v2``).
        version: Its version (the package's, or the weights' revision).
        sha256: SHA-256 of its weights, as pinned (a file's, or a manifest's).
    """

    name: str
    version: str
    sha256: Sha256Hex

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 128:
            raise ValueError("a model name has 1 to 128 characters")
        if not _VERSION.match(self.version):
            raise ValueError("a model version is 1 to 32 characters of [0-9A-Za-z.+-]")
        _require_sha256(self.sha256, "a model's weights sha256")

    def to_json(self) -> dict[str, JSONValue]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """
    A registered tool: a Python function, its JSON Schema and its version.

    Attributes:
        source: The function's source, decorators removed; it runs in the sandbox.
        entrypoint: The function's name inside ``source``.
        parameters_json: The JSON Schema (2020-12) of the arguments object, canonical.
        digest: SHA-256 over name, version, source and schema.
        limits: The tool's own limits; a policy may set others for it.
        parameter_order: The property names in the order the author wrote them, which
            canonical JSON (sorted keys) loses; positional calls map onto it.
        model: For a model tool, the model it runs (its digest is part of ``digest``).
        secrets: The names of the host secrets the tool needs (never their values);
            the policy must grant each one, or the call is denied.
    """

    name: str
    version: str
    description: str
    source: str
    entrypoint: str
    parameters_json: bytes
    digest: Sha256Hex
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    labels: tuple[str, ...] = ()
    parameter_order: tuple[str, ...] = ()
    model: ModelRef | None = None
    secrets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require_secret_names(self.secrets)
        if not is_tool_name(self.name):
            raise ValueError("a tool name is ASCII snake_case, 1 to 64 characters")
        if not _VERSION.match(self.version):
            raise ValueError("a tool version is 1 to 32 characters of [0-9A-Za-z.+-]")
        if not self.entrypoint.isidentifier():
            raise ValueError("the entrypoint must be a Python identifier")
        _require_sha256(self.digest, "a tool digest")
        if not isinstance(canonical_loads(self.parameters_json), dict):
            raise TypeError("a parameters schema is a JSON object")

    @property
    def parameters(self) -> dict[str, JSONValue]:
        """A fresh copy of the JSON Schema."""
        value: dict[str, JSONValue] = canonical_loads(self.parameters_json)
        return value

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True, slots=True)
class ProvenanceEdge:
    """
    One argument of a call that came from an earlier call's output (a plan's ``$ref``).

    Attributes:
        argument: Where in the arguments the value sits, as an RFC 6901 JSON pointer.
        source_step: The id of the plan step that produced it.
        source_call_id: The call id of that step, which the policy looks its labels up by.
        source_output_path: Where in that step's output it was read (``output.hits[0]``).
        source_seq: The seq of the source call's ``call.completed`` record.
    """

    argument: str
    source_step: str
    source_call_id: CallId
    source_output_path: str
    source_seq: int

    def __post_init__(self) -> None:
        if self.argument and not self.argument.startswith("/"):
            raise ValueError("an argument is a JSON pointer: empty or starting with '/'")
        if not self.source_call_id or self.source_seq < 0:
            raise ValueError("a provenance edge names its source call and record")

    def to_json(self) -> dict[str, JSONValue]:
        return {"argument": self.argument, "source_step": self.source_step,
                "source_call_id": self.source_call_id,
                "source_output_path": self.source_output_path, "source_seq": self.source_seq}


@dataclass(frozen=True, slots=True)
class Provenance:
    """
    Where every argument of a call came from.

    A call with a ``Provenance`` is fully accounted for: the arguments named in
    ``edges`` came from those outputs, every other value is a literal given by
    the caller, which carries ``literal_labels``. The policy then checks flow
    rules per value. A call without one (``CallContext.provenance is None``,
    e.g. a model-emitted call) falls back to the labels of its whole session.
    """

    edges: tuple[ProvenanceEdge, ...] = ()
    literal_labels: frozenset[str] = frozenset()

    def to_json(self) -> dict[str, JSONValue]:
        return {"edges": [edge.to_json() for edge in self.edges],
                "literal_labels": sorted(self.literal_labels)}

    @classmethod
    def from_json(cls, value: Mapping[str, JSONValue]) -> Provenance:
        """
        The provenance a record carries (``to_json``), e.g. to replay a decision.

        Raises:
            KeyError, TypeError, ValueError: ``value`` is not a recorded provenance.
        """
        edges = value["edges"]
        labels = value.get("literal_labels", [])
        if not isinstance(edges, list) or not isinstance(labels, list):
            raise TypeError("a provenance has a list of edges and of literal labels")
        parsed = []
        for edge in edges:
            if not isinstance(edge, Mapping):
                raise TypeError("a provenance edge is an object")
            seq = edge["source_seq"]
            if not isinstance(seq, int):
                raise TypeError("source_seq is a whole number")
            parsed.append(ProvenanceEdge(
                str(edge["argument"]), str(edge["source_step"]),
                CallId(str(edge["source_call_id"])), str(edge["source_output_path"]), seq))
        return cls(
            tuple(parsed),
            frozenset(str(label) for label in labels),
        )


#: The most roles, and the most groups, one identity may carry.
MAX_IDENTITY_NAMES: Final = 256


@dataclass(frozen=True, slots=True)
class Identity:
    """
    What a verified access token says of its principal, beside the name itself.

    Made only from a token whose signature, issuer, audience and lifetime were
    checked (``callward.core.mcp._oidc``). The policy adds ``roles`` and
    ``groups`` to those its document gives the principal; every record of the
    call carries ``to_json()``, which holds a hash of the token's ``jti`` and
    never the token.

    Attributes:
        issuer: The token's ``iss``, as configured and checked.
        roles: Role names from the configured roles claim.
        groups: Group names from the configured groups claim.
        token_id_sha256: Hex SHA-256 of the token's ``jti``; None when it has none.
    """

    issuer: str
    roles: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    token_id_sha256: str | None = None

    def __post_init__(self) -> None:
        if not self.issuer or len(self.issuer) > 1024:
            raise ValueError("an issuer has 1 to 1024 characters")
        for names in (self.roles, self.groups):
            if len(names) > MAX_IDENTITY_NAMES:
                raise ValueError(f"an identity holds at most {MAX_IDENTITY_NAMES} roles "
                                 "and as many groups")
            if not all(isinstance(n, str) and 0 < len(n) <= 256 for n in names):
                raise ValueError("a role or group name has 1 to 256 characters")
        if self.token_id_sha256 is not None and not _HEX64.match(self.token_id_sha256):
            raise ValueError("token_id_sha256 is 64 lower-case hex digits")

    def to_json(self) -> dict[str, JSONValue]:
        return {"issuer": self.issuer, "roles": sorted(self.roles),
                "groups": sorted(self.groups), "token_id_sha256": self.token_id_sha256}

    @classmethod
    def from_json(cls, value: Mapping[str, JSONValue]) -> Identity:
        """
        The identity a record carries (``to_json``), e.g. to replay a decision.

        Raises:
            KeyError, TypeError, ValueError: ``value`` is not a recorded identity.
        """
        roles, groups = value.get("roles", []), value.get("groups", [])
        token_id = value.get("token_id_sha256")
        if not isinstance(roles, list) or not isinstance(groups, list):
            raise TypeError("an identity has a list of roles and of groups")
        if token_id is not None and not isinstance(token_id, str):
            raise TypeError("token_id_sha256 is a string")
        return cls(str(value["issuer"]), frozenset(str(r) for r in roles),
                   frozenset(str(g) for g in groups), token_id)


@dataclass(frozen=True, slots=True)
class CallContext:
    """
    Who is calling, in which session, and (when known) where the arguments came from.

    Attributes:
        provenance: None when the origin of the arguments is unknown (the policy
            applies flow rules to the whole session); see ``Provenance``.
        identity: What a verified access token says of the principal (issuer,
            roles, groups); None for a principal known only by configuration.
            The policy gives the caller the document's roles and groups for the
            principal together with the identity's.
    """

    principal: str
    session_id: str = ""
    provenance: Provenance | None = None
    identity: Identity | None = None

    def __post_init__(self) -> None:
        if not self.principal or len(self.principal) > 256:
            raise ValueError("a principal has 1 to 256 characters")


@dataclass(frozen=True, slots=True)
class Decision:
    """
    The policy's answer to one call, with every rule that decided it.

    Attributes:
        kind: For a denial, the first failed check (in the order of the pipeline).
        reasons: Ids of the rules that decided, the failing ones first for a denial.
        json_path: For a schema denial, where in the arguments it failed.
        limits: For an allow, the limits the execution runs under.
        isolation: For an allow, ``call`` (a fresh container, the default) or
            ``session`` (the agent session's container, a fresh process per call).
        runtime: For an allow, ``runc`` or ``runsc`` (gVisor); None leaves the
            sandbox's configured runtime.
        secrets: For an allow, the names of the host secrets handed to this one
            execution (the tool declared them, the policy granted them).
        egress: For an allow, the ``host:port`` targets the execution may reach
            through the egress proxy; empty means no network at all.
    """

    effect: Effect
    reasons: tuple[RuleId, ...]
    policy_digest: Sha256Hex
    kind: DenyKind | None = None
    message: str = ""
    json_path: str | None = None
    limits: ResourceLimits | None = None
    diagnostics: tuple[str, ...] = ()
    policy_version: int = 1
    isolation: Isolation = "call"
    runtime: Runtime | None = None
    secrets: tuple[str, ...] = ()
    egress: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require_secret_names(self.secrets)
        _require_egress_targets(self.egress)
        if self.effect == "deny" and (self.secrets or self.egress):
            raise ValueError("a denial grants no secrets and no egress")
        if not self.reasons:
            raise ValueError("a decision must name the rule that made it")
        _require_sha256(self.policy_digest, "a policy digest")
        if self.effect == "deny":
            if self.kind not in DENY_KINDS:
                raise ValueError("a denial must say which check failed")
            if self.limits is not None:
                raise ValueError("a denial carries no limits")
        elif self.effect == "allow":
            if self.kind is not None:
                raise ValueError("an allow has no deny kind")
            if self.limits is None:
                raise ValueError("an allow must carry the limits it runs under")
        else:
            raise ValueError("effect is allow or deny")
        _require_placing(self.isolation, self.runtime)

    def to_json(self) -> dict[str, JSONValue]:
        body: dict[str, JSONValue] = {
            "effect": self.effect,
            "kind": self.kind,
            "reasons": list(self.reasons),
            "policy_digest": self.policy_digest,
            "message": self.message,
            "json_path": self.json_path,
            "diagnostics": list(self.diagnostics),
            "policy_version": self.policy_version,
        }
        # Reuse of a container is an explicit, audited choice; the defaults stay implicit.
        if self.isolation != "call":
            body["isolation"] = self.isolation
        if self.runtime is not None:
            body["runtime"] = self.runtime
        # Names only: a secret's value never enters a record.
        if self.secrets:
            body["secrets"] = list(self.secrets)
        if self.egress:
            body["egress"] = list(self.egress)
        return body


@dataclass(frozen=True, slots=True)
class Placement:
    """
    Where and with what one execution runs: the part of an allow that the sandbox obeys.

    Attributes:
        isolation: ``call`` (a fresh container, the default) or ``session`` (the
            container of this principal's agent session, a fresh process per call).
        runtime: ``runc`` or ``runsc`` (gVisor); None leaves the sandbox's own.
        secrets: Names of the host secrets handed to this one execution.
        egress: ``host:port`` targets it may reach through the egress proxy; empty
            means no network at all.
        principal: Who calls; with ``session`` isolation, required.
        session_id: The agent session: a session's container is shared by exactly
            the calls with the same principal and session id.
    """

    isolation: Isolation = "call"
    runtime: Runtime | None = None
    secrets: tuple[str, ...] = ()
    egress: tuple[str, ...] = ()
    principal: str = ""
    session_id: str = ""

    def __post_init__(self) -> None:
        _require_placing(self.isolation, self.runtime)
        _require_secret_names(self.secrets)
        _require_egress_targets(self.egress)
        if not isinstance(self.principal, str) or not isinstance(self.session_id, str):
            raise TypeError("principal and session_id are strings")
        if self.isolation == "session" and not self.principal:
            raise ValueError("session isolation needs the principal")

    @classmethod
    def of(cls, decision: Decision, context: CallContext) -> Placement:
        """
        Where ``decision`` runs a call made in ``context``.

        Raises:
            ValueError: ``decision`` is a denial, which runs nothing.
        """
        if decision.effect != "allow":
            raise ValueError("only an allow places a call")
        return cls(isolation=decision.isolation, runtime=decision.runtime,
                   secrets=decision.secrets, egress=decision.egress,
                   principal=context.principal, session_id=context.session_id)

    @property
    def anywhere(self) -> bool:
        """Whether any runner may run it: ``call`` isolation, no runtime, no secret, no egress."""
        return (self.isolation == "call" and self.runtime is None
                and not self.secrets and not self.egress)


@dataclass(frozen=True, slots=True)
class ResultTreatment:
    """
    What the policy does with a result before it reaches the model and the audit log.

    Attributes:
        content_json: The (possibly redacted) canonical JSON the model receives.
        keep_body: Whether ``call.completed`` keeps ``content_json`` or only its hash.
        labels: The data-flow labels the result carries into its session.
        rules: Ids of the result rules that applied.
        redactions: How many matches were replaced.
        withheld_kind: Set when the result must not reach the model at all.
    """

    content_json: bytes
    keep_body: bool = False
    labels: tuple[str, ...] = ()
    rules: tuple[RuleId, ...] = ()
    redactions: int = 0
    withheld_kind: DenyKind | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """
    What one execution used, as the host measured it.

    Attributes:
        secrets_provided: The names of the secrets handed to the execution.
        secret_redactions: How many occurrences of a secret value (or of its
            base64, hex or URL encoding) were cut from the result before it was
            audited or returned.
        egress_allowed: Connections the egress proxy forwarded for it.
        egress_refused: Connections the egress proxy refused (not on the allowlist).
    """

    wall_ms: float
    exit_code: int | None
    output_bytes: int
    container_id: str = ""
    secrets_provided: tuple[str, ...] = ()
    secret_redactions: int = 0
    egress_allowed: int = 0
    egress_refused: int = 0

    def to_json(self) -> dict[str, JSONValue]:
        body: dict[str, JSONValue] = {
            "wall_ms": round(self.wall_ms, 3),
            "exit_code": self.exit_code,
            "output_bytes": self.output_bytes,
            "container_id": self.container_id[:12],
        }
        # Only where a tool had secrets or egress, so other records keep their shape.
        if self.secrets_provided:
            body["secrets_provided"] = list(self.secrets_provided)
            body["secret_redactions"] = self.secret_redactions
        if self.egress_allowed or self.egress_refused:
            body["egress"] = {"allowed": self.egress_allowed, "refused": self.egress_refused}
        return body


@dataclass(frozen=True, slots=True)
class Execution:
    """
    The outcome of running a tool: a value, or a tool failure kind.

    ``value_json`` is canonical JSON when ``kind == "ok"`` and ``None`` otherwise.
    """

    kind: Literal["ok"] | ToolFailureKind
    value_json: bytes | None
    message: str
    usage: Usage

    def __post_init__(self) -> None:
        if self.kind == "ok":
            if self.value_json is None:
                raise ValueError("an ok execution has a value")
        elif self.kind in TOOL_FAILURE_KINDS:
            if self.value_json is not None:
                raise ValueError("a failed execution has no value")
        else:
            raise ValueError("an execution ends ok or in a tool failure kind")

    @property
    def value(self) -> JSONValue:
        return None if self.value_json is None else canonical_loads(self.value_json)


@dataclass(frozen=True, slots=True)
class ReceiptProof:
    """
    That a record is in the audit log's Merkle tree, under a signed checkpoint.

    Attributes:
        leaf_hash: ``SHA-256(0x00 || record bytes)``, the record's leaf (RFC 9162).
        tree_size: The size of the tree the checkpoint signs (at least the record's seq).
        inclusion_proof: The audit path from the leaf to the checkpoint's root.
        checkpoint: The signed note (C2SP tlog-checkpoint) naming ``tree_size`` and the root.
    """

    leaf_hash: Sha256Hex
    tree_size: int
    inclusion_proof: tuple[Sha256Hex, ...]
    checkpoint: str

    def __post_init__(self) -> None:
        if self.tree_size < 1:
            raise ValueError("a receipt's tree holds at least its record")
        _require_sha256(self.leaf_hash, "a leaf hash")
        for node in self.inclusion_proof:
            _require_sha256(node, "an inclusion proof hash")
        if not self.checkpoint:
            raise ValueError("a receipt proof names its signed checkpoint")

    def to_json(self) -> dict[str, JSONValue]:
        return {
            "leaf_hash": self.leaf_hash,
            "tree_size": self.tree_size,
            "inclusion_proof": list(self.inclusion_proof),
            "checkpoint": self.checkpoint,
        }


@dataclass(frozen=True, slots=True)
class Receipt:
    """
    Where the call's final record sits in the audit log, and what it hashes to.

    Two receipts for one record are equal whatever proof they carry: the proof is
    evidence for the record (under one checkpoint or a later one), not part of it.

    Attributes:
        proof: The inclusion proof under a signed checkpoint, when the log gives one.
    """

    seq: int
    record_hash: Sha256Hex
    key_id: KeyId
    proof: ReceiptProof | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.seq < 1:
            raise ValueError("a seq starts at 1")
        _require_sha256(self.record_hash, "a record hash")
        if self.proof is not None and self.proof.tree_size < self.seq:
            raise ValueError("a receipt's checkpoint must cover its record")

    def to_json(self) -> dict[str, JSONValue]:
        value: dict[str, JSONValue] = {
            "seq": self.seq, "record_hash": self.record_hash, "key_id": self.key_id
        }
        if self.proof is not None:
            value.update(self.proof.to_json())
        return value


@dataclass(frozen=True, slots=True)
class ToolResult:
    """
    What goes back to the model: a value or an error, and the receipt of its record.

    Attributes:
        kind: ``ok`` or the stable error kind.
        content_json: Canonical JSON for the model: the value, or ``{"error", "message"}``.
        receipt: The signed record this result was written to. Every result has one.
        expected_matched: For article calls with an expected output, whether it matched.
        decision: The policy's decision (None when the message could not be parsed).
    """

    call_id: CallId
    tool: str
    kind: ResultKind
    content_json: bytes
    receipt: Receipt
    expected_matched: bool | None = None
    decision: Decision | None = None

    def __post_init__(self) -> None:
        if self.kind not in RESULT_KINDS:
            raise ValueError("unknown result kind")

    @property
    def ok(self) -> bool:
        return self.kind == "ok"

    @property
    def content(self) -> JSONValue:
        value: JSONValue = canonical_loads(self.content_json)
        return value

    def raise_for_kind(self) -> None:
        """
        Raise the error this result carries; return if it is ``ok``. For callers that
        want exceptions, as httpx's ``raise_for_status``; the record was written either way.

        Raises:
            PolicyDenied: The call was refused (``kind`` says by which check; ``rule``
                is the first rule of the decision, if it has one).
            ToolFailed: The tool ran and broke.
            InfrastructureError: callward itself could not do its job.
        """
        if self.kind == "ok":
            return
        content = self.content
        message = content.get("message") if isinstance(content, dict) else None
        text = f"{self.tool}: {message}" if isinstance(message, str) else self.tool
        if self.kind in DENY_KINDS:
            rule = self.decision.reasons[0] if self.decision and self.decision.reasons else ""
            raise PolicyDenied(text, kind=cast("DenyKind", self.kind), rule=rule)
        if self.kind in TOOL_FAILURE_KINDS:
            raise ToolFailed(text, kind=cast("ToolFailureKind", self.kind),
                             remediation="see the tool's error; its limits are in the decision")
        raise InfrastructureError(text, kind=cast("InfrastructureKind", self.kind),
                                  remediation="see the operational log of the gateway")

    def to_json(self) -> dict[str, JSONValue]:
        return {
            "call_id": self.call_id,
            "tool": self.tool,
            "kind": self.kind,
            "content": self.content,
            "expected_matched": self.expected_matched,
            "decision": None if self.decision is None else self.decision.to_json(),
            "receipt": self.receipt.to_json(),
        }


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """
    One signed entry of the audit log.

    ``record_bytes`` is the RFC 8785 encoding of ``{seq, ts, kind, prev, key_id, body}``;
    ``record_hash`` is its SHA-256 and ``signature`` its Ed25519 signature.
    """

    seq: int
    ts: str
    kind: str
    prev: Sha256Hex
    key_id: KeyId
    body_json: bytes
    record_bytes: bytes
    record_hash: Sha256Hex
    signature: bytes

    def __post_init__(self) -> None:
        if self.seq < 1:
            raise ValueError("a seq starts at 1")
        _require_sha256(self.prev, "prev")
        _require_sha256(self.record_hash, "a record hash")

    @property
    def body(self) -> dict[str, JSONValue]:
        value: dict[str, JSONValue] = canonical_loads(self.body_json)
        return value

    @property
    def receipt(self) -> Receipt:
        return Receipt(self.seq, self.record_hash, self.key_id)


__all__ = [
    "AuditRecord",
    "CallContext",
    "CallId",
    "Decision",
    "Dialect",
    "Effect",
    "Execution",
    "JSONValue",
    "KeyId",
    "ModelRef",
    "Receipt",
    "ReceiptProof",
    "ResourceLimits",
    "ResultKind",
    "ResultTreatment",
    "RuleId",
    "Sha256Hex",
    "ToolCall",
    "ToolFailureKind",
    "ToolResult",
    "ToolSpec",
    "Usage",
    "is_tool_name",
]
