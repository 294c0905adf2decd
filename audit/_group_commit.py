"""
Group commit: appends from many threads share one transaction, and so one fsync.

Invariants:

- One thread at a time leads: it takes every request queued so far and writes them
  as one batch; requests that arrive meanwhile queue up for the next leader.
- No request returns before the batch holding it was written (or failed): its
  outcome is set by the write, and it is marked done only after the write returns.
- The write sets each request's outcome; if the write itself raises, the leader
  raises it and the other requests of its batch are still released.
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

    def submit(self, request: AppendRequest) -> Checkpoint | None:
        """
        Queue ``request``; lead a transaction for the queue or wait for the leader's.

        Returns when ``request`` is done (read its ``result()``), with the checkpoint
        the batch wrote if this thread led it, else None.
        """
        with self._cond:
            self._queue.append(request)
            while not request.done:
                if not self._leading:
                    self._leading = True
                    batch, self._queue = self._queue, []
                    break
                self._cond.wait()
            else:
                return None
        checkpoint = None
        try:
            checkpoint = self._write(batch)
        finally:
            with self._cond:
                for item in batch:
                    item.done = True
                self._leading = False
                self._cond.notify_all()
        return checkpoint


__all__ = ["AppendRequest", "GroupCommit"]
