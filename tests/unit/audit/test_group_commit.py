"""
The group commit's queue on its own: a batch takes every thread waiting (the threads
a batch just released are not left for the one after), a lone appender never waits,
and a thread interrupted while it waits is neither written for nor waited for.
"""

from __future__ import annotations

import threading
import time

from callward.audit._checkpoint import Checkpoint
from callward.audit._group_commit import AppendRequest, GroupCommit


def _request(i: int = 0) -> AppendRequest:
    return AppendRequest(kind="call.completed", body_json=b"{}", ts=str(i))


class _Interrupt(Exception):
    """What an interrupted wait raises in these tests."""


class _Writes:
    """A write that takes ``seconds`` (as a commit does) and keeps each batch's size."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.batches: list[list[AppendRequest]] = []

    def __call__(self, batch: list[AppendRequest]) -> Checkpoint | None:
        self.batches.append(list(batch))
        time.sleep(self.seconds)
        return None


def _run(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a submit never returned"


class TestGroupCommit:
    def test_threads_released_by_a_batch_are_in_the_next_one(self):
        """
        Eight threads appending one after another share each commit: batches do not
        alternate between two halves of them.
        """
        writes = _Writes(seconds=0.004)
        group = GroupCommit(writes)

        def work() -> None:
            for i in range(25):
                group.submit(_request(i))

        _run([threading.Thread(target=work) for _ in range(8)])

        assert 200 == sum(len(batch) for batch in writes.batches)
        # Alternating halves would take 50 commits or more; all eight at once, 25.
        assert len(writes.batches) <= 40

    def test_a_lone_appender_writes_each_request_at_once(self):
        writes = _Writes()
        group = GroupCommit(writes)
        started = time.monotonic()

        for i in range(500):
            group.submit(_request(i))

        assert [1] * 500 == [len(batch) for batch in writes.batches]
        assert time.monotonic() - started < 5

    def test_no_request_is_done_before_its_batch_was_written(self):
        written: set[int] = set()
        early: list[AppendRequest] = []

        def write(batch: list[AppendRequest]) -> None:
            time.sleep(0.001)
            written.update(id(request) for request in batch)

        group = GroupCommit(write)

        def work() -> None:
            for i in range(20):
                request = _request(i)
                group.submit(request)
                if not request.done or id(request) not in written:
                    early.append(request)

        _run([threading.Thread(target=work) for _ in range(6)])

        assert [] == early

    def test_a_waiter_interrupted_before_its_batch_is_not_written_nor_awaited(self):
        """
        A thread whose wait is interrupted while its request is still queued takes it
        out of the queue; the threads after it go on.
        """
        release = threading.Event()
        writes = _Writes()
        group = GroupCommit(lambda batch: (writes(batch), release.wait(10), None)[-1])
        leader = threading.Thread(target=group.submit, args=(_request(0),))
        leader.start()
        _wait_for(lambda: bool(writes.batches))
        interrupted = _request(1)
        errors = _interrupted_waiter(group, interrupted, taken=False)
        release.set()
        leader.join(10)
        group.submit(_request(2))

        assert 1 == len(errors)
        assert [[0], [2]] == [[int(r.ts) for r in batch] for batch in writes.batches]
        assert not interrupted.done

    def test_a_waiter_interrupted_while_its_batch_is_written_is_not_awaited(self):
        """
        A thread interrupted after another thread took its request into a batch
        leaves; its request is written all the same, and the next leader does not
        wait for it.
        """
        releases = [threading.Event(), threading.Event()]
        writes = _Writes()

        def write(batch: list[AppendRequest]) -> None:
            writes(batch)
            if len(writes.batches) <= len(releases):
                releases[len(writes.batches) - 1].wait(10)

        group = GroupCommit(write)
        leader = threading.Thread(target=group.submit, args=(_request(0),))
        leader.start()
        _wait_for(lambda: bool(writes.batches))
        interrupted = _request(1)
        errors = []
        waiter = threading.Thread(
            target=lambda: errors.extend(_interrupted_waiter(group, interrupted, taken=True))
        )
        waiter.start()
        _wait_for(lambda: interrupted in group._queue)
        second = threading.Thread(target=group.submit, args=(_request(2),))
        second.start()
        _wait_for(lambda: len(group._queue) == 2)
        releases[0].set()  # the second thread leads a batch of both queued requests
        leader.join(10)
        waiter.join(10)
        releases[1].set()
        second.join(10)
        group.submit(_request(3))

        assert 1 == len(errors)
        assert interrupted.done
        assert [[0], [1, 2], [3]] == [
            sorted(int(r.ts) for r in batch) for batch in writes.batches
        ]
        assert 0 == group._returning


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def _interrupted_waiter(
    group: GroupCommit, request: AppendRequest, *, taken: bool
) -> list[BaseException]:
    """
    Submit ``request`` from this thread with its waits interrupted: at once while it
    is queued, or (``taken``) only once another thread took it into a batch (until
    then this thread's waits never end, so it cannot lead). Returns what it raised.
    """
    cond = group._cond
    original = cond.wait
    me = threading.get_ident()

    def wait(timeout: float | None = None) -> bool:
        if threading.get_ident() != me:
            return original(timeout)
        if not taken:
            raise _Interrupt
        while request in group._queue:
            original(0.001)
        raise _Interrupt

    cond.wait = wait  # type: ignore[method-assign]
    try:
        group.submit(request)
    except _Interrupt as exc:
        return [exc]
    finally:
        cond.wait = original  # type: ignore[method-assign]
    return []
