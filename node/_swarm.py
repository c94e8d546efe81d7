"""The node layer's view of the swarm: announcements in, routing snapshots out.

`Announcer` signs and publishes this node's announcement on the model's gossip topic on a
timer; `AnnouncementSwarm` keeps the latest verified announcement per peer for one model and
turns the live ones into `PeerSnapshot`s for routing and span choice. A record whose signature
does not match its peer id, that names another model, or whose sequence number is not newer
than what we hold is dropped; an expired one stops counting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from node._snapshots import PeerSnapshot, PeerState
from p2p import Host, Identity, Message, P2PError, PeerId, WireLimits, message

logger = logging.getLogger(__name__)
DOMAIN = b"shardnet/announcement/1"
_MAX_ADDRS = 16


# One topic for every model: a bootstrap peer (which serves no model, so would never join a
# per-model topic's mesh) relays it, so nodes and clients that only know the bootstrap still
# hear each other. Records name their model; receivers keep the ones they follow.
TOPIC = "/shardnet/announce/1"


def topic(model_id: str | None) -> str:
    return TOPIC


@message("shardnet.AnnouncementBody", 1)
@dataclass(frozen=True, slots=True)
class AnnouncementBody(Message):
    """What a serving node says about itself (signed as bytes, see `SignedAnnouncement`)."""

    peer_id: PeerId
    addrs: tuple[str, ...]
    model_id: str
    start: int
    end: int
    state: str
    throughput: float
    free_cache_tokens: int
    load: float
    version: str
    seq: int
    expires_at: float

    def validate(self, limits: WireLimits) -> None:
        if len(self.addrs) > _MAX_ADDRS or any(len(a) > 256 for a in self.addrs):
            raise ValueError("too many or too long addresses")
        if not 0 <= self.start < self.end or self.state not in {s.value for s in PeerState}:
            raise ValueError("bad span or state")
        if self.throughput < 0 or self.free_cache_tokens < 0 or not 0 <= self.load <= 1:
            raise ValueError("bad load figures")
        if len(self.model_id) > 128 or len(self.version) > 32 or self.seq < 0:
            raise ValueError("bad model id, version or sequence")


@message("shardnet.SignedAnnouncement", 1)
@dataclass(frozen=True, slots=True)
class SignedAnnouncement(Message):
    body: bytes
    signature: bytes


def verify(data: bytes) -> AnnouncementBody | None:
    """The announcement in `data` if it is well-formed and signed by its peer, else None."""
    try:
        signed = SignedAnnouncement.from_wire(data)
        body = AnnouncementBody.from_wire(signed.body)
    except P2PError:
        return None
    if not body.peer_id.verify(DOMAIN, signed.body, signed.signature):
        return None
    return body


@dataclass(frozen=True, slots=True)
class NodeAnnouncement:
    """The parts of an announcement a node fills in each time it publishes."""

    start: int
    end: int
    state: str
    addrs: tuple[str, ...]
    throughput: float = 0.0
    free_cache_tokens: int = 0
    load: float = 0.0


class Announcer:
    """Signs and publishes this node's announcements with increasing sequence numbers."""

    def __init__(self, host: Host, identity: Identity, *, model_id: str, version: str,
                 ttl_s: float) -> None:
        self.host = host
        self.identity = identity
        self.model_id = model_id
        self.version = version
        self.ttl_s = ttl_s
        # Wall-clock nanoseconds: a restarted node's sequence still increases.
        self._seq = time.time_ns()

    def sign(self, record: NodeAnnouncement) -> bytes:
        self._seq = max(self._seq + 1, time.time_ns())
        body = AnnouncementBody(
            peer_id=self.identity.peer_id, addrs=record.addrs, model_id=self.model_id,
            start=record.start, end=record.end, state=record.state,
            throughput=float(record.throughput), free_cache_tokens=record.free_cache_tokens,
            load=float(record.load), version=self.version, seq=self._seq,
            expires_at=time.time() + self.ttl_s).to_wire()
        return SignedAnnouncement(body=body, signature=self.identity.sign(DOMAIN, body)).to_wire()

    async def publish_record(self, record: NodeAnnouncement) -> None:
        pubsub = self.host.pubsub
        if pubsub is None:
            return
        try:
            await pubsub.publish(topic(self.model_id), self.sign(record))
        except P2PError as exc:
            logger.warning("could not publish announcement: %s", exc)

    async def publish(self, **fields: object) -> None:
        await self.publish_record(NodeAnnouncement(**fields))  # type: ignore[arg-type]

    async def keep_publishing(self, make: Callable[[], NodeAnnouncement],
                              interval_s: float) -> None:
        while True:
            await trio.sleep(interval_s)
            await self.publish_record(make())


class AnnouncementSwarm:
    """The latest verified announcement of every peer serving one model."""

    def __init__(self, model_id: str | None) -> None:
        self.model_id = model_id
        self.records: dict[str, AnnouncementBody] = {}
        self._changed = trio.Event()

    def ingest(self, data: bytes) -> bool:
        """Keep a record if valid, for this model, and newer than the one we hold."""
        body = verify(data)
        if body is None or (self.model_id is not None and body.model_id != self.model_id):
            return False
        key = str(body.peer_id)
        held = self.records.get(key)
        if held is not None and held.seq >= body.seq:
            return False
        self.records[key] = body
        self._changed.set()
        self._changed = trio.Event()
        return True

    def live(self, now: float | None = None) -> list[AnnouncementBody]:
        now = time.time() if now is None else now
        return sorted((r for r in self.records.values() if r.expires_at > now),
                      key=lambda r: str(r.peer_id))

    def snapshots(self) -> list[PeerSnapshot]:
        return [PeerSnapshot(peer_id=str(r.peer_id), model_id=r.model_id, start=r.start,
                             end=r.end, state=PeerState(r.state),
                             throughput_tokens_per_s=r.throughput, load=r.load,
                             free_cache_tokens=r.free_cache_tokens) for r in self.live()]

    def addrs(self, peer_id: str) -> tuple[str, ...]:
        record = self.records.get(peer_id)
        return record.addrs if record is not None else ()

    async def wait_changed(self) -> None:
        with trio.move_on_after(1.0):  # also wake up to notice expiries
            await self._changed.wait()

    @classmethod
    @asynccontextmanager
    async def watch(cls, host: Host, model_id: str | None) -> AsyncIterator[AnnouncementSwarm]:
        """Follow a model's announcements (None: every model's) for the duration of the block."""
        swarm = cls(model_id)
        pubsub = host.pubsub
        if pubsub is None:
            yield swarm
            return
        pubsub.set_validator(topic(model_id), lambda _peer, data: verify(data) is not None)
        async with pubsub.subscribe(topic(model_id)) as sub, trio.open_nursery() as nursery:

            async def pump() -> None:
                async for msg in sub:
                    swarm.ingest(msg.data)

            nursery.start_soon(pump)
            yield swarm
            nursery.cancel_scope.cancel()
