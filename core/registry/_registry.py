"""
The tool registry: a tool is a Python function, its JSON Schema, a version and
a digest over all of them.

The function's source (decorators removed) is what runs in the sandbox, so a
tool must be self-contained: it imports what it needs inside its body. The
digest covers name, version, description, source, schema and limits, so any
change to what would run gives a new digest.

Versions: the registry holds every version of a name it knows (``name@version``),
and one of them is *active*: a plain ``name`` resolves to it, ``name@version``
to that exact version. The versions named by the configuration are the base
set; a live source (``callward.core.registry._store.RegistryStore``) adds versions
and chooses the active one, and ``refresh()`` picks its changes up before a call.

A live source may also *withdraw* a configuration version, by name, version and
digest: only model tools are withdrawn this way (``callward tools unload``), since
they cannot be removed from a tool file. A withdrawn version resolves to nothing
(calls to it are ``unknown_tool``) until the live source reinstates it; a
configuration that changes its digest is not withdrawn by an older marker.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import linecache
import sys
import textwrap
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeVar

import structlog
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from callward.core._canonical import (
    TOOL_DIGEST_DOMAIN,
    JSONValue,
    canonical_bytes,
    canonical_loads,
    canonical_sha256,
    sha256_hex,
)
from callward.core.errors import ConfigurationError, UnknownTool
from callward.core.types import ResourceLimits, Sha256Hex, ToolSpec, is_tool_name

log = structlog.get_logger()

F = TypeVar("F", bound=Callable[..., Any])

_MARK: Final = "__callward_tool__"


@dataclass(frozen=True, slots=True)
class _ToolMark:
    version: str
    parameters: Mapping[str, JSONValue]
    description: str | None
    limits: ResourceLimits
    labels: tuple[str, ...]
    secrets: tuple[str, ...] = ()


def tool(
    *,
    version: str,
    parameters: Mapping[str, JSONValue],
    description: str | None = None,
    limits: ResourceLimits | None = None,
    labels: tuple[str, ...] = (),
    secrets: tuple[str, ...] = (),
) -> Callable[[F], F]:
    """
    Mark a function as a callward tool. The function is returned unchanged.

    Args:
        version: The tool's version (``name@version`` in the registry).
        parameters: The JSON Schema (2020-12) of its keyword arguments.
        description: For the model; defaults to the docstring's first paragraph.
        limits: The tool's default resource limits; the policy may set others.
        labels: Free-form labels for policy (e.g. ``egress``).
        secrets: Names of host secrets the tool needs (e.g. ``("GITHUB_TOKEN",)``);
            each must be granted by the policy, and reaches only this tool's executions.

    Example::

        @tool(version="1.0.0", parameters={
            "type": "object",
            "properties": {"x": {"type": "integer"}},
            "required": ["x"],
            "additionalProperties": False,
        })
        def square(x: int) -> int:
            return x * x
    """

    def mark(function: F) -> F:
        setattr(
            function,
            _MARK,
            _ToolMark(version, parameters, description, limits or ResourceLimits(), labels,
                      tuple(secrets)),
        )
        return function

    return mark


def function_source(function: Callable[..., Any]) -> str:
    """
    The source of a module-level function without its decorators, dedented.

    Raises:
        ConfigurationError: The source is unavailable or the object is not a plain function.
    """
    try:
        text = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError) as exc:
        raise ConfigurationError(
            f"the source of tool {getattr(function, '__name__', '?')} cannot be read"
        ) from exc
    module = ast.parse(text)
    if len(module.body) != 1 or not isinstance(module.body[0], ast.FunctionDef):
        raise ConfigurationError("a tool is one plain (not async) function")
    definition = module.body[0]
    lines = text.splitlines(keepends=True)
    return "".join(lines[definition.lineno - 1 :])


def _description(function: Callable[..., Any], given: str | None) -> str:
    if given is not None:
        return given
    doc = inspect.getdoc(function) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ").strip()


def spec_preimage(spec: ToolSpec) -> dict[str, JSONValue]:
    """
    Everything a function tool's digest covers, as JSON; ``spec_from_preimage`` inverts it.

    Raises:
        ConfigurationError: A model tool: its digest covers weights, which this does not hold.
    """
    if spec.model is not None:
        raise ConfigurationError(f"{spec.ref} is a model tool; the configuration's "
                                 "models_as_tools registers it, not a tool file")
    return {
        "name": spec.name,
        "version": spec.version,
        "description": spec.description,
        "source": spec.source,
        "entrypoint": spec.entrypoint,
        "parameters": spec.parameters,
        "parameter_order": list(spec.parameter_order),
        "limits": spec.limits.to_json(),
        "labels": list(spec.labels),
        **({"secrets": list(spec.secrets)} if spec.secrets else {}),
    }


def tool_digest(preimage: Mapping[str, JSONValue]) -> Sha256Hex:
    """The digest of a tool's preimage (see ``spec_preimage``)."""
    return canonical_sha256(dict(preimage), domain=TOOL_DIGEST_DOMAIN)


