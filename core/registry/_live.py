"""
Changing the live registry while callward runs: load, activate, roll back, unload.

Invariants:

- Every change is written to the audit log, with the tool's ref and digest,
  inside the registry transaction: if the record cannot be written the change
  is rolled back, so a running gateway never runs a version whose loading or
  activation is not in the log (``tool.loaded``, ``tool.activated``,
  ``tool.rolled_back``, ``tool.unloaded``). The converse is weaker: if the
  registry commit itself fails after the records were written, the log holds
  records of a change that did not happen (each names its ref and digest, so
  ``callward tools list`` settles what is in force).
- ``name@version`` is immutable: loading it again with another digest is refused.
- What runs is the snapshot stored at load time (``read_tool_file``): editing
  the file afterwards changes nothing until it is loaded again, as a new version.
- The active version is never unloaded by accident: unloading it needs
  ``force``, and then the version active before it (if still known) takes
  over, else the configuration's version, else the name resolves to nothing.
- A model tool (``models_as_tools``) comes from the configuration and is never
  stored as a snapshot; ``unload`` *withdraws* it (a marker with its digest, no
  ``force`` needed: no other version takes over, the name resolves to nothing and a
  running gateway stops its worker), and ``activate`` of the same ``name@version``
  reinstates it (its worker starts again on the next call). A configuration's
  function tools are still changed in the configuration only.
- Rollback re-activates the version that was active before the current one
  was activated; repeated rollbacks walk further back.

Example::

    live = LiveRegistry.of(gateway)
    live.load(Path("tools_v2.py"))          # new versions, now active
    live.rollback("square")                 # back to the previous version
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import structlog

from callward.core._canonical import JSONValue
from callward.core.errors import ConfigurationError
from callward.core.protocols import AuditLog
from callward.core.registry._files import read_tool_file
from callward.core.registry._registry import LiveSource, ToolRegistry, split_ref
from callward.core.registry._store import Action, HistoryEntry
from callward.core.types import ToolSpec


class LiveStoreChange(Protocol):
    """The writes of one change (``RegistryChange``, ``PostgresRegistryChange``)."""

    def stored_digest(self, name: str, version: str) -> str | None: ...

    def put_version(self, spec: ToolSpec, *, source_path: str, file_text: str,
                    file_sha256: str) -> None: ...

    def delete_version(self, name: str, version: str) -> None: ...

    def withdraw(self, spec: ToolSpec) -> None: ...

    def reinstate(self, spec: ToolSpec) -> None: ...

    def set_active(self, name: str, version: str | None, *, previous: str | None,
                   action: Action) -> None: ...


@runtime_checkable
class LiveStore(LiveSource, Protocol):
    """
    A live source ``LiveRegistry`` can change: a home's ``RegistryStore`` (SQLite) or a
    fleet's ``PostgresRegistryStore``. ``change()`` is one transaction that bumps the
    generation, changers waiting for each other.
    """

    def history(self, name: str) -> tuple[HistoryEntry, ...]: ...

    def change(self) -> AbstractContextManager[LiveStoreChange]: ...


class Assembled(Protocol):
    """What ``LiveRegistry.of`` needs of an assembled gateway: its registry and its log."""

    @property
    def registry(self) -> ToolRegistry: ...

    @property
    def audit(self) -> AuditLog: ...

log = structlog.get_logger()

ChangeKind = Literal["tool.loaded", "tool.activated", "tool.rolled_back", "tool.unloaded"]


@dataclass(frozen=True, slots=True)
class Change:
    """One audited change: what happened to which version, and the record's seq."""

    kind: ChangeKind
    ref: str
    digest: str
    previous: str | None
    seq: int

    def to_json(self) -> dict[str, JSONValue]:
        return {"kind": self.kind, "ref": self.ref, "digest": self.digest,
                "previous": self.previous, "seq": self.seq}


def _tool(spec: ToolSpec) -> dict[str, JSONValue]:
    tool: dict[str, JSONValue] = {"name": spec.name, "version": spec.version, "ref": spec.ref,
                                  "digest": spec.digest}
    if spec.model is not None:
        tool["model"] = spec.model.to_json()
    return tool


def _ref(name: str, version: str | None) -> str | None:
    return None if version is None else f"{name}@{version}"


