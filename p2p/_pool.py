"""Session streams kept open between uses, one protocol, any number of peers.

Theory of operation
-------------------
Opening a session stream costs both ends CPU every time: a yamux stream, the protocol's
multistream-select on the listener, the session's three tasks and their teardown (about 2 ms
of a 2-vCPU machine per stream, measured on the inference service). A client that runs one
generation after another over the same peers, or a node that pushes to the same successor
session after session, pays that for every generation. A :class:`SessionPool` keeps such
streams for the next use instead, as HTTP keeps connections alive.

Each stream lives in a *keeper* task in the pool's nursery (the stream's ``session_context``
must be entered and left by one task). :meth:`SessionPool.lease` hands out an idle stream to
the peer when one is healthy, else starts a keeper for a new one. The lease gives the stream
back only when the user says it is clean (:attr:`Lease.reusable`: the protocol on it came to
an agreed end, nothing of the last use is still in flight); anything else (an error, a
cancellation, a use that ended half-way) closes it, so a stream is never reused in an unknown
state. An idle stream is closed after ``idle_s``: the listener should wait longer than that
for a stream's next use, so a live peer never closes a stream a lease is about to take.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from p2p._errors import P2PError
from p2p._host import Host
from p2p._peer_id import PeerId
from p2p._session import SessionConfig, SessionStream

if TYPE_CHECKING:  # trio-typing's stubs (pulled in by libp2p) shadow trio's own annotations
    from trio_typing import TaskStatus

__all__ = ["Lease", "SessionPool", "open_session_pool"]

logger = logging.getLogger(__name__)

DEFAULT_IDLE_S = 10.0


@dataclass(eq=False, slots=True)
class _Slot:
    """One kept stream and what its keeper waits for."""

    peer: PeerId
    session: SessionStream
    leased: bool = True
    dropped: bool = False
    changed: trio.Event = field(default_factory=trio.Event)

    def poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def healthy(self) -> bool:
        stats = self.session.statistics()
        return not (self.dropped or stats.closed or stats.error or stats.queued_messages)


@dataclass(eq=False, slots=True)
class Lease:
    """A pooled stream while in use; set `reusable` once its protocol ended cleanly."""

    session: SessionStream
    reused: bool
    reusable: bool = False


class SessionPool:
    """Idle session streams of one protocol by peer (see the module docstring)."""

    def __init__(self, host: Host, protocol: str, nursery: trio.Nursery, *,
                 config: SessionConfig | None = None, idle_s: float = DEFAULT_IDLE_S,
                 max_idle_per_peer: int = 4) -> None:
        self._host = host
        self._protocol = protocol
        self._nursery = nursery
        self._config = config or SessionConfig()
        self._idle_s = idle_s
        self._max_idle = max_idle_per_peer
        self._idle: dict[PeerId, list[_Slot]] = {}
        self.opened = 0  # streams opened, for tests and statistics
        self.reused = 0

    def idle_count(self, peer: PeerId | None = None) -> int:
        """Idle streams that a lease would take (to `peer`, or to anyone)."""
        peers = [peer] if peer is not None else list(self._idle)
        return sum(slot.healthy() for p in peers for slot in self._idle.get(p, ()))

    @asynccontextmanager
    async def lease(self, peer: PeerId) -> AsyncIterator[Lease]:
        """A stream to `peer` for the block: an idle one if healthy, else a new one.

        Raises what opening a stream raises (`DialError`).
        """
        taken = self._take(peer)
        reused = taken is not None
        if taken is None:
            slot: _Slot = await self._nursery.start(self._keep, peer)
            self.opened += 1
        else:
            slot = taken
            self.reused += 1
        lease = Lease(slot.session, reused=reused)
        try:
            yield lease
        finally:
            slot.leased = False
            if lease.reusable and slot.healthy() \
                    and len(self._idle.setdefault(peer, [])) < self._max_idle:
                self._idle[peer].append(slot)
            else:
                slot.dropped = True
            slot.poke()

    def close_idle(self) -> None:
        """Close every idle stream (their keepers say goodbye and end)."""
        for idle in self._idle.values():
            for slot in idle:
                slot.dropped = True
                slot.poke()
        self._idle.clear()

    def _take(self, peer: PeerId) -> _Slot | None:
        idle = self._idle.get(peer)
        while idle:
            slot = idle.pop()
            if slot.healthy():
                slot.leased = True
                slot.poke()
                return slot
            slot.dropped = True
            slot.poke()
        return None

    async def _keep(self, peer: PeerId, *,
                    task_status: TaskStatus[_Slot] = trio.TASK_STATUS_IGNORED) -> None:
        """Own one stream: open it, then hold it while leased or idle, until dropped or idle
        for `idle_s` (a peer that ends the stream meanwhile makes it unhealthy: dropped at the
        next lease)."""
        started = False
        try:
            async with self._host.open_session(peer, self._protocol,
                                               config=self._config) as s:
                slot = _Slot(peer, s)
                task_status.started(slot)
                started = True
                await self._hold(slot)
        except P2PError as exc:
            if not started:
                raise  # the lease's open fails
            # Once lent, a stream's failure is its user's to see, never the pool's nursery's.
            logger.debug("kept stream to %s ended: %s", peer.short(), exc)

    async def _hold(self, slot: _Slot) -> None:
        while not slot.dropped:
            changed = slot.changed
            if slot.leased:
                await changed.wait()
                continue
            with trio.move_on_after(self._idle_s):
                await changed.wait()
                continue
            # Idle too long; no await since the timeout, so no lease took it meanwhile.
            idle = self._idle.get(slot.peer, [])
            if slot in idle:
                idle.remove(slot)
            slot.dropped = True


@asynccontextmanager
async def open_session_pool(host: Host, protocol: str, *, config: SessionConfig | None = None,
                            idle_s: float = DEFAULT_IDLE_S) -> AsyncIterator[SessionPool]:
    """A :class:`SessionPool` whose kept streams close when the block ends (with a goodbye,
    or reset if still in use after the session's close timeout)."""
    cfg = config or SessionConfig()
    async with trio.open_nursery() as nursery:
        pool = SessionPool(host, protocol, nursery, config=cfg, idle_s=idle_s)
        try:
            yield pool
        finally:
            pool.close_idle()
            nursery.cancel_scope.deadline = trio.current_time() + cfg.close_timeout