def spec_from_preimage(preimage_json: bytes, digest: str) -> ToolSpec:
    """
    Rebuild a stored ``ToolSpec`` and check that it still has the digest it was stored with.

    Raises:
        ConfigurationError: The bytes are not a tool preimage, or their digest differs
            (the stored snapshot was changed after it was loaded).
    """
    try:
        raw = canonical_loads(preimage_json)
        if not isinstance(raw, dict):
            raise TypeError("not an object")  # noqa: TRY301 - one boundary below
        limits = raw["limits"]
        if not isinstance(limits, dict):
            raise TypeError("limits is not an object")  # noqa: TRY301 - one boundary below
        spec = ToolSpec(
            name=str(raw["name"]),
            version=str(raw["version"]),
            description=str(raw["description"]),
            source=str(raw["source"]),
            entrypoint=str(raw["entrypoint"]),
            parameters_json=canonical_bytes(raw["parameters"]),
            digest=tool_digest(raw),
            limits=ResourceLimits(**limits),
            labels=tuple(str(label) for label in raw["labels"]),
            parameter_order=tuple(str(p) for p in raw["parameter_order"]),
            secrets=tuple(str(name) for name in raw.get("secrets", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"a stored tool snapshot is not a tool ({type(exc).__name__})") from exc
    if spec.digest != digest:
        raise ConfigurationError(
            f"the stored snapshot of {spec.ref} does not have the digest it was loaded with",
            remediation="the registry database was changed outside callward; load the tool again",
        )
    return spec


def spec_from_function(function: Callable[..., Any]) -> ToolSpec:
    """
    Build the ``ToolSpec`` of a function marked with ``@tool``.

    Raises:
        ConfigurationError: Not marked, a bad name, or a schema that is not valid 2020-12.
    """
    mark = getattr(function, _MARK, None)
    if not isinstance(mark, _ToolMark):
        raise ConfigurationError(f"{function!r} is not marked with @tool")
    name = function.__name__
    if not is_tool_name(name):
        raise ConfigurationError(f"tool name {name!r} is not ASCII snake_case")
    schema = dict(mark.parameters)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ConfigurationError(
            f"the parameters schema of tool {name} is not valid JSON Schema 2020-12 "
            f"(at {exc.json_path})"
        ) from exc
    if schema.get("type") != "object":
        raise ConfigurationError(f"the parameters schema of tool {name} must have type object")
    properties = schema.get("properties", {})
    order = tuple(properties) if isinstance(properties, Mapping) else ()
    source = function_source(function)
    description = _description(function, mark.description)
    digest = tool_digest(
        {
            "name": name,
            "version": mark.version,
            "description": description,
            "source": source,
            "entrypoint": name,
            "parameters": schema,
            "parameter_order": list(order),
            "limits": mark.limits.to_json(),
            "labels": list(mark.labels),
            # Only when declared, so the digests of tools without secrets stay the same.
            **({"secrets": list(mark.secrets)} if mark.secrets else {}),
        }
    )
    return ToolSpec(
        name=name,
        version=mark.version,
        description=description,
        source=source,
        entrypoint=name,
        parameters_json=canonical_bytes(schema),
        digest=digest,
        limits=mark.limits,
        labels=tuple(mark.labels),
        parameter_order=order,
        secrets=mark.secrets,
    )


@dataclass(frozen=True, slots=True)
class ToolFile:
    """
    A tool file as it was read once: its text, its digest and the tools defined by it.

    The tools are built from ``text``, never from the file again, so what was
    digested is what runs even if the file changes afterwards.
    """

    path: Path
    text: str
    sha256: Sha256Hex
    specs: tuple[ToolSpec, ...]


def _marked_functions(module: object) -> list[Callable[..., Any]]:
    return [
        value
        for value in vars(module).values()
        if callable(value) and isinstance(getattr(value, _MARK, None), _ToolMark)
    ]


def read_tool_file(path: Path) -> ToolFile:
    """
    Read a ``.py`` file once and build a ``ToolSpec`` for each of its ``@tool`` functions.

    The text is compiled under a pseudo file name held in ``linecache``, so the
    source of each tool comes from the bytes read here, not from a later read of
    the file. Importing the file runs its module code in this process, as the
    configuration's tool files do.

    Raises:
        ConfigurationError: The file is missing, unreadable, fails to import or has no tools.
    """
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"tool file {path} cannot be read ({type(exc).__name__})"
                                 ) from exc
    digest = sha256_hex(data)
    filename = f"<callward tool file {digest[:16]} {path.name}>"
    module_name = f"callward_tools_{digest[:16]}"
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    module = types.ModuleType(module_name)
    module.__file__ = filename
    sys.modules[module_name] = module  # dataclasses and inspect look the module up
    try:
        exec(compile(text, filename, "exec"), module.__dict__)  # noqa: S102 - a trusted operator's tool file, as import would run it
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigurationError(
            f"tool file {path} failed to import: {type(exc).__name__}"
        ) from exc
    functions = _marked_functions(module)
    if not functions:
        raise ConfigurationError(f"{path} defines no @tool function")
    return ToolFile(path, text, digest, tuple(spec_from_function(f) for f in functions))


def _load_module_from_path(path: Path) -> object:
    module_name = f"callward_tools_{canonical_sha256(str(path.resolve()))[:16]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"tool file {path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # inspect.getsource needs the module registered
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigurationError(
            f"tool file {path} failed to import: {type(exc).__name__}"
        ) from exc
    return module


@dataclass(frozen=True, slots=True)
class LiveVersion:
    """A version held by a live source, with where it was loaded from."""

    spec: ToolSpec
    source_path: str
    loaded_at: str


@dataclass(frozen=True, slots=True)
class LiveState:
    """What a live source holds: its versions, and the active version of each name."""

    versions: tuple[LiveVersion, ...]
    active: Mapping[str, str]
    #: Configuration versions taken out of service: (name, version, digest).
    withdrawn: frozenset[tuple[str, str, str]] = frozenset()


class LiveSource(Protocol):
    """Versions loaded while callward runs (``RegistryStore``); read before each call."""

    def generation(self) -> int:
        """A number that changes with every change of the state; cheap to read."""
        ...

    def state(self) -> LiveState:
        """
        The whole state.

        Raises:
            ConfigurationError: The state cannot be read or a snapshot fails its digest.
        """
        ...


@dataclass(frozen=True, slots=True)
class VersionEntry:
    """One version the registry knows: the spec, whether it is active, and where it came from."""

    spec: ToolSpec
    active: bool
    origin: Literal["config", "live"]
    source_path: str
    loaded_at: str = ""
    #: A configuration version withdrawn by the live source (resolves to nothing).
    withdrawn: bool = False

    def to_json(self) -> dict[str, JSONValue]:
        model = self.spec.model
        return {"name": self.spec.name, "version": self.spec.version, "ref": self.spec.ref,
                "digest": self.spec.digest, "active": self.active, "origin": self.origin,
                "source_path": self.source_path, "loaded_at": self.loaded_at,
                "labels": list(self.spec.labels), "description": self.spec.description,
                "withdrawn": self.withdrawn,
                "model": None if model is None else model.to_json()}


@dataclass(frozen=True, slots=True)
class RegistryDelta:
    """The versions a refresh added and removed (by digest)."""

    added: tuple[ToolSpec, ...]
    removed: tuple[ToolSpec, ...]


@dataclass(frozen=True, slots=True)
class _View:
    """One consistent resolution: every version, and the active spec of each name."""

    versions: Mapping[str, Mapping[str, VersionEntry]]
    active: Mapping[str, ToolSpec]
    withdrawn: Mapping[str, VersionEntry]


def split_ref(ref: str) -> tuple[str, str | None]:
    """``name@version`` into its parts; a plain name has no version."""
    name, sep, version = ref.partition("@")
    return (name, version) if sep else (name, None)


class ToolRegistry:
    """
    The tools the gateway knows, by name. An unknown name is denied, never guessed.

    A plain name resolves to the name's active version, ``name@version`` to that
    exact version. ``refresh()`` applies a live source's changes; it is one cheap
    read when nothing changed. If the live source cannot be read, every name
    resolves to nothing until it can (fail closed: calls are denied as unknown).
    """

    def __init__(self) -> None:
        self._base: dict[str, ToolSpec] = {}
        self._base_paths: dict[str, str] = {}
        self._live: LiveSource | None = None
        self._live_state: LiveState | None = None
        self._listeners: list[Callable[[RegistryDelta], object]] = []
        self._generation: int | None = None
        self._lock = threading.Lock()
        self._view = _View({}, {}, {})

    # -- the base set ---------------------------------------------------------

    def register(self, function: Callable[..., Any]) -> ToolSpec:
        """
        Register a function marked with ``@tool``.

        Raises:
            ConfigurationError: The tool is invalid, or another tool has the name.
        """
        spec = spec_from_function(function)
        return self.add(spec)

    def add(self, spec: ToolSpec, *, source_path: str = "") -> ToolSpec:
        """
        Register a ready ``ToolSpec`` in the base set (one version per name).

        Raises:
            ConfigurationError: Another tool (another digest) has the name.
        """
        if spec.name in self._base and self._base[spec.name].digest != spec.digest:
            raise ConfigurationError(f"two different tools are named {spec.name}")
        self._base[spec.name] = spec
        self._base_paths[spec.name] = source_path
        with self._lock:
            self._view = self._resolve(self._live_state)
        log.info("tool_registered", tool=spec.ref, digest=spec.digest)
        return spec

    def load(self, source: str | Path) -> tuple[ToolSpec, ...]:
        """
        Register every ``@tool`` function of a Python file or an importable module.

        Args:
            source: A path to a ``.py`` file, or ``module:dotted.name``.

        Raises:
            ConfigurationError: The file cannot be imported or holds no tools.
        """
        text = str(source)
        if text.startswith("module:"):
            try:
                module: object = importlib.import_module(text.removeprefix("module:"))
            except ImportError as exc:
                raise ConfigurationError(f"tool module {text} cannot be imported") from exc
        else:
            path = Path(text)
            if not path.is_file():
                raise ConfigurationError(f"tool file {path} does not exist")
            module = _load_module_from_path(path)
        functions = _marked_functions(module)
        if not functions:
            raise ConfigurationError(f"{text} defines no @tool function")
        return tuple(self.add(spec_from_function(function), source_path=text)
                     for function in functions)

    # -- the live source ------------------------------------------------------

    @property
    def live(self) -> LiveSource | None:
        """The attached live source, if any."""
        return self._live

    def attach(self, live: LiveSource) -> None:
        """
        Take versions and activations from ``live`` from now on, and read it once.

        Raises:
            ConfigurationError: The live source cannot be read.
        """
        with self._lock:
            self._live = live
            self._generation = None
        if not self.refresh():
            raise ConfigurationError("the live tool registry cannot be read",
                                     remediation="check the registry database under the home")

    def refresh(self) -> bool:
        """
        Apply the live source's changes, if it changed since the last refresh.

        Returns:
            False if the live source could not be read (every name then resolves
            to nothing until a later refresh succeeds), else True.
        """
        live = self._live
        if live is None:
            return True
        with self._lock:
            try:
                generation = live.generation()
                if generation == self._generation:
                    return True
                state = live.state()
            except ConfigurationError as exc:
                log.error("live_registry_unreadable", error=exc.message)  # noqa: TRY400 - the message says it all; no traceback
                self._view = _View({}, {}, {})
                self._live_state = None
                self._generation = None
                return False
            before = self._view
            view = self._resolve(state)
            self._view, self._live_state, self._generation = view, state, generation
        log.info("live_registry_refreshed", generation=generation,
                 active={name: spec.ref for name, spec in view.active.items()})
        self._notify(before, view)
        return True

    def on_change(self, listener: Callable[[RegistryDelta], object]) -> None:
        """
        Call ``listener`` after each refresh that added or removed versions, e.g. to
        stop the worker of a model version that was unloaded. A failing listener is
        logged; it does not undo the change.
        """
        self._listeners.append(listener)

    def _notify(self, before: _View, after: _View) -> None:
        old = {entry.spec.digest: entry.spec for each in before.versions.values()
               for entry in each.values()}
        new = {entry.spec.digest: entry.spec for each in after.versions.values()
               for entry in each.values()}
        delta = RegistryDelta(added=tuple(spec for d, spec in new.items() if d not in old),
                              removed=tuple(spec for d, spec in old.items() if d not in new))
        if not delta.added and not delta.removed:
            return
        for listener in tuple(self._listeners):
            try:
                listener(delta)
            except Exception:  # boundary: a listener's failure must not break the call path
                log.exception("registry_listener_failed")

    def _resolve(self, live: LiveState | None) -> _View:
        specs: dict[str, dict[str, tuple[ToolSpec, Literal["config", "live"], str, str]]] = {}
        gone = live.withdrawn if live is not None else frozenset()
        withdrawn: dict[str, VersionEntry] = {}
        chosen: dict[str, str] = {}
        for name, spec in self._base.items():
            path = self._base_paths.get(name, "")
            if (spec.name, spec.version, spec.digest) in gone:
                withdrawn[spec.ref] = VersionEntry(spec, False, "config", path, withdrawn=True)
                continue
            specs.setdefault(name, {})[spec.version] = (spec, "config", path, "")
            chosen[name] = spec.version
        if live is not None:
            for stored in live.versions:
                spec = stored.spec
                known = specs.setdefault(spec.name, {}).get(spec.version)
                if known is not None and known[0].digest != spec.digest:
                    log.warning("tool_version_overridden", tool=spec.ref, digest=spec.digest)
                specs[spec.name][spec.version] = (spec, "live", stored.source_path,
                                                  stored.loaded_at)
            chosen.update(live.active)
        active: dict[str, ToolSpec] = {}
        for name, version in chosen.items():
            found = specs.get(name, {}).get(version)
            if found is None:
                # The active version is gone (e.g. the configuration changed): fail closed.
                log.warning("active_tool_version_missing", tool=f"{name}@{version}")
                continue
            active[name] = found[0]
        versions = {
            name: {
                version: VersionEntry(spec, active.get(name) is spec, origin, path, at)
                for version, (spec, origin, path, at) in by_version.items()
            }
            for name, by_version in specs.items()
        }
        return _View(versions, active, withdrawn)

    # -- lookups --------------------------------------------------------------

    def get(self, name: str) -> ToolSpec | None:
        """
        The active version of ``name``, or the exact version ``name@version``; else None.

        Names are compared byte for byte.
        """
        view = self._view
        if "@" not in name:
            return view.active.get(name)
        base, version = split_ref(name)
        entry = view.versions.get(base, {}).get(version or "")
        return None if entry is None else entry.spec

    def require(self, name: str) -> ToolSpec:
        """
        The tool of that name (or ``name@version``).

        Raises:
            UnknownTool: No tool has that name.
        """
        spec = self.get(name)
        if spec is None:
            raise UnknownTool(len(name))
        return spec

    def parameter_order(self, name: str) -> tuple[str, ...] | None:
        spec = self.get(name)
        return None if spec is None else spec.parameter_order

    def versions(self, name: str | None = None) -> tuple[VersionEntry, ...]:
        """Every version known (of ``name``, or of all names), by name then version."""
        view = self._view
        names = sorted(view.versions) if name is None else [name]
        return tuple(entry for each in names
                     for _, entry in sorted(view.versions.get(each, {}).items()))

    def withdrawn(self, ref: str | None = None) -> tuple[VersionEntry, ...]:
        """The configuration versions the live source withdrew (``ref``'s, or all), by ref."""
        view = self._view
        return tuple(entry for key, entry in sorted(view.withdrawn.items())
                     if ref is None or key == ref)

    def base_spec(self, name: str) -> ToolSpec | None:
        """The configuration's version of ``name`` (withdrawn or not), or None."""
        return self._base.get(name)

    def base_version(self, name: str) -> str | None:
        """The configuration's version of ``name``, or None."""
        spec = self._base.get(name)
        return None if spec is None else spec.version

    def active_version(self, name: str) -> str | None:
        """The version a plain ``name`` resolves to, or None."""
        spec = self._view.active.get(name)
        return None if spec is None else spec.version

    def __iter__(self) -> Iterator[ToolSpec]:
        """The active version of each name, sorted by name."""
        return iter(sorted(self._view.active.values(), key=lambda spec: spec.name))

    def __len__(self) -> int:
        return len(self._view.active)
