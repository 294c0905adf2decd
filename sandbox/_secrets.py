"""
Host secrets for one execution: where they come from, and cutting them from results.

Invariants:

- A secret is looked up only for an execution whose tool declared it and whose
  policy granted it; a secret that cannot be found fails the call closed
  (``SecretUnavailable``, kind ``sandbox_unavailable``) before any container
  is asked to run.
- A value travels only inside that one execution's request on the attach
  socket: never in a container's environment, labels or command line, never
  in a log line, never in an audit record (records carry the names).
- Every occurrence of a value in the result, and of its base64 (standard and
  URL-safe, padded or not, at any byte alignment), hex (either case) and URL
  encodings, is replaced by ``[REDACTED:NAME]`` before the result is audited
  or returned; the count goes into the execution's usage.
- ``DirectorySecretSource`` reads only regular files owned by this user with
  no permission bits for group or others (``0600``/``0400``), like
  ``/run/secrets``; a symlink or a readable-by-others file is refused.
"""

from __future__ import annotations

import base64
import os
import re
import stat
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from callward.core import JSONValue, SandboxUnavailable
from callward.core.types import is_secret_name

ENV_PREFIX: Final = "CALLWARD_SECRET_"
MAX_SECRET_BYTES: Final = 64 * 1024
#: Shorter pieces of a misaligned base64 encoding are not redacted on their own:
#: they would cut innocent text. The full encodings are always redacted.
_MIN_PARTIAL_CHARS: Final = 8
#: A message cut short that ends in this much of a secret has that end redacted.
_MIN_TAIL_CHARS: Final = 4


class SecretUnavailable(SandboxUnavailable):
    """
    A secret a tool needs could not be read from the host's secret source.

    Its kind is ``sandbox_unavailable``: callward could not prepare the execution,
    the tool never ran, and the operator (not the model) must act.
    """

    def __init__(self, name: str, why: str) -> None:
        super().__init__(
            f"secret {name} is not available to the sandbox ({why}); the tool did not run",
            remediation=f"provide {name} through the configured secret source "
            f"(environment {ENV_PREFIX}{name}, or a 0600 file named {name} in the "
            "secrets directory)",
        )
        self.secret_name = name


class SecretSource(Protocol):
    """Where the host keeps secrets. One class per backend."""

    def read(self, name: str) -> str:
        """
        The value of secret ``name``.

        Raises:
            SecretUnavailable: The source does not hold it, or holds it unsafely.
        """
        ...


class EnvironmentSecretSource:
    """
    Secrets from environment variables: ``CALLWARD_SECRET_<NAME>``, or a configured mapping.

    Args:
        environ: The environment to read (the process's own, read at the edge).
        mapping: Secret name to variable name, for secrets kept under other names.
    """

    def __init__(
        self, environ: Mapping[str, str], mapping: Mapping[str, str] | None = None
    ) -> None:
        self._environ = environ
        self._mapping = dict(mapping or {})

    def read(self, name: str) -> str:
        variable = self._mapping.get(name, ENV_PREFIX + name)
        value = self._environ.get(variable)
        if value is None:
            raise SecretUnavailable(name, f"environment variable {variable} is not set")
        return _checked(name, value)


