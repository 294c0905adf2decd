"""
The warm pool: hardened containers started ahead of demand, each used once.

A warm container is created with exactly the options of a cold one
(``container_options``), started, and left with its runner blocked on stdin,
the host holding the attach socket. A call takes one, sends its request, reads
its result, and the container is removed; a background thread starts its
replacement. Limits and network are fixed when a container is created, so the
pool keeps one queue per profile: the limits, and the egress allowlist of a call
granted egress (such a container is on the egress network and holds the proxy's
lease for exactly that allowlist from its start, before any request reaches it).

Invariants:

- A warm container is used at most once: ``take()`` removes it from the pool
  before anyone can see it, and nothing ever puts a used one back.
- An empty pool is never a reason for less isolation: the caller starts a cold
  container (``take()`` returns None).
- Idle containers stay within ``PoolConfig``: at most ``size`` per profile,
  their memory limits together within ``memory_budget_bytes``, and a profile
  unused for ``idle_seconds`` is drained (its containers removed).
- ``close()`` removes every container the pool started or was handed to
  retire, including one whose start was in flight; constructing a pool does no
  I/O and starts no thread.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Generic, Protocol, TypeVar

import structlog

from callward.core import CallwardError, ResourceLimits

log = structlog.get_logger()

T = TypeVar("T")

GIB: Final = 1 << 30
#: How long the worker waits after an engine failure before starting again.
_BACKOFF_SECONDS: Final = 1.0
#: How often the worker wakes up to drain idle profiles when nothing happens.
_TICK_SECONDS: Final = 1.0
_MAX_SIZE: Final = 64


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """
    How many warm containers to keep, and for how long.

    Attributes:
        size: Warm containers kept ready per limits profile; 0 turns the pool off
            (every call starts a cold container).
        idle_seconds: A profile without a call for this long is drained; its next
            call starts cold and warms it again.
        memory_budget_bytes: The memory limits of all idle warm containers together
            stay within this; past it, no more are started.
    """

    size: int = 2
    idle_seconds: float = 300.0
    memory_budget_bytes: int = GIB

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise TypeError("size is an integer")
        if not 0 <= self.size <= _MAX_SIZE:
            raise ValueError(f"size must be in [0, {_MAX_SIZE}]")
        if not 0 < self.idle_seconds <= 86400:
            raise ValueError("idle_seconds must be in (0, 86400]")
        if isinstance(self.memory_budget_bytes, bool) or self.memory_budget_bytes < 0:
            raise ValueError("memory_budget_bytes is a non-negative integer")


#: A profile's key: its limits and its egress allowlist (empty: no network).
ProfileKey = tuple[ResourceLimits, tuple[str, ...]]


@dataclass(slots=True)
class _Profile(Generic[T]):
    limits: ResourceLimits
    egress: tuple[str, ...]
    last_used: float
    ready: deque[T] = field(default_factory=deque)
    starting: int = 0


class WarmPool(Generic[T]):
    """
    Keeps warm items (containers) per profile, started and discarded in one thread.

    A profile is a limits and an egress allowlist (empty for none).

    Args:
        config: Size, idle limit and memory budget.
        start: Starts one warm item under the given limits with the given egress
            allowlist (blocking, may raise ``CallwardError``).
        discard: Ends one item for good; never raises.
        clock: Monotonic seconds, injected for tests.
    """

    def __init__(
        self,
        config: PoolConfig,
        *,
        start: Callable[[ResourceLimits, tuple[str, ...]], T],
        discard: Callable[[T], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._start = start
        self._discard = discard
        self._clock = clock
        self._profiles: dict[ProfileKey, _Profile[T]] = {}
        self._retired: deque[T] = deque()
        self._changed = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False
        self._backoff_until = 0.0

    def take(self, limits: ResourceLimits, egress: tuple[str, ...] = ()) -> T | None:
        """
        A warm item under exactly ``limits`` and ``egress``, now yours alone, or None
        if none is ready.

        Either way the profile counts as in use, and the worker refills it.
        """
        if self.config.size == 0:
            return None
        with self._changed:
            if self._closed:
                return None
            profile = self._profile(limits, egress)
            profile.last_used = self._clock()
            item = profile.ready.popleft() if profile.ready else None
            self._ensure_worker()
            self._changed.notify_all()
        log.debug("sandbox_pool_take", hit=item is not None)
        return item

    def warm(self, limits: ResourceLimits, egress: tuple[str, ...] = ()) -> None:
        """Start keeping warm items under ``limits`` and ``egress`` now, before the first call."""
        if self.config.size == 0:
            return
        with self._changed:
            if self._closed:
                return
            self._profile(limits, egress).last_used = self._clock()
            self._ensure_worker()
            self._changed.notify_all()

    def retire(self, item: T) -> None:
        """Hand a used item to the worker to discard in the background."""
        with self._changed:
            if not self._closed and self._worker is not None:
                self._retired.append(item)
                self._changed.notify_all()
                return
        self._discard(item)

    def ready_count(self, limits: ResourceLimits, egress: tuple[str, ...] = ()) -> int:
        """How many warm items under ``limits`` and ``egress`` are ready now."""
        with self._changed:
            profile = self._profiles.get((limits, egress))
            return len(profile.ready) if profile else 0

    def wait_ready(self, limits: ResourceLimits, count: int, timeout_seconds: float,
                   egress: tuple[str, ...] = ()) -> bool:
        """Block until ``count`` items of the profile are ready; whether they are."""
        deadline = self._clock() + timeout_seconds
        with self._changed:
            while True:
                profile = self._profiles.get((limits, egress))
                if profile is not None and len(profile.ready) >= count:
                    return True
                remaining = deadline - self._clock()
                if remaining <= 0 or self._closed:
                    return False
                self._changed.wait(min(remaining, _TICK_SECONDS))

    def close(self) -> None:
        """Stop the worker and discard every item, ready, retired or still starting."""
        with self._changed:
            self._closed = True
            worker, self._worker = self._worker, None
            self._changed.notify_all()
        if worker is not None:
            worker.join()
        with self._changed:
            leftovers = list(self._retired)
            self._retired.clear()
            for profile in self._profiles.values():
                leftovers.extend(profile.ready)
                profile.ready.clear()
            self._profiles.clear()
        for item in leftovers:
            self._discard(item)

    # -- the worker -----------------------------------------------------------------

    def _profile(self, limits: ResourceLimits, egress: tuple[str, ...]) -> _Profile[T]:
        profile = self._profiles.get((limits, egress))
        if profile is None:
            profile = self._profiles[limits, egress] = _Profile(limits, egress, self._clock())
        return profile

    def _ensure_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(
                target=self._work, name="callward-sandbox-pool", daemon=True
            )
            self._worker.start()
            # A process that exits without close() still removes its warm containers;
            # one that is killed leaves them to the next start's remove_leftovers().
            atexit.register(_close_at_exit, weakref.ref(self))

    def _work(self) -> None:
        while True:
            with self._changed:
                if self._closed:
                    return
                retired = list(self._retired)
                self._retired.clear()
                drained = self._drain_idle()
                wanted = None if retired or drained else self._next_to_start()
                if wanted is None and not retired and not drained:
                    self._changed.wait(_TICK_SECONDS)
                    continue
                if wanted is not None:
                    wanted.starting += 1
            for item in (*retired, *drained):
                self._discard(item)
            if wanted is not None:
                self._start_one(wanted)

    def _drain_idle(self) -> list[T]:
        now = self._clock()
        drained: list[T] = []
        for key, profile in list(self._profiles.items()):
            if now - profile.last_used > self.config.idle_seconds:
                drained.extend(profile.ready)
                if profile.starting == 0:
                    del self._profiles[key]
                else:
                    profile.ready.clear()
        if drained:
            log.info("sandbox_pool_drained", count=len(drained))
        return drained

    def _next_to_start(self) -> _Profile[T] | None:
        if self._clock() < self._backoff_until:
            return None
        held = sum(
            (len(p.ready) + p.starting) * p.limits.memory_bytes for p in self._profiles.values()
        )
        for profile in self._profiles.values():
            short = len(profile.ready) + profile.starting < self.config.size
            fits = held + profile.limits.memory_bytes <= self.config.memory_budget_bytes
            if short and fits:
                return profile
        return None

    def _start_one(self, profile: _Profile[T]) -> None:
        try:
            item = self._start(profile.limits, profile.egress)
        except CallwardError as exc:
            log.warning("sandbox_pool_start_failed", kind=exc.kind)
            with self._changed:
                profile.starting -= 1
                self._backoff_until = self._clock() + _BACKOFF_SECONDS
            return
        except Exception:  # the worker's boundary: it must outlive any failure
            log.exception("sandbox_pool_start_crashed")
            with self._changed:
                profile.starting -= 1
                self._backoff_until = self._clock() + _BACKOFF_SECONDS
            return
        with self._changed:
            profile.starting -= 1
            if self._closed or self._profiles.get((profile.limits, profile.egress)) is not profile:
                keep = False
            else:
                keep = self._clock() - profile.last_used <= self.config.idle_seconds
                if keep:
                    profile.ready.append(item)
                    self._changed.notify_all()
        if not keep:
            self._discard(item)


class _Closable(Protocol):
    def close(self) -> None: ...


def _close_at_exit(pool_ref: weakref.ref[_Closable]) -> None:
    pool = pool_ref()
    if pool is not None:
        pool.close()
