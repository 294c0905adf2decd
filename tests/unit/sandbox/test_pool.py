"""WarmPool with a fake starter: sizes, single use, budget, idle drain, close."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import pytest

from callward.core import ResourceLimits, SandboxUnavailable
from callward.sandbox import PoolConfig
from callward.sandbox._pool import WarmPool

MIB = 1 << 20
SMALL = ResourceLimits(memory_bytes=64 * MIB)
LARGE = ResourceLimits(memory_bytes=256 * MIB)


class FakeEngine:
    """Starts numbered items instantly and records which were discarded."""

    def __init__(self, *, failing: bool = False) -> None:
        self.failing = failing
        self.started: list[tuple[int, ResourceLimits]] = []
        self.egress_of: dict[int, tuple[str, ...]] = {}
        self.discarded: list[int] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, limits: ResourceLimits, egress: tuple[str, ...] = ()) -> int:
        if self.failing:
            raise SandboxUnavailable("the fake engine is down")
        with self._lock:
            item = next(self._ids)
            self.started.append((item, limits))
            self.egress_of[item] = egress
        return item

    def discard(self, item: int) -> None:
        with self._lock:
            self.discarded.append(item)

    def alive(self) -> set[int]:
        with self._lock:
            return {item for item, _ in self.started} - set(self.discarded)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(name="engine")
def _engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(name="make_pool")
def _make_pool(engine: FakeEngine) -> Iterator[object]:
    pools: list[WarmPool[int]] = []

    def make_pool(config: PoolConfig, clock: FakeClock | None = None) -> WarmPool[int]:
        pool = WarmPool(
            config,
            start=engine.start,
            discard=engine.discard,
            **({"clock": clock} if clock else {}),
        )
        pools.append(pool)
        return pool

    yield make_pool
    for pool in pools:
        pool.close()


class TestPoolConfig:
    @pytest.mark.parametrize(
        "kwargs",
        [{"size": -1}, {"size": 65}, {"idle_seconds": 0}, {"memory_budget_bytes": -1}],
    )
    def test_out_of_range_settings_are_refused(self, kwargs: dict[str, float]) -> None:
        """A negative or huge size, no idle time or a negative budget cannot be configured."""
        with pytest.raises(ValueError, match=r"must be|non-negative"):
            PoolConfig(**kwargs)  # type: ignore[arg-type]

    def test_size_is_an_integer(self) -> None:
        """A size of True or 2.5 is a programming error."""
        with pytest.raises(TypeError):
            PoolConfig(size=True)


class TestWarmPool:
    def test_first_take_is_empty_then_the_pool_fills(
        self, make_pool, engine: FakeEngine
    ) -> None:
        """The first call finds nothing (cold start); the worker then keeps `size` ready."""
        pool = make_pool(PoolConfig(size=3))

        first = pool.take(SMALL)
        filled = pool.wait_ready(SMALL, 3, timeout_seconds=5)

        expected = (None, True, 3)
        assert expected == (first, filled, pool.ready_count(SMALL))

    def test_an_item_is_handed_out_once(self, make_pool) -> None:
        """Items taken are all different: nothing is handed out twice."""
        pool = make_pool(PoolConfig(size=4))
        pool.warm(SMALL)
        taken = []
        for _ in range(12):
            pool.wait_ready(SMALL, 1, timeout_seconds=5)
            taken.append(pool.take(SMALL))

        expected = 12
        assert expected == len(set(taken) - {None})

    def test_profiles_are_kept_apart_by_limits(self, make_pool, engine: FakeEngine) -> None:
        """An item started under one set of limits is never handed out under another."""
        pool = make_pool(PoolConfig(size=2))
        pool.warm(SMALL)
        pool.wait_ready(SMALL, 2, timeout_seconds=5)

        other = pool.take(LARGE)
        small = pool.take(SMALL)

        limits_of = dict(engine.started)
        expected = (None, SMALL)
        assert expected == (other, limits_of[small])

    def test_profiles_are_kept_apart_by_egress_allowlist(
        self, make_pool, engine: FakeEngine
    ) -> None:
        """An item started for one egress allowlist serves only that list, never another or none."""
        pool = make_pool(PoolConfig(size=2))
        granted = ("127.0.0.1:8080",)
        pool.warm(SMALL, granted)
        pool.wait_ready(SMALL, 2, timeout_seconds=5, egress=granted)

        other = pool.take(SMALL, ("127.0.0.1:9090",))
        none = pool.take(SMALL)
        item = pool.take(SMALL, granted)

        expected = (None, None, granted)
        assert expected == (other, none, engine.egress_of[item])

    def test_memory_budget_caps_the_idle_items(self, make_pool, engine: FakeEngine) -> None:
        """Idle items' memory limits together stay within the budget, whatever the size."""
        pool = make_pool(PoolConfig(size=8, memory_budget_bytes=200 * MIB))
        pool.warm(SMALL)

        pool.wait_ready(SMALL, 3, timeout_seconds=5)
        pool.wait_ready(SMALL, 4, timeout_seconds=0.3)

        expected = 3
        assert expected == pool.ready_count(SMALL)

    def test_size_zero_never_starts_anything(self, make_pool, engine: FakeEngine) -> None:
        """With size 0 every take is empty and nothing is started."""
        pool = make_pool(PoolConfig(size=0))

        taken = pool.take(SMALL)
        pool.warm(SMALL)

        expected = (None, [])
        assert expected == (taken, engine.started)

    def test_idle_profile_is_drained(self, make_pool, engine: FakeEngine) -> None:
        """A profile unused for idle_seconds has its ready items discarded."""
        clock = FakeClock()
        pool = make_pool(PoolConfig(size=2, idle_seconds=10), clock)
        pool.warm(SMALL)
        pool.wait_ready(SMALL, 2, timeout_seconds=5)

        clock.now += 11
        drained = _eventually(lambda: pool.ready_count(SMALL) == 0 and not engine.alive())

        expected = (True, 2)
        assert expected == (drained, len(engine.discarded))

    def test_retired_items_are_discarded(self, make_pool, engine: FakeEngine) -> None:
        """An item handed back after use is discarded, never offered again."""
        pool = make_pool(PoolConfig(size=1))
        pool.warm(SMALL)
        pool.wait_ready(SMALL, 1, timeout_seconds=5)
        item = pool.take(SMALL)

        pool.retire(item)
        discarded = _eventually(lambda: item in engine.discarded)
        pool.wait_ready(SMALL, 1, timeout_seconds=5)

        expected = (True, False)
        assert expected == (discarded, pool.take(SMALL) == item)

    def test_close_discards_everything_started(self, make_pool, engine: FakeEngine) -> None:
        """After close, every item the pool started is discarded and take returns None."""
        pool = make_pool(PoolConfig(size=3))
        pool.warm(SMALL)
        pool.warm(LARGE)
        pool.wait_ready(SMALL, 3, timeout_seconds=5)

        pool.close()

        expected = (set(), None)
        assert expected == (engine.alive(), pool.take(SMALL))

    def test_engine_failures_are_retried_after_a_backoff(self, make_pool) -> None:
        """A start that raises leaves the pool empty and the caller cold, never crashed."""
        engine = FakeEngine(failing=True)
        pool = WarmPool(PoolConfig(size=2), start=engine.start, discard=engine.discard)
        try:
            pool.warm(SMALL)
            filled = pool.wait_ready(SMALL, 1, timeout_seconds=0.3)
            engine.failing = False
            recovered = pool.wait_ready(SMALL, 1, timeout_seconds=5)
        finally:
            pool.close()

        expected = (False, True)
        assert expected == (filled, recovered)


def _eventually(check: object, timeout_seconds: float = 5.0) -> bool:
    event = threading.Event()
    for _ in range(int(timeout_seconds / 0.01)):
        if check():  # type: ignore[operator]
            return True
        event.wait(0.01)
    return False
