"""
The tool registry: every version of each tool name it knows, and which one is active.

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

import importlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog

from callward.core._canonical import JSONValue
from callward.core.errors import ConfigurationError, UnknownTool
from callward.core.registry._files import load_module_from_path
from callward.core.registry._spec import marked_functions, spec_from_function
from callward.core.types import ToolSpec

log = structlog.get_logger()


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
            module = load_module_from_path(path)
        functions = marked_functions(module)
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