class DirectorySecretSource:
    """
    Secrets from a directory with one file per secret (``/run/secrets/<NAME>``).

    One trailing newline is stripped. A file that is not a regular file, is a
    symlink, is not owned by this user or grants any permission to group or
    others is refused.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def read(self, name: str) -> str:
        if not is_secret_name(name):
            raise SecretUnavailable(name, "not a valid secret name")
        path = self._directory / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            why = f"{path} cannot be opened ({type(exc).__name__})"
            raise SecretUnavailable(name, why) from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SecretUnavailable(name, f"{path} is not a regular file")
            if info.st_mode & 0o077:
                raise SecretUnavailable(
                    name, f"{path} has mode {stat.S_IMODE(info.st_mode):04o}; it must be 0600"
                )
            if info.st_uid != os.geteuid():
                raise SecretUnavailable(name, f"{path} is not owned by this user")
            data = os.read(fd, MAX_SECRET_BYTES + 1)
        finally:
            os.close(fd)
        try:
            value = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SecretUnavailable(name, f"{path} is not UTF-8") from exc
        return _checked(name, value.removesuffix("\n"))


def _checked(name: str, value: str) -> str:
    if not value:
        raise SecretUnavailable(name, "it is empty")
    if len(value.encode("utf-8")) > MAX_SECRET_BYTES:
        raise SecretUnavailable(name, f"it is longer than {MAX_SECRET_BYTES} bytes")
    if "\x00" in value:
        raise SecretUnavailable(name, "it holds a NUL character")
    return value


def read_secrets(source: SecretSource | None, names: Iterable[str]) -> dict[str, str]:
    """
    The values of ``names``, all or nothing.

    Raises:
        SecretUnavailable: A name is missing, or no secret source is configured.
    """
    values: dict[str, str] = {}
    for name in names:
        if source is None:
            raise SecretUnavailable(name, "no secret source is configured")
        values[name] = source.read(name)
    return values


@dataclass(frozen=True, slots=True)
class SecretRedactor:
    """
    Cuts secret values and their simple encodings out of text.

    Build it with ``for_secrets``; ``redact_text`` and ``redact_json`` return the
    cleaned value and how many occurrences were cut.
    """

    pattern: re.Pattern[str] | None
    names: Mapping[str, str]

    @classmethod
    def for_secrets(cls, secrets: Mapping[str, str]) -> SecretRedactor:
        forms: dict[str, str] = {}
        for name, value in secrets.items():
            for form in encodings(value):
                forms.setdefault(form, name)
        if not forms:
            return cls(None, {})
        # Longest first, so an encoding that contains the value is cut whole.
        ordered = sorted(forms, key=len, reverse=True)
        return cls(re.compile("|".join(re.escape(f) for f in ordered)), forms)

    def redact_text(self, text: str) -> tuple[str, int]:
        if self.pattern is None:
            return text, 0
        cleaned, count = self.pattern.subn(
            lambda m: f"[REDACTED:{self.names[m.group(0)]}]", text
        )
        return cleaned, count

    def redact_truncated(self, text: str, marker: str = "...") -> tuple[str, int]:
        """
        Like ``redact_text``, and when ``text`` was cut short (ends in ``marker``),
        also a start of a secret form (4 characters or more) left right before the cut.
        """
        text, count = self.redact_text(text)
        if not text.endswith(marker):
            return text, count
        body = text[: -len(marker)]
        for form, name in self.names.items():
            for length in range(min(len(form) - 1, len(body)), _MIN_TAIL_CHARS - 1, -1):
                if body.endswith(form[:length]):
                    return f"{body[:-length]}[REDACTED:{name}]{marker}", count + 1
        return text, count

    def redact_json(self, value: JSONValue) -> tuple[JSONValue, int]:
        """Every string in ``value``, keys too, redacted; the structure is kept."""
        if isinstance(value, str):
            return self.redact_text(value)
        if isinstance(value, list):
            total = 0
            items: list[JSONValue] = []
            for item in value:
                cleaned, count = self.redact_json(item)
                items.append(cleaned)
                total += count
            return items, total
        if isinstance(value, dict):
            total = 0
            result: dict[str, JSONValue] = {}
            for key, item in value.items():
                clean_key, key_count = self.redact_text(key)
                cleaned, count = self.redact_json(item)
                while clean_key in result:  # two keys that differed only in a secret
                    clean_key += "_"
                result[clean_key] = cleaned
                total += key_count + count
            return result, total
        return value, 0


def encodings(value: str) -> tuple[str, ...]:
    """The forms of ``value`` that are redacted: itself, base64, hex and URL encodings."""
    raw = value.encode("utf-8")
    forms = {value, raw.hex(), raw.hex().upper(),
             urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value, safe="")}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        full = encode(raw).decode("ascii")
        forms.update({full, full.rstrip("=")})
        forms.update(_misaligned(encode, raw))
    return tuple(f for f in forms if f)


def _misaligned(encode: Callable[[bytes], bytes], raw: bytes) -> set[str]:
    """
    The base64 characters that depend on ``raw`` alone when it sits at any byte
    offset (0, 1 or 2) of a 3-byte group inside a longer encoded text; the
    characters at both ends mix in the neighbours' bits and are left out.
    """
    pieces: set[str] = set()
    for offset, skip in ((0, 0), (1, 2), (2, 3)):
        text = encode(b"\x00" * offset + raw).decode("ascii")
        end = (offset + len(raw)) // 3 * 4  # the last character of a whole 3-byte group
        piece = text[skip:end]
        if len(piece) >= _MIN_PARTIAL_CHARS:
            pieces.add(piece)
    return pieces


def secret_source(settings: Mapping[str, Any] | None) -> SecretSource:
    """
    The source ``callward.yaml``'s ``sandbox.secrets`` names; the environment by default.

    The environment is read here, at the edge, once per lookup.
    """
    settings = settings or {}
    if settings.get("source") == "directory":
        return DirectorySecretSource(Path(str(settings["directory"])))
    return EnvironmentSecretSource(os.environ, settings.get("environment"))
