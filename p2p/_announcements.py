"""Signed announcements: who serves which stages of which model, found through DHT and gossip.

Theory of operation
-------------------
A serving node describes itself in an `Announcement` (peer id, addresses, model id, stage span,
state, throughput, free cache tokens, load, software version, sequence number, expiry), encodes
it as one versioned message, and signs those bytes with its identity key under a dedicated
domain (`SignedAnnouncement`). Anyone can check a record against the peer id it names — an
Ed25519 peer id *is* the public key — so records can travel through untrusted peers.

They travel two ways (`Announcer`):
- **gossip**, on one topic for every model, every couple of seconds (well under gossipsub's
  per-forwarder rate limit), so joins, load changes and departures are seen within seconds.
  One topic rather than one per model because bootstrap peers, which serve no model and so
  would never join a per-model mesh, must relay it for peers that only know a bootstrap;
- the **DHT**, under `/shardnet/<model_id>/<peer_id>` with a validator that checks signature,
  key and expiry and keeps the highest sequence, plus a provider record for the model, so a
  newcomer can read the current swarm at once instead of waiting for the next gossip round.

`SwarmView` keeps the latest valid record per peer for one model (or all models, for a
relaying bootstrap): a record with a bad signature, a peer id that does not match its key,
another model, a stale sequence, or an expiry already past (or implausibly far ahead) is
dropped and logged; expired records stop counting without anyone having to say goodbye.
Sequence numbers are wall-clock nanoseconds, so a restarted node's records still win.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from p2p._dht import DhtError
from p2p._errors import P2PError
from p2p._host import Host
from p2p._identity import Identity
from p2p._messages import Message, WireLimits, message
from p2p._peer_id import PeerId

__all__ = [
    "ANNOUNCE_TOPIC",
    "Announcement",
    "AnnouncementState",
    "Announcer",
    "SignedAnnouncement",
    "SwarmView",
    "announcement_key",
    "verify_announcement",
]

logger = logging.getLogger(__name__)

DOMAIN = b"shardnet/announcement/1"
ANNOUNCE_TOPIC = "/shardnet/announce/1"
DHT_NAMESPACE = "shardnet"
MAX_TTL_S = 3600.0  # a record claiming to live longer than this is refused
_MAX_ADDRS = 16


class AnnouncementState(enum.StrEnum):
    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"


@message("shardnet.Announcement", 1)
@dataclass(frozen=True, slots=True)
class Announcement(Message):
    """What a serving node says about itself (signed as bytes in `SignedAnnouncement`)."""

    peer_id: PeerId
    addrs: tuple[str, ...]
    model_id: str
    start: int
    end: int
    state: AnnouncementState
    throughput: float
    free_cache_tokens: int
    load: float
    version: str
    seq: int
    expires_at: float

    def validate(self, limits: WireLimits) -> None:
        if len(self.addrs) > _MAX_ADDRS or any(len(a) > 256 for a in self.addrs):
            raise ValueError("too many or too long addresses")
        if not 0 <= self.start < self.end:
            raise ValueError("span must satisfy 0 <= start < end")
        if self.throughput < 0 or self.free_cache_tokens < 0 or not 0 <= self.load <= 1:
            raise ValueError("throughput, free cache and load must be in range")
        if not 0 < len(self.model_id) <= 128 or len(self.version) > 32 or self.seq < 0:
            raise ValueError("bad model id, version or sequence")


@message("shardnet.SignedAnnouncement", 1)
@dataclass(frozen=True, slots=True)
class SignedAnnouncement(Message):
    body: bytes
    signature: bytes

    def validate(self, limits: WireLimits) -> None:
        if len(self.body) > 8192 or len(self.signature) != 64:
            raise ValueError("announcement body too large or signature malformed")


def announcement_key(model_id: str, peer: PeerId) -> str:
    """The DHT key a peer's announcement for a model lives under."""
    return f"/{DHT_NAMESPACE}/{model_id}/{peer}"


def _provider_key(model_id: str) -> str:
    return f"/{DHT_NAMESPACE}/{model_id}"


def verify_announcement(data: bytes, *, now: float | None = None) -> Announcement:
    """The announcement in `data`, checked; raises `P2PError` naming the problem."""
    signed = SignedAnnouncement.from_wire(data)
    body = Announcement.from_wire(signed.body)
    if not body.peer_id.verify(DOMAIN, signed.body, signed.signature):
        raise P2PError(f"announcement of {body.peer_id.short()} has a bad signature")
    now = time.time() if now is None else now
    if not math.isfinite(body.expires_at) or body.expires_at > now + MAX_TTL_S:
        raise P2PError(f"announcement of {body.peer_id.short()} has an implausible expiry")
    return body


class _DhtValidator:
    """DHT validator for `/shardnet/<model>/<peer>`: signed by that peer, for that model."""

    def validate(self, key: str, value: bytes) -> None:
        parts = key.split("/")
        if len(parts) != 4 or parts[1] != DHT_NAMESPACE:
            raise ValueError(f"not an announcement key: {key[:80]!r}")
        try:
            body = verify_announcement(value)
        except P2PError as exc:
            raise ValueError(str(exc)) from exc
        if body.model_id != parts[2] or str(body.peer_id) != parts[3]:
            raise ValueError("announcement stored under another peer's or model's key")
        if body.expires_at <= time.time():
            raise ValueError("announcement expired")

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_seq = 0, -1
        for i, value in enumerate(values):
            try:
                seq = verify_announcement(value).seq
            except P2PError:
                continue
            if seq > best_seq:
                best, best_seq = i, seq
        return best


@dataclass(frozen=True, slots=True)
class AnnouncementFields:
    """What a node fills in each time it announces (the rest is added when signing)."""

    start: int
    end: int
    state: AnnouncementState
    addrs: tuple[str, ...]
    throughput: float = 0.0
    free_cache_tokens: int = 0
    load: float = 0.0