class LiveRegistry:
    """
    The audited operations on a registry whose live source is a ``LiveStore``.

    Args:
        registry: The registry (base set from the configuration), attached to ``store``.
        store: The open registry database (``RegistryStore`` or ``PostgresRegistryStore``).
        audit: The audit log every change is written to.
    """

    def __init__(self, registry: ToolRegistry, store: LiveStore, audit: AuditLog) -> None:
        if registry.live is not store:
            raise ValueError("the registry must be attached to the store it changes")
        self._registry = registry
        self._store = store
        self._audit = audit

    @classmethod
    def of(cls, gateway: Assembled) -> LiveRegistry:
        """
        The live registry of a gateway built from a configuration (``Gateway.from_config``).

        Raises:
            TypeError: The gateway's registry has no registry database attached.
        """
        store = gateway.registry.live
        if not isinstance(store, LiveStore):
            raise TypeError("this gateway's registry has no registry database")
        return cls(gateway.registry, store, gateway.audit)

    @property
    def registry(self) -> ToolRegistry:
        return self._registry

    def _current(self) -> None:
        """Read the store's latest state (inside a change: nobody else can write now)."""
        if not self._registry.refresh():
            raise ConfigurationError("the live tool registry cannot be read",
                                     remediation="check the registry database under the home")

    def _record(self, kind: ChangeKind, spec: ToolSpec, previous: str | None,
                **extra: JSONValue) -> Change:
        record = self._audit.append(kind, {"tool": _tool(spec), "previous": previous, **extra})
        log.info("registry_changed", kind=kind, tool=spec.ref, digest=spec.digest,
                 previous=previous, seq=record.seq)
        return Change(kind, spec.ref, spec.digest, previous, record.seq)

    def load(self, path: Path, *, activate: bool = True) -> tuple[Change, ...]:
        """
        Load every ``@tool`` of a file as new versions, and make them active unless told not to.

        Loading a version already stored with the same digest only (re)activates it.

        Raises:
            ConfigurationError: The file is invalid, or a version it defines is already
                known with another digest (a changed tool needs a new version).
            AuditUnavailable: A record could not be written; nothing changed.
        """
        snapshot = read_tool_file(path)
        changes: list[Change] = []
        with self._store.change() as tx:
            self._current()
            # Every conflict is found before the first record is written.
            for spec in snapshot.specs:
                # A withdrawn model tool keeps its name@version: it may be reinstated.
                withdrawn = self._registry.withdrawn(spec.ref)
                known = withdrawn[0].spec if withdrawn else self._registry.get(spec.ref)
                if known is not None and known.digest != spec.digest:
                    raise ConfigurationError(
                        f"{spec.ref} is already known with another digest",
                        remediation="a changed tool needs a new version number")
            for spec in snapshot.specs:
                if tx.stored_digest(spec.name, spec.version) is None:
                    tx.put_version(spec, source_path=str(path.resolve()),
                                   file_text=snapshot.text, file_sha256=snapshot.sha256)
                    changes.append(self._record(
                        "tool.loaded", spec, None, active=activate,
                        source={"path": str(path.resolve()), "sha256": snapshot.sha256,
                                "bytes": len(snapshot.text.encode())}))
                if activate:
                    change = self._activate(tx, spec, "tool.activated")
                    if change is not None:
                        changes.append(change)
        self._registry.refresh()
        return tuple(changes)

    def _activate(self, tx: LiveStoreChange, spec: ToolSpec, kind: ChangeKind) -> Change | None:
        previous = self._registry.active_version(spec.name)
        if previous == spec.version:
            return None
        tx.set_active(spec.name, spec.version, previous=previous,
                      action="rolled_back" if kind == "tool.rolled_back" else "activated")
        return self._record(kind, spec, _ref(spec.name, previous))

    def activate(self, ref: str) -> Change | None:
        """
        Make ``name@version`` the version a plain ``name`` resolves to; a withdrawn
        model tool is reinstated (recorded as ``tool.activated`` with ``reinstated``).

        Returns:
            The change, or None if it was already active (nothing is recorded).

        Raises:
            ConfigurationError: No such version is known.
            AuditUnavailable: The record could not be written; nothing changed.
        """
        with self._store.change() as tx:
            self._current()
            withdrawn = self._registry.withdrawn(ref)
            if withdrawn:
                spec = withdrawn[0].spec
                tx.reinstate(spec)
                change: Change | None = self._record("tool.activated", spec, None,
                                                     reinstated=True)
            else:
                change = self._activate(tx, self._require(ref), "tool.activated")
        self._registry.refresh()
        return change

    def rollback(self, name: str) -> Change:
        """
        Re-activate the version that was active before the current one.

        Raises:
            ConfigurationError: There is no earlier version, or it is no longer known.
            AuditUnavailable: The record could not be written; nothing changed.
        """
        with self._store.change() as tx:
            self._current()
            target = self._rollback_target(name)
            if target is None:
                raise ConfigurationError(f"{name} has no earlier active version to roll back to",
                                         remediation="activate a version by name@version")
            spec = self._require(f"{name}@{target}")
            change = self._activate(tx, spec, "tool.rolled_back")
        self._registry.refresh()
        if change is None:  # pragma: no cover - a target is never the current version
            raise ConfigurationError(f"{name}@{target} is already active")
        return change

    def _rollback_target(self, name: str) -> str | None:
        """The version active before the current one was activated (not by a rollback)."""
        current = self._registry.active_version(name)
        for entry in reversed(self._store.history(name)):
            if entry.action == "activated" and entry.version == current:
                return entry.previous
        return None

    def unload(self, ref: str, *, force: bool = False) -> tuple[Change, ...]:
        """
        Remove a version loaded at run time, or withdraw a model tool.

        A model tool of the configuration (``models_as_tools``) is withdrawn without
        ``force``: the name then resolves to nothing, and a running gateway stops its
        worker on its next refresh; ``activate`` of the same ref reinstates it.

        Args:
            force: Also unload the active version; the previous one takes over.

        Raises:
            ConfigurationError: Not a loaded version (the configuration's versions are
                removed from the configuration), or the active one without ``force``.
            AuditUnavailable: A record could not be written; nothing changed.
        """
        changes: list[Change] = []
        with self._store.change() as tx:
            self._current()
            spec = self._require(ref)
            base = self._registry.base_spec(spec.name)
            if spec.model is not None and base is not None and base.digest == spec.digest:
                # A model tool from the configuration: withdrawn, never stored.
                tx.withdraw(spec)
                changes.append(self._record(
                    "tool.unloaded", spec, None, forced=force, withdrawn=True,
                    was_active=self._registry.active_version(spec.name) == spec.version,
                    active_after=None))
            else:
                self._unload_stored(tx, spec, force=force, changes=changes)
        self._registry.refresh()
        return tuple(changes)

    def _unload_stored(self, tx: LiveStoreChange, spec: ToolSpec, *, force: bool,
                       changes: list[Change]) -> None:
        """Remove a version loaded at run time (see ``unload``)."""
        if tx.stored_digest(spec.name, spec.version) != spec.digest:
            raise ConfigurationError(
                f"{spec.ref} comes from the configuration, not from `tools load`",
                remediation="remove it from the configuration's tool files")
        active = self._registry.active_version(spec.name) == spec.version
        if active and not force:
            raise ConfigurationError(
                f"{spec.ref} is the active version of {spec.name}",
                remediation="activate or roll back to another version first, or use --force")
        after: str | None = None
        base = self._registry.base_version(spec.name)
        if active:
            after = self._version_after_unload(spec)
            tx.set_active(spec.name, after, previous=spec.version, action="unloaded")
        tx.delete_version(spec.name, spec.version)
        changes.append(self._record("tool.unloaded", spec, None, forced=force,
                                    was_active=active,
                                    active_after=_ref(spec.name, after or base)
                                    if active else None))

    def _version_after_unload(self, spec: ToolSpec) -> str | None:
        """The previous version if still known; else None (the configuration's, if any)."""
        target = self._rollback_target(spec.name)
        if target is not None and target != spec.version \
                and self._registry.get(f"{spec.name}@{target}") is not None:
            return target
        return None

    def _require(self, ref: str) -> ToolSpec:
        if split_ref(ref)[1] is None:
            raise ConfigurationError(f"{ref!r} names no version",
                                     remediation="write NAME@VERSION (see callward tools list)")
        spec = self._registry.get(ref)
        if spec is None:
            raise ConfigurationError(f"no version {ref} is known",
                                     remediation="see callward tools list")
        return spec
