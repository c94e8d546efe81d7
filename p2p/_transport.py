"""TCP transport that closes every socket it dialed when the host stops.

py-libp2p 0.8.1 leaks the dialer's socket (a ``ResourceWarning``) when a connection
dies while its yamux reader is being cancelled, e.g. when both ends shut down at once
(every devnet teardown). :class:`TrackingTCP` remembers the sockets it dialed;
:meth:`close_leftovers` closes the ones still open once the host has stopped, so
nothing is left for the garbage collector to complain about.
"""

from __future__ import annotations

import weakref
from typing import Any

import trio
from libp2p.abc import IRawConnection
from libp2p.transport.tcp.tcp import TCP

__all__ = ["TrackingTCP"]


class TrackingTCP(TCP):
    """libp2p's TCP transport plus a registry of dialed sockets."""

    def __init__(self) -> None:
        super().__init__()
        self._dialed: weakref.WeakSet[trio.SocketStream] = weakref.WeakSet()

    def _track(self, conn: IRawConnection) -> IRawConnection:
        stream: Any = getattr(getattr(conn, "stream", None), "stream", None)
        if isinstance(stream, trio.SocketStream):
            self._dialed.add(stream)
        return conn

    async def _dial_resolved(
        self, maddr: Any, source: tuple[str, int] | None = None
    ) -> IRawConnection:
        return self._track(await super()._dial_resolved(maddr, source))

    def close_leftovers(self) -> int:
        """Close dialed sockets that are still open; returns how many there were."""
        leftovers = [s for s in self._dialed if s.socket.fileno() != -1]
        for stream in leftovers:
            stream.socket.close()
        return len(leftovers)
