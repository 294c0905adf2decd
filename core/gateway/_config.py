"""
Gateway configuration (``callward.yaml``) and the state directory (``CALLWARD_HOME``).

Configuration, version 1; paths are relative to the file::

    tools:                 # Python files (or module:dotted.name) holding @tool functions
      - tools.py
    policy: policy.yaml    # required: there is no default policy
    policy_shadow: candidate.yaml  # optional: decided beside it, differences recorded only
    sandbox:
      runtime: runc        # or runsc (gVisor)
      pool: {size: 2, idle_seconds: 300, memory_budget_mebibytes: 1024}
      secrets:             # where granted secrets come from (default: environment)
        source: environment   # CALLWARD_SECRET_<NAME>, or the mapping below
        environment: {GITHUB_TOKEN: GH_TOKEN}
        # source: directory, directory: /run/secrets   (one 0600 file per secret)
    models_as_tools: {}    # optional: embed_search, summarize, sentiment (core/models/_tools.py)
    anomalies:             # optional: anomaly monitoring (core/observe/_anomaly.py), on by default
      enabled: true
      quiet_seconds: 900   # and any other DetectorSettings field
    observability:         # optional: traces over OTLP (core/observe/_tracing.py); off by default
      otlp_endpoint: http://127.0.0.1:4318   # OTLP/HTTP (protobuf); /v1/traces is added
      service_name: callward

State lives under the home directory: ``audit.db``, ``keys/``, ``registry.db`` (tool
versions loaded at run time; they add to and override the ``tools:`` base set).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import structlog
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry

from callward.audit import FileSigner
from callward.core._canonical import sha256_hex
from callward.core._yaml import strict_yaml_load
from callward.core.errors import ConfigurationError, SandboxUnavailable
from callward.core.gateway._fleet import (
    STORE_SCHEMA,
    FleetSettings,
    fleet_settings,
    new_replica_id,
)
from callward.core.gateway._start import StartFacts
from callward.core.gateway._stores import (
    anomaly_state_for,
    audit_store_for,
    policy_state_for,
    registry_store_for,
)
from callward.core.models._tools import ModelToolsSettings, model_tools_settings
from callward.core.observe._anomaly import (
    ANOMALY_SETTING_NAMES,
    AnomalyDetector,
    DetectorSettings,
)
from callward.core.observe._events import CallObserver
from callward.core.observe._metrics import Metrics
from callward.core.observe._tracing import (
    DEFAULT_SERVICE_NAME,
    Tracing,
    configure_tracing,
    otlp_traces_url,
)
from callward.core.protocols import AuditLog, PolicyEngine, ToolRunner
from callward.core.registry._registry import ToolRegistry
from callward.core.registry._store import RegistryStore
from callward.core.types import RUNTIMES, Runtime
from callward.policies import Policy, PolicyDocument

log = structlog.get_logger()

if TYPE_CHECKING:
    from callward.core.models._tools import ModelToolSet
    from callward.core.registry._store_postgres import PostgresRegistryStore
    from callward.core.types import ToolSpec
    from callward.sandbox import DockerSandbox, ModelToolRunner

#: A record holds an argument value up to this many canonical bytes; a larger one as
#: its SHA-256, size and first characters (``arguments_elided`` names where).
DEFAULT_MAX_ARGUMENT_BYTES: Final = 4096
MIN_MAX_ARGUMENT_BYTES: Final = 256

CONFIG_SCHEMA: Final = {
    "type": "object",
    "additionalProperties": False,
    "required": ["tools", "policy"],
    "properties": {
        "tools": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
        "policy": {"type": "string", "minLength": 1},
        "policy_shadow": {"type": "string", "minLength": 1},
        "sandbox": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "runtime": {"enum": list(RUNTIMES)},
                # The warm pool (callward.sandbox.PoolConfig); size 0 starts every call cold.
                "pool": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "size": {"type": "integer", "minimum": 0, "maximum": 64},
                        "idle_seconds": {"type": "number", "exclusiveMinimum": 0,
                                         "maximum": 86400},
                        "memory_budget_mebibytes": {"type": "integer", "minimum": 0},
                    },
                },
                # Where secrets granted to tools are read (callward.sandbox secret sources).
                "secrets": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "source": {"enum": ["environment", "directory"]},
                        "directory": {"type": "string", "minLength": 1},
                        "environment": {
                            "type": "object",
                            "additionalProperties": {"type": "string", "minLength": 1},
                        },
                    },
                },
            },
        },
        # Model tools (embed_search, summarize, sentiment); core._model_tools validates it.
        "models_as_tools": {"type": "object"},
        # Anomaly monitoring: DetectorSettings fields (callward.core.observe._anomaly).
        "anomalies": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "enabled": {"type": "boolean"},
                **{name: {"type": "number", "exclusiveMinimum": 0}
                   for name in ANOMALY_SETTING_NAMES},
            },
        },
        # Traces over OTLP/HTTP (callward.core.observe._tracing); none without an endpoint.
        "observability": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "otlp_endpoint": {"type": "string", "pattern": "^https?://[^/?#]+",
                                  "maxLength": 2048},
                "service_name": {"type": "string", "minLength": 1, "maxLength": 256},
            },
        },
        # Upstream MCP servers; callward.core.mcp._section validates the section itself.
        "mcp": {"type": "object"},
        # The model `callward agent` runs: a transformers directory, a served model
        # (endpoint), or the demo model.
        "model": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "directory": {"type": "string", "minLength": 1},
                "tool_role": {"enum": ["tool", "user"]},
                "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": 8192},
                # bfloat16 only where the CPU computes it natively (core.models._cpu).
                "dtype": {"enum": ["auto", "float32", "bfloat16"]},
                # A served model: any OpenAI-compatible chat-completions server
                # (core.models._endpoint); exclusive with directory.
                "endpoint": {"type": "string", "pattern": "^https?://[^/?#]+",
                             "maxLength": 2048},
                "name": {"type": "string", "minLength": 1, "maxLength": 512},
                "api_key_env": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,127}$"},
                "timeout_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
            },
            "dependentRequired": {"endpoint": ["name"], "name": ["endpoint"],
                                  "api_key_env": ["endpoint"],
                                  "timeout_seconds": ["endpoint"]},
            "not": {"required": ["endpoint", "directory"]},
        },
        # A fleet: every replica's durable state in one PostgreSQL (core.gateway._fleet).
        "store": STORE_SCHEMA,
        "audit": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "checkpoint_every": {"type": "integer", "minimum": 1},
                "checkpoint_seconds": {"type": "number", "minimum": 0},
                "sync": {"enum": ["authorized", "every"]},
                # An argument value larger than this is recorded as its digest.
                "max_argument_bytes": {"type": "integer", "minimum": MIN_MAX_ARGUMENT_BYTES,
                                       "maximum": 16 * 1024 * 1024},
                "witnesses": {"type": "array", "items": {"oneOf": [
                    {"type": "object", "additionalProperties": False, "required": ["directory"],
                     "properties": {"directory": {"type": "string", "minLength": 1}}},
                    {"type": "object", "additionalProperties": False, "required": ["command"],
                     "properties": {"command": {"type": "array", "minItems": 1,
                                                "items": {"type": "string", "minLength": 1}}}},
                ]}},
            },
        },
    },
}
_CONFIG_VALIDATOR: Final = Draft202012Validator(CONFIG_SCHEMA, registry=Registry())


@dataclass(frozen=True, slots=True)
class Home:
    """Where callward keeps its state."""

    root: Path

    @classmethod
    def resolve(cls, given: str | os.PathLike[str] | None = None) -> Home:
        """``given``, else ``$CALLWARD_HOME``, else ``~/.callward``."""
        if given is not None:
            return cls(Path(given).expanduser())
        env = os.environ.get("CALLWARD_HOME")
        return cls(Path(env).expanduser() if env else Path.home() / ".callward")

    @property
    def audit_db(self) -> Path:
        return self.root / "audit.db"

    @property
    def registry_db(self) -> Path:
        """Versions loaded at run time (``callward tools load``) and the active choices."""
        return self.root / "registry.db"

    @property
    def policy_state_db(self) -> Path:
        return self.root / "policy-state.db"

    @property
    def anomaly_state_db(self) -> Path:
        return self.root / "anomaly-state.db"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def public_key(self) -> Path:
        return self.keys_dir / "audit-ed25519.pub"

    @property
    def config(self) -> Path:
        return self.root / "callward.yaml"

    def create(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """
    The ``model`` section: which model ``callward agent`` runs and how.

    Attributes:
        directory: A transformers model directory (safetensors); None for the demo model.
        tool_role: How results go back: the template's ``tool`` role or a ``user`` turn.
        max_new_tokens: The generation budget per turn.
        dtype: ``auto`` (bfloat16 where the CPU has bfloat16 arithmetic, else
            float32), ``float32`` or ``bfloat16``.
    """

    directory: Path | None = None
    tool_role: Literal["tool", "user"] | None = None
    max_new_tokens: int | None = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    #: A served model's OpenAI-compatible base URL (``http://127.0.0.1:8000/v1``);
    #: None runs a local model. Exclusive with ``directory``.
    endpoint: str | None = None
    #: The model the requests name; required with ``endpoint``.
    name: str | None = None
    #: The environment variable holding the endpoint's API key (read at each request,
    #: never recorded); None sends no key.
    api_key_env: str | None = None
    #: The time one request may take, generation included.
    timeout_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    tool_sources: tuple[str, ...]
    policy_path: Path
    runtime: Runtime
    source: Path
    policy_shadow_path: Path | None = None
    #: The ``audit`` section: checkpoint policy and witnesses (``callward.audit``).
    audit: Mapping[str, Any] | None = None
    #: ``sandbox.pool``: warm pool size, idle limit and memory budget.
    pool: Mapping[str, Any] | None = None
    #: ``model``: the agent's model; None means the demo model.
    model: ModelSettings | None = None
    #: ``models_as_tools``: model tools served by warm workers; None means none.
    model_tools: ModelToolsSettings | None = None
    #: ``anomalies``: the detector's settings; None turns anomaly monitoring off.
    anomalies: DetectorSettings | None = field(default_factory=DetectorSettings)
    #: ``sandbox.secrets``: the secret source (directory resolved against the file).
    secrets: Mapping[str, Any] | None = None
    #: ``store``: the fleet's PostgreSQL; None keeps the state in SQLite files at home.
    store: FleetSettings | None = None
    #: ``observability``: traces to this OTLP/HTTP endpoint; None: no traces exported.
    tracing: TracingSettings | None = None


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """
    The ``observability`` section: where traces go.

    Attributes:
        otlp_endpoint: The collector's OTLP/HTTP URL (``/v1/traces`` added without a path).
        service_name: The ``service.name`` the spans carry.
    """

    otlp_endpoint: str
    service_name: str = DEFAULT_SERVICE_NAME

    def __post_init__(self) -> None:
        otlp_traces_url(self.otlp_endpoint)  # raises ValueError on anything but http(s)


def example_config_path() -> Path:
    """The configuration the demo uses, shipped inside the package."""
    return Path(str(resources.files("callward.core") / "examples" / "callward.yaml"))


def load_config(path: Path) -> GatewayConfig:
    """
    Raises:
        ConfigurationError: The file is missing, not YAML, or not a valid configuration.
    """
    try:
        raw: Any = strict_yaml_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(
            f"configuration {path} cannot be read ({type(exc).__name__})"
        ) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigurationError(f"configuration {path} is not valid YAML{where}: {problem}"
                                 ) from exc
    if not isinstance(raw, dict):
        raise ConfigurationError(f"configuration {path} is not a YAML mapping")
    error = best_match(_CONFIG_VALIDATOR.iter_errors(raw))
    if error is not None:
        raise ConfigurationError(f"configuration {path}: invalid at {error.json_path}: "
                                 f"{error.message}")
    base = path.parent

    def resolve(entry: str) -> str:
        return entry if entry.startswith("module:") else str((base / entry).resolve())

    return GatewayConfig(
        tool_sources=tuple(resolve(entry) for entry in raw["tools"]),
        policy_path=Path(resolve(raw["policy"])),
        runtime=(raw.get("sandbox") or {}).get("runtime", "runc"),
        source=path,
        policy_shadow_path=Path(resolve(raw["policy_shadow"])) if "policy_shadow" in raw else None,
        audit=raw.get("audit"),
        pool=(raw.get("sandbox") or {}).get("pool"),
        model=_model_settings(raw.get("model"), resolve),
        model_tools=(model_tools_settings(raw["models_as_tools"], resolve)
                     if "models_as_tools" in raw else None),
        anomalies=_detector_settings(raw.get("anomalies") or {}, path),
        secrets=_secret_settings((raw.get("sandbox") or {}).get("secrets"), resolve),
        store=fleet_settings(raw.get("store"), resolve),
        tracing=_tracing_settings(raw.get("observability"), path),
    )


def _tracing_settings(section: Mapping[str, Any] | None, path: Path) -> TracingSettings | None:
    if not section or "otlp_endpoint" not in section:
        return None
    try:
        return TracingSettings(section["otlp_endpoint"],
                               section.get("service_name", DEFAULT_SERVICE_NAME))
    except ValueError as exc:
        raise ConfigurationError(f"configuration {path}: observability: {exc}") from exc


def _secret_settings(
    section: Mapping[str, Any] | None, resolve: Callable[[str], str]
) -> Mapping[str, Any] | None:
    if section is None:
        return None
    settings = dict(section)
    if settings.get("source") == "directory":
        if "directory" not in settings:
            raise ConfigurationError("sandbox.secrets: source directory needs a directory")
        settings["directory"] = resolve(settings["directory"])
    return settings


def _detector_settings(section: Mapping[str, Any], path: Path) -> DetectorSettings | None:
    if not section.get("enabled", True):
        return None
    given = {name: value for name, value in section.items() if name != "enabled"}
    try:
        return DetectorSettings.from_json(given)
    except ValueError as exc:
        raise ConfigurationError(f"configuration {path}: anomalies: {exc}") from exc


def _model_settings(
    section: Mapping[str, Any] | None, resolve: Callable[[str], str]
) -> ModelSettings | None:
    if section is None:
        return None
    directory = section.get("directory")
    endpoint = section.get("endpoint")
    if endpoint is not None:
        from callward.core.models._endpoint import check_endpoint  # noqa: PLC0415

        endpoint = check_endpoint(endpoint, api_key_env=section.get("api_key_env"))
    return ModelSettings(
        directory=Path(resolve(directory)) if directory else None,
        tool_role=section.get("tool_role"),
        max_new_tokens=section.get("max_new_tokens"),
        dtype=section.get("dtype", "auto"),
        endpoint=endpoint,
        name=section.get("name"),
        api_key_env=section.get("api_key_env"),
        timeout_seconds=section.get("timeout_seconds"),
    )


def load_registry(config: GatewayConfig) -> ToolRegistry:
    """The configuration's tools: the registry's base set."""
    registry = ToolRegistry()
    for source in config.tool_sources:
        registry.load(source)
    return registry


def open_live_registry(
    config: GatewayConfig, home: Home, *, model_specs: tuple[ToolSpec, ...] | None = None
) -> tuple[ToolRegistry, RegistryStore | PostgresRegistryStore]:
    """
    The base set with the live registry attached: the home's ``registry.db`` (created
    if absent), or the fleet's when the configuration has a ``store``.

    The base set holds the model tools too (``models_as_tools``), by digest, so
    ``callward tools`` can list, withdraw and reinstate them.

    Args:
        model_specs: The model tools' specs when the caller has built them already (the
            gateway, which prepares the models); None builds them here without preparing
            any model.

    Raises:
        ConfigurationError: A tool file, a model or the registry database is invalid.
    """
    registry = load_registry(config)
    if config.model_tools is not None:
        from callward.core.models._tools import (  # noqa: PLC0415
            MODEL_TOOLS_SOURCE,
            model_tool_specs,
        )
        from callward.sandbox import server_sha256  # noqa: PLC0415

        if model_specs is None:
            model_specs = model_tool_specs(config.model_tools, server_sha256=server_sha256())
        for spec in model_specs:
            registry.add(spec, source_path=MODEL_TOOLS_SOURCE)
    store = registry_store_for(config, home)
    store.open()
    try:
        registry.attach(store)
    except ConfigurationError:
        store.close()
        raise
    return registry, store


@dataclass(frozen=True, slots=True)
class GatewayParts:
    """
    What a configuration builds and ``Gateway.from_config`` assembles: the four stages
    (registry, policy, runner, audit log), their closers, and the observers.
    """

    registry: ToolRegistry
    policy: PolicyEngine
    runner: ToolRunner
    audit: AuditLog
    closers: tuple[Callable[[], None], ...]
    observers: tuple[CallObserver, ...]
    max_argument_bytes: int
    start: StartFacts
    #: The ``store`` section when this gateway is a replica of a fleet.
    fleet: FleetSettings | None = None
    #: Spans of the calls: to the ``observability`` endpoint, else off (or the global
    #: provider an embedding application installed).
    tracing: Tracing | None = None


def build_parts(path: object, *, home: object = None) -> GatewayParts:
    """
    The parts of the gateway a configuration file describes, its state under ``home``.

    The policy, the tools and the signing key are loaded here, so that a broken
    file is an error at start, never at the first call.

    Raises:
        ConfigurationError: A file is missing or invalid (PolicyInvalid for the policy).
    """
    # The edge that wires the stages imports them; the stages never import each other.
    # Only a gateway that is built loads docker.
    from callward.sandbox import DockerSandbox, PoolConfig, secret_source  # noqa: PLC0415

    config = load_config(Path(str(path)))
    state = Home.resolve(None if home is None else str(home))
    state.create()
    # The model tools' weights are found, hashed (and the demo model converted) once.
    model_tools = (None if config.model_tools is None
                   else _prepare_model_tools(config.model_tools, state))
    # Versions loaded at run time are read from the registry's store before each call.
    registry, registry_store = open_live_registry(
        config, state, model_specs=None if model_tools is None else model_tools.specs)
    signer = FileSigner.load_or_create(state.keys_dir)
    # Rate limits, session labels and approvals survive restarts in their own file (or
    # the fleet's tables); approvals are signed with the audit key.
    # A shadow (candidate) policy decides beside it, read-only; differences are recorded.
    # Open anomalies survive restarts likewise; a policy gate reads them.
    detector_settings = config.anomalies or DetectorSettings()
    policy_state = policy_state_for(config, state)
    anomalies = anomaly_state_for(config, state, quiet_seconds=detector_settings.quiet_seconds)
    shadow = (Policy.from_file(config.policy_shadow_path, state=policy_state,
                               anomalies=anomalies)
              if config.policy_shadow_path is not None else None)
    policy = Policy.from_file(config.policy_path, state=policy_state, signer=signer,
                              shadow=shadow, anomalies=anomalies)
    # The home's audit.db, or the fleet's one log; signed by this machine's key either way.
    audit = audit_store_for(config, state, signer)
    audit.open()
    # Calls a crashed gateway authorized but never completed are closed out now.
    audit.recover_interrupted()
    pool = dict(config.pool or {})
    if "memory_budget_mebibytes" in pool:
        pool["memory_budget_bytes"] = pool.pop("memory_budget_mebibytes") * (1 << 20)
    sandbox = DockerSandbox.from_env(runtime=config.runtime, pool=PoolConfig(**pool),
                                     secrets=secret_source(config.secrets))
    runner: DockerSandbox | ModelToolRunner = sandbox
    if model_tools is not None:
        runner = _with_model_tools(model_tools, config.runtime, registry, sandbox)
    try:
        runner.remove_leftovers()
    except SandboxUnavailable:
        # The gateway still starts: each call will then end, audited, as sandbox_unavailable.
        log.warning("sandbox_unavailable_at_start")
    metrics = Metrics()
    observers: tuple[CallObserver, ...] = (metrics,)
    if config.anomalies is not None:
        detector = AnomalyDetector(anomalies, audit, settings=config.anomalies, metrics=metrics)
        # From the state file, so anomalies resolved by an operator's command count too.
        metrics.count_open_anomalies(lambda: len(anomalies.all_open()))
        observers = (metrics, detector)
    tracing = (None if config.tracing is None else configure_tracing(
        config.tracing.otlp_endpoint, service_name=config.tracing.service_name))
    return GatewayParts(
        registry=registry,
        policy=policy,
        runner=runner,
        audit=audit,
        closers=(audit.close, policy.state.close, anomalies.close, runner.close,
                 registry_store.close, *(() if tracing is None else (tracing.shutdown,))),
        observers=observers,
        max_argument_bytes=int(str((config.audit or {}).get(
            "max_argument_bytes", DEFAULT_MAX_ARGUMENT_BYTES))),
        start=StartFacts(
            config_sha256=sha256_hex(config.source.read_bytes()),
            runtimes=runtimes_in_force(config.runtime, policy.document),
            default_runtime=config.runtime,
            replica=None if config.store is None else new_replica_id(),
        ),
        fleet=config.store,
        tracing=tracing,
    )


def runtimes_in_force(default: Runtime, document: PolicyDocument) -> tuple[Runtime, ...]:
    """The runtimes calls may run on: the configuration's, and any the policy names."""
    named = {setting.get("runtime") for setting in document.tool_settings.values()}
    return tuple(r for r in RUNTIMES if r == default or r in named)


def _prepare_model_tools(settings: ModelToolsSettings, state: Home) -> ModelToolSet:
    """The model tools' specs and workers, their models prepared under the home."""
    from callward.core.models._tools import model_tool_set  # noqa: PLC0415
    from callward.sandbox import server_sha256  # noqa: PLC0415

    return model_tool_set(settings, model_cache=state.root / "models",
                          server_sha256=server_sha256())


def _with_model_tools(
    tool_set: ModelToolSet,
    runtime: Runtime,
    registry: ToolRegistry,
    sandbox: DockerSandbox,
) -> ModelToolRunner:
    """
    Wrap ``sandbox`` so the model tools (already in ``registry``'s base set) reach their
    warm workers; a model tool withdrawn from the live registry (``callward tools
    unload``) has its worker stopped on the refresh that removes it.
    """
    from callward.core.models._tools import build_model_runner  # noqa: PLC0415

    runner = build_model_runner(tool_set, sandbox, runtime=runtime)
    registry.on_change(lambda delta: runner.tools_removed(
        delta.removed,
        lambda name, digest: any(e.spec.digest == digest for e in registry.versions(name))))
    return runner
