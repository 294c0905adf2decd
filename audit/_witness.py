"""
Witnesses: copies of the log's signed checkpoints kept where the log's owner cannot
quietly rewrite them, so that a rolled-back or rewritten log is caught.

Invariants:

- A witness only ever receives signed checkpoint notes, never records.
- ``DirectoryWitness`` keeps the largest checkpoint it was given for each log and
  refuses a smaller one: a witness never moves backwards.
- A witness that fails is logged (``audit_witness_failed``) and never fails an
  append: the records are already durable, and the next checkpoint is offered again.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Protocol

import structlog

from callward.core.errors import ConfigurationError

log = structlog.get_logger()

_SUFFIX: Final = ".checkpoint"
_COMMAND_TIMEOUT_SECONDS: Final = 10.0
#: The store's defaults (kept equal to ``_sqlite``'s, which imports this module).
DEFAULT_CHECKPOINT_EVERY: Final = 1000
DEFAULT_CHECKPOINT_SECONDS: Final = 60.0
_SIZE_LINE = re.compile(r"\A[^\n]*\n(0|[1-9][0-9]{0,18})\n")


class Witness(Protocol):
    """Somewhere a signed checkpoint is copied to. One class per kind of place."""

    @property
    def name(self) -> str:
        """How logs and errors name this witness."""
        ...

    def publish(self, origin: str, note: str) -> None:
        """
        Hand the witness a signed checkpoint of the log ``origin``.

        Raises:
            OSError: The witness could not be reached or refused the checkpoint.
        """
        ...


def checkpoint_file_name(origin: str) -> str:
    """The file a directory witness keeps a log's latest checkpoint in."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", origin) + _SUFFIX


def _size_of(note: str) -> int:
    match = _SIZE_LINE.match(note)
    return int(match.group(1)) if match else -1


class DirectoryWitness:
    """
    Keeps the latest checkpoint of each log as one file in a directory (another disk,
    a mounted share, a directory another account owns).

    The file is replaced atomically (write, fsync, rename) and never by a smaller tree.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = Path(directory)

    @property
    def name(self) -> str:
        return f"dir:{self._directory}"

    def path_for(self, origin: str) -> Path:
        return self._directory / checkpoint_file_name(origin)

    def publish(self, origin: str, note: str) -> None:
        self._directory.mkdir(parents=True, exist_ok=True)
        target = self.path_for(origin)
        try:
            held = target.read_text(encoding="utf-8")
        except FileNotFoundError:
            held = ""
        if held and _size_of(held) > _size_of(note):
            raise OSError(
                f"witness {target} holds a checkpoint of size {_size_of(held)}, larger than "
                f"{_size_of(note)}: the log went backwards"
            )
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(note)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


class CommandWitness:
    """
    Runs an operator's command with the checkpoint on stdin (``curl``, ``aws s3 cp -``,
    a script), so a checkpoint can be pushed anywhere. The log's origin is in
    ``CALLWARD_CHECKPOINT_ORIGIN``; the command is an argument list, never a shell string.
    """

    def __init__(self, argv: Sequence[str], *, timeout_seconds: float = _COMMAND_TIMEOUT_SECONDS):
        if not argv:
            raise ValueError("a witness command needs at least the program")
        self._argv = tuple(argv)
        self._timeout_seconds = timeout_seconds

    @property
    def name(self) -> str:
        return f"command:{self._argv[0]}"

    def publish(self, origin: str, note: str) -> None:
        try:
            subprocess.run(  # noqa: S603 - an argument list the operator configured
                self._argv,
                input=note.encode("utf-8"),
                env={**os.environ, "CALLWARD_CHECKPOINT_ORIGIN": origin},
                check=True,
                capture_output=True,
                timeout=self._timeout_seconds,
            )
        except subprocess.CalledProcessError as exc:
            raise OSError(f"witness command exited with {exc.returncode}") from exc
        except subprocess.TimeoutExpired as exc:
            raise OSError(f"witness command took over {self._timeout_seconds} s") from exc


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """The ``audit`` section of ``callward.yaml``, as the store takes it."""

    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS
    witnesses: tuple[Witness, ...] = ()
    #: When appends are fsynced (``SQLiteAuditStore``'s ``sync``).
    sync: Literal["authorized", "every"] = "every"


def store_settings(section: Mapping[str, object], *, base: Path) -> StoreSettings:
    """
    The store settings a validated ``audit`` section names; relative witness
    directories are relative to ``base`` (the configuration file's directory)::

        audit:
          checkpoint_every: 1000
          checkpoint_seconds: 60
          sync: every         # or authorized: completions fsynced with the next call
          witnesses:
            - directory: /mnt/other-disk/callward-witness
            - command: [/usr/local/bin/push-checkpoint, --log, prod]

    Raises:
        ConfigurationError: An entry is not one of the two shapes above.
    """
    witnesses: list[Witness] = []
    entries = section.get("witnesses") or []
    if not isinstance(entries, list):
        raise ConfigurationError("audit.witnesses is a list")
    for entry in entries:
        if isinstance(entry, Mapping) and isinstance(entry.get("directory"), str):
            witnesses.append(DirectoryWitness(base / str(entry["directory"])))
        elif isinstance(entry, Mapping) and isinstance(entry.get("command"), list):
            witnesses.append(CommandWitness([str(part) for part in entry["command"]]))
        else:
            raise ConfigurationError(
                "a witness is {directory: PATH} or {command: [PROGRAM, ARGS...]}"
            )
    every = section.get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY)
    seconds = section.get("checkpoint_seconds", DEFAULT_CHECKPOINT_SECONDS)
    if not isinstance(every, int) or not isinstance(seconds, int | float):
        raise ConfigurationError(
            "audit.checkpoint_every is an integer, checkpoint_seconds a number"
        )
    sync = section.get("sync", "every")
    if sync not in ("authorized", "every"):
        raise ConfigurationError('audit.sync is "authorized" or "every"')
    return StoreSettings(every, float(seconds), tuple(witnesses),
                         "every" if sync == "every" else "authorized")


def publish_to_all(witnesses: Sequence[Witness], origin: str, note: str) -> None:
    """Offer a checkpoint to every witness; log, never raise, what fails."""
    for witness in witnesses:
        try:
            witness.publish(origin, note)
        except OSError as exc:
            log.warning("audit_witness_failed", witness=witness.name, error=str(exc))
        else:
            log.debug("audit_witness_updated", witness=witness.name, size=_size_of(note))


__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_CHECKPOINT_SECONDS",
    "CommandWitness",
    "DirectoryWitness",
    "StoreSettings",
    "Witness",
    "checkpoint_file_name",
    "publish_to_all",
    "store_settings",
]
