"""The node layer's view of the swarm: p2p announcements in, routing snapshots out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from node._snapshots import PeerSnapshot, PeerState
from p2p import Host, PeerId, SwarmView


class AnnouncementSwarm:
    """A `SwarmSource` for the client and the span chooser, over a p2p `SwarmView`."""

    def __init__(self, view: SwarmView) -> None:
        self.view = view

    def snapshots(self) -> list[PeerSnapshot]:
        """Live, verified peers as routing snapshots."""
        return [PeerSnapshot(peer_id=str(r.peer_id), model_id=r.model_id, start=r.start,
                             end=r.end, state=PeerState(r.state.value),
                             throughput_tokens_per_s=r.throughput, load=r.load,
                             free_cache_tokens=r.free_cache_tokens) for r in self.view.live()]

    def addrs(self, peer_id: str) -> tuple[str, ...]:
        return self.view.addrs(PeerId.from_string(peer_id))

    async def wait_changed(self) -> None:
        await self.view.wait_changed()

    @classmethod
    @asynccontextmanager
    async def watch(cls, host: Host, model_id: str | None) -> AsyncIterator[AnnouncementSwarm]:
        async with SwarmView.watch(host, model_id) as view:
            yield cls(view)
