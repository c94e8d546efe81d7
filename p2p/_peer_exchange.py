"""Peer exchange: how a node that only knows its bootstrap peers meets the rest.

Why: with nodes that dial only a bootstrap node (the devnet's star), gossipsub's
bootstrap node keeps at most ``degree_high`` peers in its mesh and reaches the others
only through IHAVE gossip to a few random peers per heartbeat; on py-libp2p that
left some nodes without a given announcement for many seconds. The fix is ordinary
connectivity: each node keeps ``target_peers`` connections, so every node has mesh
links of its own.

Protocol (``/shardnet/pex/1``, an RPC): the caller sends the addresses where it can be
dialed; the callee records them in its :class:`PeerBook` (keyed by the *authenticated*
peer id of the stream, so nobody can register addresses for someone else) and answers
with a random sample of the peers it knows that are currently connected to it. The
addresses are unverified hints: dialing one proves nothing until the Noise handshake
authenticates the peer id. Everything is bounded: entries, addresses per entry, and the
reply size.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from p2p._messages import Message, WireLimits, message
from p2p._peer_id import PeerId
from p2p._rpc import RpcSpec

__all__ = ["PeerBook", "PeerExchangeRequest", "PeerExchangeReply", "PeerRecord", "PEX"]

MAX_ADDRS_PER_PEER = 8
MAX_ADDR_LEN = 256
MAX_REPLY_PEERS = 32


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """A peer and the addresses it says it can be dialed at."""

    peer: PeerId
    addrs: tuple[str, ...]

    def validate(self, limits: WireLimits) -> None:
        if len(self.addrs) > MAX_ADDRS_PER_PEER or any(len(a) > MAX_ADDR_LEN for a in self.addrs):
            raise ValueError("too many or too long addresses")


@message("p2p.PeerExchangeRequest", 1)
@dataclass(frozen=True, slots=True)
class PeerExchangeRequest(Message):
    """ "Here is where I can be reached; who else do you know?\""""

    addrs: tuple[str, ...]
    want: int = MAX_REPLY_PEERS

    def validate(self, limits: WireLimits) -> None:
        if len(self.addrs) > MAX_ADDRS_PER_PEER or any(len(a) > MAX_ADDR_LEN for a in self.addrs):
            raise ValueError("too many or too long addresses")
        if not 0 <= self.want <= MAX_REPLY_PEERS:
            raise ValueError("want out of range")


@message("p2p.PeerExchangeReply", 1)
@dataclass(frozen=True, slots=True)
class PeerExchangeReply(Message):
    """A sample of peers the responder is connected to."""

    peers: tuple[PeerRecord, ...]

    def validate(self, limits: WireLimits) -> None:
        if len(self.peers) > MAX_REPLY_PEERS:
            raise ValueError("too many peers")


PEX = RpcSpec(
    "/shardnet/pex/1",
    PeerExchangeRequest,
    PeerExchangeReply,
    limits=WireLimits(max_frame_bytes=64 * 1024, max_collection_len=MAX_REPLY_PEERS * 2),
    timeout=5.0,
)


class PeerBook:
    """Dialable addresses of peers that told us, newest first, bounded (LRU).

    Args:
        capacity: most peers remembered.
        rng: randomness for sampling (seed it in tests).
    """

    def __init__(self, capacity: int = 1024, rng: random.Random | None = None) -> None:
        self._capacity = capacity
        self._book: OrderedDict[PeerId, tuple[str, ...]] = OrderedDict()
        self._rng = rng or random.Random()

    def learn(self, peer: PeerId, addrs: tuple[str, ...]) -> None:
        """Remember (or refresh) where ``peer`` can be dialed."""
        if not addrs:
            return
        self._book[peer] = addrs[:MAX_ADDRS_PER_PEER]
        self._book.move_to_end(peer, last=False)
        while len(self._book) > self._capacity:
            self._book.popitem(last=True)

    def addrs(self, peer: PeerId) -> tuple[str, ...]:
        """Known addresses of ``peer`` (empty if unknown)."""
        return self._book.get(peer, ())

    def sample(
        self, count: int, *, exclude: PeerId | None, keep: Callable[[PeerId], bool]
    ) -> list[PeerRecord]:
        """Up to ``count`` random known peers that pass ``keep`` (not ``exclude``)."""
        candidates = [p for p in self._book if p != exclude and keep(p)]
        chosen = self._rng.sample(candidates, max(0, min(count, len(candidates))))
        return [PeerRecord(peer=p, addrs=self._book[p]) for p in sorted(chosen)]

    def __len__(self) -> int:
        return len(self._book)
