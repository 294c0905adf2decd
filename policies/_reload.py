"""
Hot reload: the policy file watched, and a new policy swapped in whole or not at all.

A policy is compiled once per loaded document (its Cedar policy set parsed
once). A change to the policy file or to a Cedar file it names is seen by
size and modification time; the file is then loaded again, and either the
new compiled policy replaces the old one in a single assignment or, when it
is invalid, the last good one keeps deciding. Either way a ``ReloadResult``
says what happened, for the gateway to audit (``policy.reloaded`` or
``policy.reload_failed``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from callward.core import JSONValue, PolicyInvalid, Sha256Hex
from callward.policies._cedar import CedarPermissions
from callward.policies._document import PolicyDocument
from callward.policies._loader import load_policy

log = structlog.get_logger()

RELOAD_INTERVAL_SECONDS: Final = 1.0


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a reload did: the new digest in force, or why the last good one was kept."""

    ok: bool
    digest: Sha256Hex
    previous_digest: Sha256Hex
    source: str
    message: str = ""

    def to_json(self) -> dict[str, JSONValue]:
        return {"ok": self.ok, "digest": self.digest, "previous_digest": self.previous_digest,
                "source": self.source, "message": self.message}


@dataclass(frozen=True, slots=True)
class Compiled:
    """A document and its parsed Cedar policy set: what decides, swapped as one."""

    document: PolicyDocument
    cedar: CedarPermissions


def compile_policy(document: PolicyDocument) -> Compiled:
    return Compiled(document, CedarPermissions(document))


class PolicyFile:
    """
    The file a policy was loaded from (None for a policy from text), and the Cedar
    files it names, as last seen.
    """

    def __init__(self, path: Path | None, document: PolicyDocument) -> None:
        self.path = path
        self._stamp = self._stamp_of(document)

    def _stamp_of(self, document: PolicyDocument) -> tuple[tuple[int, int], ...]:
        if self.path is None:
            return ()
        paths = [self.path, *(self.path.parent / name for name, _ in document.cedar_sources
                              if name != "<inline>")]
        stamps = []
        for path in paths:
            try:
                stat = os.stat(path)
                stamps.append((stat.st_mtime_ns, stat.st_size))
            except OSError:
                stamps.append((-1, -1))
        return tuple(stamps)

    def changed(self, document: PolicyDocument) -> bool:
        """Whether a file of ``document`` changed since last seen; the change is then seen."""
        stamp = self._stamp_of(document)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True

    def _load(self) -> Compiled:
        if self.path is None:
            raise PolicyInvalid("this policy was not loaded from a file")
        return compile_policy(load_policy(self.path))

    def reload(self, previous: Sha256Hex) -> tuple[Compiled | None, ReloadResult]:
        """
        Load the file again.

        Returns:
            The new compiled policy (None when it is invalid: keep the last good one),
            and what the reload did.
        """
        source = str(self.path)
        try:
            compiled = self._load()
        except PolicyInvalid as exc:
            log.warning("policy_reload_failed", digest=previous)
            return None, ReloadResult(False, previous, previous, source, exc.message[:1000])
        self._stamp = self._stamp_of(compiled.document)
        log.info("policy_reloaded", digest=compiled.document.digest, previous=previous)
        return compiled, ReloadResult(True, compiled.document.digest, previous, source)
