"""
Login attempt limiting: too many refused sign-ins from one client address pause it.

Invariants:

- Each refused sign-in from an address is counted with its time; a count older than
  ``window_seconds`` no longer counts (a sliding window). Once ``max_failures`` counted
  refusals lie in the window, every further sign-in from that address is refused
  (``Throttle.refused``) before its token is read, until the oldest of them ages out.
- A success does not clear the count: a principal holding one valid token cannot use
  it to reset the count and go on guessing another's.
- Each address's throttling is to be audited at most once per window:
  ``Throttle.audit`` is true for the first refused attempt, and again only once
  ``window_seconds`` have passed since the last one audited.
- At most ``max_addresses`` addresses are tracked; the one seen longest ago goes first,
  so a flood of addresses bounds the memory, never the limit of a busy address.
- Behind a proxy every request has the proxy's address: one address for everybody,
  so one guesser pauses sign-in for all (fail closed; documented in docs/console.md).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

DEFAULT_MAX_FAILURES: Final = 10
DEFAULT_WINDOW_SECONDS: Final = 300.0
MAX_ADDRESSES: Final = 10_000


@dataclass(frozen=True, slots=True)
class LoginLimit:
    """How many refused sign-ins one address may make in a window."""

    max_failures: int = DEFAULT_MAX_FAILURES
    window_seconds: float = DEFAULT_WINDOW_SECONDS

    def __post_init__(self) -> None:
        if self.max_failures < 1 or not self.window_seconds > 0:
            raise ValueError("a login limit needs max_failures >= 1 and window_seconds > 0")


@dataclass(frozen=True, slots=True)
class Throttle:
    """
    What the limiter says of one sign-in attempt.

    Attributes:
        refused: Refuse it (429) without reading the token.
        audit: This refusal is the first of its window: sign one record of it.
        failures: Refused sign-ins of the address in the window.
        retry_after_seconds: When the oldest of them ages out (0 when not refused).
    """

    refused: bool
    audit: bool = False
    failures: int = 0
    retry_after_seconds: int = 0


@dataclass(slots=True)
class _Address:
    failures: deque[float] = field(default_factory=deque)
    audited_at: float | None = None
    seen: float = 0.0


class LoginLimiter:
    """
    Counts refused sign-ins per client address (in memory; safe from several threads).

    Args:
        limit: How many refusals in which window.
        clock: Seconds since the epoch.
    """

    def __init__(self, limit: LoginLimit, *, clock: Callable[[], float],
                 max_addresses: int = MAX_ADDRESSES) -> None:
        self.limit = limit
        self._clock = clock
        self._max_addresses = max_addresses
        self._addresses: dict[str, _Address] = {}
        self._lock = threading.Lock()

    def check(self, address: str) -> Throttle:
        """Whether a sign-in from ``address`` may be tried now (call before reading it)."""
        now = self._clock()
        window = self.limit.window_seconds
        with self._lock:
            entry = self._addresses.get(address)
            if entry is None:
                return Throttle(refused=False)
            self._age(entry, now)
            if len(entry.failures) < self.limit.max_failures:
                return Throttle(refused=False, failures=len(entry.failures))
            audit = entry.audited_at is None or now - entry.audited_at >= window
            if audit:
                entry.audited_at = now
            # The address may try again once enough of its refusals have aged out.
            oldest = entry.failures[len(entry.failures) - self.limit.max_failures]
            retry = max(1, math.ceil(oldest + window - now))
            return Throttle(refused=True, audit=audit, failures=len(entry.failures),
                            retry_after_seconds=retry)

    def failed(self, address: str) -> None:
        """Count one refused sign-in from ``address``."""
        now = self._clock()
        with self._lock:
            entry = self._addresses.get(address)
            if entry is None:
                if len(self._addresses) >= self._max_addresses:
                    stalest = min(self._addresses, key=lambda a: self._addresses[a].seen)
                    del self._addresses[stalest]
                entry = self._addresses[address] = _Address()
            self._age(entry, now)
            entry.failures.append(now)
            entry.seen = now

    def _age(self, entry: _Address, now: float) -> None:
        while entry.failures and now - entry.failures[0] >= self.limit.window_seconds:
            entry.failures.popleft()


__all__ = ["DEFAULT_MAX_FAILURES", "DEFAULT_WINDOW_SECONDS", "LoginLimit", "LoginLimiter",
           "Throttle"]
