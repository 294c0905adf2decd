"""
Group commit: appends from many threads share one transaction, and so one fsync.

Invariants:

- One thread at a time leads: it takes every request queued so far and writes them
  as one batch; requests that arrive meanwhile queue up for the next leader.
- A batch takes everyone who was waiting: after a batch is written, the next leader
  starts only once every other thread of that batch has woken up and left
  ``submit`` (and so had its chance to queue its next append). Without that, the
  threads just released would always miss the batch that starts at once, and
  batches would alternate between two halves of the threads. A lone appender never
  waits: it has nobody to wait for.
- No request returns before the batch holding it was written (or failed): its
  outcome is set by the write, and it is marked done only after the write returns.
- The write sets each request's outcome; if the write itself raises, the leader
  raises it and the other requests of its batch are still released.
- A thread that leaves ``submit`` by an exception while it waits (an interrupt)
  takes its request out of the queue if it was not taken yet, and is never waited
  for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from callward.audit._checkpoint import Checkpoint
from callward.audit.signer import Signer
from callward.core.types import AuditRecord


@dataclass(slots=True)
class AppendRequest:
    """One append waiting for a transaction; the leader fills ``record`` or ``error``."""

    kind: str
    body_json: bytes
    ts: str
    authorizes: str | None = None
    completes: int | None = None
    only_if_pending: bool = False
    rotate_to: Signer | None = None
    record: AuditRecord | None = None
    error: BaseException | None = None
    done: bool = False
    # Its thread is in ``submit``; and the next leader waits for it to leave.
    waiting: bool = False
    awaited: bool = False

    def result(self) -> AuditRecord | None:
        """
        The record written, or None if a conditional append was skipped.

        Raises:
            BaseException: Whatever failed this request's write.
        """
        if self.error is not None:
            raise self.error
        return self.record


class GroupCommit:
    """
    The queue of appends and its leader.

    Args:
        write: Writes a batch in one transaction and sets each request's ``record``
            or ``error``; returns the checkpoint the transaction wrote, if any.
    """

    def __init__(self, write: Callable[[list[AppendRequest]], Checkpoint | None]) -> None:
        self._write = write
        self._cond = threading.Condition()
        self._queue: list[AppendRequest] = []
        self._leading = False
        # Threads of the last batch written that have not left ``submit`` yet.
        self._returning = 0

    def submit(self, request: AppendRequest) -> Checkpoint | None:
        """
        Queue ``request``; lead a transaction for the queue or wait for the leader's.

        Returns when ``request`` is done (read its ``result()``), with the checkpoint
        the batch wrote if this thread led it, else None.
        """
        with self._cond:
            self._queue.append(request)
            request.waiting = True
            try:
                while not request.done:
                    if not self._leading and not self._returning:
                        self._leading = True
                        batch, self._queue = self._queue, []
                        break
                    self._cond.wait()
                else:
                    return None
            except BaseException:
                if not request.done and request in self._queue:
                    self._queue.remove(request)
                raise
            finally:
                self._leave(request)
        checkpoint = None
        try:
            checkpoint = self._write(batch)
        finally:
            with self._cond:
                for item in batch:
                    item.done = True
                    if item.waiting:
                        item.awaited = True
                        self._returning += 1
                self._leading = False
                self._cond.notify_all()
        return checkpoint

    def _leave(self, request: AppendRequest) -> None:
        """``request``'s thread leaves ``submit`` (holding ``_cond``)."""
        request.waiting = False
        if request.awaited:
            request.awaited = False
            self._returning -= 1
            if not self._returning:
                self._cond.notify_all()


__all__ = ["AppendRequest", "GroupCommit"]
