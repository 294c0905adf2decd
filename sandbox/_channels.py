"""
The two ways a Docker container's runner serves one request, as ``RunnerChannel``\\ s.

- ``CallChannel``: a container used for one call; its stdin ends with the request,
  and the container is removed when the call is finished, whatever happened.
- ``SessionChannel``: one call in an agent session's container, whose lock it holds
  from ``open`` to ``finish``: one line in, one result line out, a fresh process in
  the container for it. The runner stops the call at ``wall_seconds`` itself; a call
  that hits a host-side limit, or ends without a result, ends the session's
  container too.

Which limit fired is read from the container's cgroup (``_cgroups.py``) where the
host can, and from the engine (``ExitOf``) where it must.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from callward.core import SandboxUnavailable
from callward.sandbox._attach import AttachStream
from callward.sandbox._cgroups import oom_kills, pids_limit_hit, pids_refused
from callward.sandbox._egress import EgressLease, EgressNetwork
from callward.sandbox.base import Ending, Observation

log = structlog.get_logger()

#: A container's exit code and whether the engine saw the OOM killer in it (may raise
#: ``SandboxUnavailable``).
ExitOf = Callable[[str], tuple[int, bool]]


@dataclass(slots=True)
class Live:
    """One started container, its runner waiting on stdin, and the host's attach stream."""

    container_id: str
    stream: AttachStream
    started: float
    network: EgressNetwork | None = None
    lease: EgressLease | None = None

    @property
    def egress_proxy(self) -> str:
        return "" if self.network is None else self.network.proxy_url

    def lease_counts(self) -> tuple[int, int]:
        """Connections forwarded and refused so far under its lease (0, 0 without one)."""
        return (0, 0) if self.lease is None else (self.lease.forwarded, self.lease.refused)


@dataclass(slots=True)
class Session:
    """One agent session's container; one call at a time."""

    live: Live
    lock: threading.Lock
    last_used: float
    #: The cgroup counters after the last call (None: not read yet, or unreadable).
    oom_kills: int | None = None
    pids_refused: int | None = None


class CallChannel:
    """
    A container used for one call.

    Args:
        live: The started container.
        head_start_seconds: Since its start, for one started for this call; else 0.
        warm: It was taken from the warm pool.
        release: Removes it after a call that ended (in the background, by the pool).
        discard: Removes it now.
        exit_of: Asks the engine how it ended.
    """

    def __init__(self, live: Live, *, head_start_seconds: float, warm: bool,
                 release: Callable[[Live], None], discard: Callable[[Live], None],
                 exit_of: ExitOf) -> None:
        self._live = live
        self.head_start_seconds = head_start_seconds
        self.warm = warm
        self._release = release
        self._discard = discard
        self._exit_of = exit_of

    @property
    def egress_proxy(self) -> str:
        return self._live.egress_proxy

    def send(self, request: bytes, timeout_seconds: float) -> None:
        self._live.stream.send(request, timeout_seconds)

    def receive(self, timeout_seconds: float) -> tuple[bytes, int] | None:
        return self._live.stream.receive(timeout_seconds)

    def finish(self, ending: Ending) -> Observation:
        live = self._live
        container_id = live.container_id
        forwarded, refused = live.lease_counts()
        try:
            if ending == "limit":
                # Removed below; the pids controller still holds its counters until then.
                observed = Observation(container_id, pids_limit_hit=pids_limit_hit(container_id),
                                       egress_allowed=forwarded, egress_refused=refused)
            else:
                observed = self._observe_exit(ending, forwarded, refused)
        except SandboxUnavailable:
            self._discard(live)
            if self.warm:
                # Lost while it waited (an operator removed it, the engine restarted).
                log.warning("sandbox_warm_container_lost", container_id=container_id[:12])
            raise
        except BaseException:
            self._discard(live)
            raise
        self._release(live)
        return observed

    def _observe_exit(self, ending: Ending, forwarded: int, refused: int) -> Observation:
        container_id = self._live.container_id
        kills = oom_kills(container_id) if ending == "result" else None
        if kills is not None:
            # The runner reported and its output ended, so it has exited; the kernel's
            # own counter says whether the OOM killer ran, without two engine round trips.
            return Observation(container_id, oom_killed=kills > 0,
                               egress_allowed=forwarded, egress_refused=refused)
        exit_code, oom_killed = self._exit_of(container_id)
        return Observation(container_id, exit_code=exit_code, oom_killed=oom_killed,
                           egress_allowed=forwarded, egress_refused=refused)


class SessionChannel:
    """
    One call in a session's container; the caller has taken ``session.lock``, and
    ``finish`` releases it.

    Args:
        session: The session's container.
        exit_of: Asks the engine how the container ended.
        end: Removes the session's container (after a call that must not be followed).
        clock: Monotonic seconds.
    """

    head_start_seconds = 0.0
    warm = False

    def __init__(self, session: Session, *, exit_of: ExitOf, end: Callable[[], None],
                 clock: Callable[[], float]) -> None:
        self._session = session
        self._exit_of = exit_of
        self._end = end
        self._clock = clock
        container_id = session.live.container_id
        # Between two calls only the idle runner is in the container, so the
        # counters read after one call are the next call's "before".
        oom_before = session.oom_kills
        if oom_before is None:
            oom_before = oom_kills(container_id) or 0
        pids_before = session.pids_refused
        if pids_before is None:
            pids_before = pids_refused(container_id)
        self._oom_before, self._pids_before = oom_before, pids_before
        self._lease_before = session.live.lease_counts()

    @property
    def egress_proxy(self) -> str:
        return self._session.live.egress_proxy

    def send(self, request: bytes, timeout_seconds: float) -> None:
        self._session.live.stream.send(request.replace(b"\n", b"") + b"\n", timeout_seconds)

    def receive(self, timeout_seconds: float) -> tuple[bytes, int] | None:
        return self._session.live.stream.receive(timeout_seconds)

    def finish(self, ending: Ending) -> Observation:
        session = self._session
        container_id = session.live.container_id
        try:
            oom_after = oom_kills(container_id)
            pids_after = pids_refused(container_id)
            session.oom_kills, session.pids_refused = oom_after, pids_after
            session.last_used = self._clock()
            forwarded, refused = session.live.lease_counts()
        finally:
            session.lock.release()
        exit_code = None
        oom_killed = oom_after is not None and oom_after > self._oom_before
        try:
            if ending == "silent":
                # The session's runner itself is gone (on gVisor the OOM killer takes the
                # whole sandbox): the engine knows how it ended.
                exit_code, engine_oom = self._exit_of(container_id)
                oom_killed = oom_killed or engine_oom
        finally:
            if ending != "result":
                self._end()
        return Observation(
            container_id,
            exit_code=exit_code,
            oom_killed=oom_killed,
            pids_limit_hit=pids_after > self._pids_before,
            egress_allowed=forwarded - self._lease_before[0],
            egress_refused=refused - self._lease_before[1],
        )