class Announcer:
    """Signs this node's announcements and publishes them by gossip and in the DHT."""

    def __init__(
        self,
        host: Host,
        identity: Identity,
        *,
        model_id: str,
        version: str,
        ttl_s: float = 10.0,
        dht_every: int = 5,
    ) -> None:
        self.host = host
        self.identity = identity
        self.model_id = model_id
        self.version = version
        self.ttl_s = min(ttl_s, MAX_TTL_S)
        self.dht_every = max(1, dht_every)
        self._seq = time.time_ns()
        self._published = 0
        self._provided = False

    def sign(self, fields: AnnouncementFields) -> bytes:
        """The signed wire bytes of an announcement with the next sequence number."""
        self._seq = max(self._seq + 1, time.time_ns())
        body = Announcement(
            peer_id=self.identity.peer_id,
            addrs=fields.addrs,
            model_id=self.model_id,
            start=fields.start,
            end=fields.end,
            state=fields.state,
            throughput=float(fields.throughput),
            free_cache_tokens=fields.free_cache_tokens,
            load=float(fields.load),
            version=self.version,
            seq=self._seq,
            expires_at=time.time() + self.ttl_s,
        ).to_wire()
        return SignedAnnouncement(body=body, signature=self.identity.sign(DOMAIN, body)).to_wire()

    async def publish(self, fields: AnnouncementFields) -> None:
        """Gossip now; store in the DHT on every `dht_every`-th call (bounded, best effort)."""
        data = self.sign(fields)
        pubsub = self.host.pubsub
        if pubsub is not None:
            try:
                await pubsub.publish(ANNOUNCE_TOPIC, data)
            except P2PError as exc:
                logger.warning("could not gossip our announcement: %s", exc)
        dht = self.host.dht
        if dht is not None and self._published % self.dht_every == 0:
            with trio.move_on_after(5.0):
                try:
                    await dht.put(announcement_key(self.model_id, self.identity.peer_id), data)
                    if not self._provided:
                        await dht.provide(_provider_key(self.model_id))
                        self._provided = True
                except P2PError as exc:
                    logger.info("could not store our announcement in the DHT: %s", exc)
        self._published += 1

    async def keep_publishing(
        self, make: Callable[[], AnnouncementFields], interval_s: float
    ) -> None:
        """Re-announce every `interval_s` seconds (fresh load figures, a new expiry)."""
        while True:
            await trio.sleep(interval_s)
            await self.publish(make())


class SwarmView:
    """The latest valid announcement of every peer serving one model (None: every model)."""

    def __init__(self, model_id: str | None) -> None:
        self.model_id = model_id
        self.records: dict[PeerId, Announcement] = {}
        self._changed = trio.Event()

    def ingest(self, data: bytes, *, source: str = "?") -> Announcement | None:
        """Keep a record if it is valid, for our model and newer than the one we hold."""
        try:
            body = verify_announcement(data)
        except P2PError as exc:
            logger.info("dropped an announcement from %s: %s", source, exc)
            return None
        if self.model_id is not None and body.model_id != self.model_id:
            return None
        held = self.records.get(body.peer_id)
        if held is not None and held.seq >= body.seq:
            return None
        self.records[body.peer_id] = body
        self._changed.set()
        self._changed = trio.Event()
        return body

    def live(self, now: float | None = None) -> list[Announcement]:
        """Unexpired records, one per peer, sorted by peer id."""
        now = time.time() if now is None else now
        return sorted(
            (r for r in self.records.values() if r.expires_at > now), key=lambda r: r.peer_id
        )

    def addrs(self, peer: PeerId) -> tuple[str, ...]:
        record = self.records.get(peer)
        return record.addrs if record is not None else ()

    async def wait_changed(self, timeout_s: float = 1.0) -> None:
        """Return when a record arrives, or after `timeout_s` (to notice expiries)."""
        with trio.move_on_after(timeout_s):
            await self._changed.wait()

    async def _from_dht(self, host: Host, every_s: float) -> None:
        dht = host.dht
        if dht is None or self.model_id is None:
            return
        while True:
            with trio.move_on_after(10.0):
                try:
                    for peer in await dht.find_providers(_provider_key(self.model_id)):
                        value = await dht.get(announcement_key(self.model_id, peer))
                        if value is not None:
                            self.ingest(value, source="dht")
                except (DhtError, P2PError) as exc:
                    logger.debug("DHT read of the swarm failed: %s", exc)
            await trio.sleep(every_s)

    @classmethod
    @asynccontextmanager
    async def watch(
        cls, host: Host, model_id: str | None, *, dht_every_s: float = 15.0
    ) -> AsyncIterator[SwarmView]:
        """Follow announcements (gossip and DHT) for the duration of the block."""
        view = cls(model_id)
        dht = host.dht
        if dht is not None:
            dht.register_validator(DHT_NAMESPACE, _DhtValidator())
        pubsub = host.pubsub
        if pubsub is None:
            yield view
            return

        def valid(_forwarder: PeerId | None, data: bytes) -> bool:
            try:
                verify_announcement(data)
            except P2PError:
                return False
            return True

        pubsub.set_validator(ANNOUNCE_TOPIC, valid)
        async with pubsub.subscribe(ANNOUNCE_TOPIC) as sub, trio.open_nursery() as nursery:

            async def pump() -> None:
                async for msg in sub:
                    origin = msg.origin.short() if msg.origin is not None else "?"
                    view.ingest(msg.data, source=f"gossip via {origin}")

            nursery.start_soon(pump)
            nursery.start_soon(view._from_dht, host, dht_every_s)
            yield view
            nursery.cancel_scope.cancel()
