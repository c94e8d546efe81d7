"""Signed announcements: who serves which stages of which model, found through DHT and gossip.

Theory of operation
-------------------
A serving node describes itself in an `Announcement` (peer id, addresses, model id, stage span
``[start, end)``, state, throughput, free cache tokens, load, software version, sequence number,
expiry), encodes it as one versioned message, and signs those bytes with its identity key under a
dedicated domain (`SignedAnnouncement`). Anyone can check a record against the peer id it names
-- an Ed25519 peer id *is* the public key -- so records can travel through untrusted peers.

They travel two ways (`Announcer`):

- **gossip**, on one topic for every model (`ANNOUNCE_TOPIC`), re-published every few seconds
  (`Announcer.keep_publishing`), well under the host's gossipsub rate limit, so joins, load
  changes and departures are seen within seconds. One topic rather than one per model because
  bootstrap peers, which serve no model and so would never join a per-model mesh, must relay
  it for peers that only know a bootstrap; views filter by model;
- the **DHT**, under ``/shardnet/<digest of model id and peer id>`` with a strict validator
  that checks signature, key and expiry and keeps the highest sequence, plus a provider record
  for the model, so a newcomer can read the current swarm at once instead of waiting for
  gossip. Keys are digests because py-libp2p 0.8.1's servers ignore a FIND_NODE whose key is
  longer than 50 bytes and is not a multihash, and its own puts, gets and provides look up the
  closest peers with FIND_NODE on the record key: ``/shardnet/<model_id>/<peer_id>`` (127
  bytes) failed every remote lookup, and stores fell back to the local routing table.
  A DHT store can take seconds (it waits on the closest peers), so while the announcer
  runs (`Announcer.running`, which `keep_publishing` enters) stores happen in a task of
  its own: `publish` gossips and hands the record over, latest wins. Outside it a
  store is done inline, bounded, as a plain `publish` call always did.

`SwarmView` keeps the latest valid record per peer for one model (or all models, for a
relaying bootstrap). A record with a bad signature, a peer id that does not match its key,
another model, a stale sequence, or an expiry already past (or implausibly far ahead) is
dropped -- by the gossip validator before it is forwarded, so a forgery stops at the first
honest hop -- and logged with the peer it came from. A node that leaves announces
``draining`` and stops refreshing; a node that crashes just stops refreshing; either way its
record expires and drops out of every view. Sequence numbers are wall-clock nanoseconds, so
a restarted node's records still win.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import trio

from p2p._dht import DhtError
from p2p._errors import P2PError, RemoteProtocolError
from p2p._host import Host
from p2p._identity import Identity
from p2p._messages import Message, WireLimits, message
from p2p._peer_id import PeerId
from p2p._pubsub import Subscription
from p2p._service import service_nursery

__all__ = [
    "ANNOUNCE_DOMAIN",
    "ANNOUNCE_TOPIC",
    "MAX_ANNOUNCE_TTL",
    "Announcement",
    "AnnouncementFields",
    "AnnouncementState",
    "Announcer",
    "SignedAnnouncement",
    "SwarmView",
    "announcement_key",
    "verify_announcement",
]

logger = logging.getLogger(__name__)

ANNOUNCE_DOMAIN = DOMAIN = b"shardnet/announcement/1"
ANNOUNCE_TOPIC = "/shardnet/announce/1"
DHT_NAMESPACE = "shardnet"
MAX_ANNOUNCE_TTL = MAX_TTL_S = 3600.0  # a record claiming to live longer than this is refused
MAX_SIGNED_BYTES = 8192
# Recently expired records are still relayed and still supersede older ones (see
# `verify_announcement`); older than this they are dropped.
SUPERSEDE_GRACE_S = 30.0
# How long one DHT store of our record may take before it is given up.
DHT_STORE_TIMEOUT = 5.0
ANNOUNCE_LIMITS = WireLimits(max_frame_bytes=2 * MAX_SIGNED_BYTES, max_collection_len=64)
_MAX_ADDRS = 16
_MAX_THROUGHPUT = 1e12  # tokens/s: far above any real span, and finite
# Model ids are manifest hashes; the charset keeps DHT keys unambiguous ("/" separates parts).
_MODEL_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

Clock = Callable[[], float]


class AnnouncementState(enum.StrEnum):
    """Lifecycle of a serving node."""

    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"


@message("shardnet.Announcement", 1)
@dataclass(frozen=True, slots=True)
class Announcement(Message):
    """What a serving node says about itself (signed as bytes in `SignedAnnouncement`).

    Attributes:
        peer_id: the announcing node (its key is the signing key).
        addrs: multiaddrs ending in ``/p2p/<peer_id>`` where it can be dialed.
        model_id: the model manifest hash.
        start: first stage served; ``end``: the stage after the last one served.
        state: joining / online / draining.
        throughput: tokens per second through its span (its own estimate).
        free_cache_tokens: KV-cache tokens it can still accept.
        load: queue utilization in [0, 1].
        version: software version.
        seq: sequence number; a higher one replaces a lower one.
        expires_at: unix time after which the record is void.
    """

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
        # Written so NaN fails too: a NaN or infinite throughput once reached every client's
        # routing and broke it for the whole swarm.
        if not 0 <= self.throughput <= _MAX_THROUGHPUT or self.free_cache_tokens < 0 \
                or not 0 <= self.load <= 1:
            raise ValueError("throughput, free cache and load must be in range")
        if not _MODEL_ID.fullmatch(self.model_id) or len(self.version) > 32 or self.seq < 0:
            raise ValueError("bad model id, version or sequence")


@message("shardnet.SignedAnnouncement", 1)
@dataclass(frozen=True, slots=True)
class SignedAnnouncement(Message):
    """An announcement's exact wire bytes and its peer's signature over them."""

    body: bytes
    signature: bytes

    def validate(self, limits: WireLimits) -> None:
        if len(self.body) > MAX_SIGNED_BYTES or len(self.signature) != 64:
            raise ValueError("announcement body too large or signature malformed")


def _dht_key(kind: str, *parts: str) -> str:
    """``/shardnet/`` and 32 base32 characters: 42 bytes, within py-libp2p's 50 for FIND_NODE."""
    digest = hashlib.blake2b("/".join((kind, *parts)).encode(), digest_size=20).digest()
    return f"/{DHT_NAMESPACE}/{base64.b32encode(digest).decode().lower()}"


def announcement_key(model_id: str, peer: PeerId) -> str:
    """The DHT key a peer's announcement for a model lives under."""
    return _dht_key("announcement", model_id, str(peer))


def _provider_key(model_id: str) -> str:
    return _dht_key("providers", model_id)


def verify_announcement(
    data: bytes,
    *,
    now: float | None = None,
    source: str | None = None,
    expired_grace: float = 0.0,
) -> Announcement:
    """The announcement in ``data``, checked.

    Args:
        data: the signed announcement bytes.
        now: unix time (default: the clock).
        source: where the bytes came from, for error messages.
        expired_grace: also accept records that expired less than this long ago (gossip
            relays them so that a short-lived ``draining`` record still supersedes the
            older one everywhere even if it expired in transit; views never list them).

    Raises:
        RemoteProtocolError: malformed, a bad signature (signed by someone other than the
            peer it names), expired, or an implausibly distant expiry. The message names
            the peer and ``source``.
    """
    if len(data) > 2 * MAX_SIGNED_BYTES:
        raise RemoteProtocolError("announcement too large", peer=source)
    signed = SignedAnnouncement.from_wire(data, ANNOUNCE_LIMITS)
    body = Announcement.from_wire(signed.body, ANNOUNCE_LIMITS)
    who = body.peer_id.short()
    if not body.peer_id.verify(DOMAIN, signed.body, signed.signature):
        raise RemoteProtocolError(f"announcement of {who} has a bad signature", peer=source)
    now = time.time() if now is None else now
    if not math.isfinite(body.expires_at) or body.expires_at > now + MAX_TTL_S:
        raise RemoteProtocolError(f"announcement of {who} has an implausible expiry", peer=source)
    if body.expires_at <= now - expired_grace:
        raise RemoteProtocolError(f"announcement of {who} expired", peer=source)
    return body


class _DhtValidator:
    """DHT validator for announcement keys: signed by the peer, for the model, the key names."""

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock

    def validate(self, key: str, value: bytes) -> None:
        if not key.startswith(f"/{DHT_NAMESPACE}/"):
            raise ValueError(f"not an announcement key: {key[:80]!r}")
        try:
            body = verify_announcement(value, now=self._clock(), source="dht")
        except RemoteProtocolError as exc:
            raise ValueError(str(exc)) from exc
        if key != announcement_key(body.model_id, body.peer_id):
            raise ValueError("announcement stored under another peer's or model's key")

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_seq = 0, -1
        now = self._clock()
        for i, value in enumerate(values):
            try:
                seq = verify_announcement(value, now=now).seq
            except RemoteProtocolError:
                continue
            if seq > best_seq:
                best, best_seq = i, seq
        return best


class _RecordValidator:
    """Adapts `_DhtValidator` to the host's typed DHT interface (RemoteProtocolError)."""

    def __init__(self) -> None:
        self._inner = _DhtValidator()

    def validate(self, key: str, value: bytes) -> None:
        try:
            self._inner.validate(key, value)
        except ValueError as exc:
            raise RemoteProtocolError(str(exc)) from exc

    def select(self, key: str, values: list[bytes]) -> int:
        return self._inner.select(key, values)


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
    """Signs this node's announcements and publishes them by gossip and in the DHT.

    Args:
        host: the running host (its pubsub and DHT, when enabled, carry the records).
        identity: the node key; must be the host's identity.
        model_id: the model served.
        version: software version announced.
        ttl_s: lifetime of each record; re-publish well before it runs out.
        dht_every: store in the DHT on every n-th publication (the DHT is slow). While
            :meth:`running`, a record is also stored when its state changed or when the
            stored one is half way through its lifetime, so the DHT never holds a stale
            state or an expired record while the node keeps publishing.
    """

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
        self.last: Announcement | None = None
        # The background DHT writer (see `running`): the latest record it should store.
        self._writer_running = False
        self._dht_pending: tuple[bytes, AnnouncementState] | None = None
        self._dht_wakeup = trio.Event()
        self._stored_state: AnnouncementState | None = None
        self._stored_at = -math.inf  # trio clock
        self.dht_stores = 0
        self.dht_failures = 0

    def sign(self, fields: AnnouncementFields, *, ttl_s: float | None = None) -> bytes:
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
            expires_at=time.time() + (self.ttl_s if ttl_s is None else ttl_s),
        )
        self.last = body
        wire = body.to_wire(ANNOUNCE_LIMITS)
        signed = SignedAnnouncement(body=wire, signature=self.identity.sign(DOMAIN, wire))
        return signed.to_wire(ANNOUNCE_LIMITS)

    async def publish(self, fields: AnnouncementFields, *, ttl_s: float | None = None) -> None:
        """Gossip now; store in the DHT on every ``dht_every``-th call (bounded, best effort).

        While :meth:`running`, the DHT store is handed to the announcer's own task and
        this returns as soon as the record is gossiped.

        Args:
            fields: what to announce.
            ttl_s: lifetime of this record (default: the announcer's); a leaving node
                announces ``draining`` with a short one.
        """
        data = self.sign(fields, ttl_s=ttl_s)
        pubsub = self.host.pubsub
        if pubsub is not None:
            try:
                await pubsub.publish(ANNOUNCE_TOPIC, data)
            except P2PError as exc:
                logger.warning("could not gossip our announcement: %s", exc)
        if self.host.dht is not None:
            counted = self._published % self.dht_every == 0
            if self._writer_running:
                stale = trio.current_time() - self._stored_at >= self.ttl_s / 2
                if counted or stale or fields.state is not self._stored_state:
                    self._dht_pending = (data, fields.state)
                    self._dht_wakeup.set()
            elif counted:
                await self._store(data, fields.state)
        self._published += 1

    async def keep_publishing(
        self, make: Callable[[], AnnouncementFields], interval_s: float
    ) -> None:
        """Re-announce every ``interval_s`` seconds (fresh load figures, a new expiry).

        Runs the announcer (:meth:`running`) meanwhile, so DHT stores never delay it.
        """
        async with self.running():
            while True:
                await trio.sleep(interval_s)
                await self.publish(make())

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Announcer]:
        """Store records in the DHT from the announcer's own task during the block.

        Re-entrant: an inner ``running`` (say ``keep_publishing`` inside an outer one)
        uses the outer task. A store still in flight when the block ends is cancelled.
        """
        if self._writer_running:
            yield self
            return
        async with service_nursery() as nursery:
            self._writer_running = True
            try:
                nursery.start_soon(self._dht_writer)
                yield self
            finally:
                self._writer_running = False

    async def _dht_writer(self) -> None:
        while True:
            await self._dht_wakeup.wait()
            self._dht_wakeup = trio.Event()
            pending, self._dht_pending = self._dht_pending, None
            if pending is not None:
                await self._store(*pending)

    async def _store(self, data: bytes, state: AnnouncementState) -> None:
        """Put ``data`` in the DHT (and provide the model once), within DHT_STORE_TIMEOUT."""
        dht = self.host.dht
        if dht is None:
            return
        dht.register_validator(DHT_NAMESPACE, _RecordValidator())
        with trio.move_on_after(DHT_STORE_TIMEOUT):
            try:
                await dht.put(announcement_key(self.model_id, self.identity.peer_id), data)
                self._stored_state = state
                self._stored_at = trio.current_time()
                self.dht_stores += 1
                if not self._provided:
                    await dht.provide(_provider_key(self.model_id))
                    self._provided = True
                return
            except P2PError as exc:
                logger.info("could not store our announcement in the DHT: %s", exc)
        self.dht_failures += 1


class SwarmView:
    """The latest valid announcement of every peer serving one model (None: every model)."""

    def __init__(self, model_id: str | None, *, clock: Clock = time.time) -> None:
        self.model_id = model_id
        self.records: dict[PeerId, Announcement] = {}
        self._accepted_at: dict[PeerId, float] = {}
        self._clock = clock
        self._changed = trio.Event()
        self.accepted = 0
        self.dropped = 0

    def ingest(self, data: bytes, *, source: str = "?") -> Announcement | None:
        """Keep a record if it is valid, for our model and newer than the one we hold.

        A valid record that has *just* expired (a short ``draining`` record delayed in
        transit) is not kept, but still evicts the older record it supersedes.
        """
        now = self._clock()
        try:
            body = verify_announcement(
                data, now=now, source=source, expired_grace=SUPERSEDE_GRACE_S
            )
        except RemoteProtocolError as exc:
            self.dropped += 1
            logger.info("dropped an announcement from %s: %s", source, exc)
            return None
        if self.model_id is not None and body.model_id != self.model_id:
            return None
        held = self.records.get(body.peer_id)
        if held is not None and held.seq >= body.seq:
            return None
        if body.expires_at <= now:
            if held is not None:
                del self.records[body.peer_id]
                self._accepted_at.pop(body.peer_id, None)
                self._notify()
            return None
        self.records[body.peer_id] = body
        self._accepted_at[body.peer_id] = now
        self.accepted += 1
        self._notify()
        return body

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def live(self, now: float | None = None) -> list[Announcement]:
        """Unexpired records, one per peer, sorted by peer id (expired ones are forgotten)."""
        now = self._clock() if now is None else now
        for peer in [p for p, r in self.records.items() if r.expires_at <= now]:
            del self.records[peer]
            self._accepted_at.pop(peer, None)
        return sorted(self.records.values(), key=lambda r: r.peer_id)

    def get(self, peer: PeerId) -> Announcement | None:
        """The unexpired record of ``peer``, if any."""
        record = self.records.get(peer)
        if record is None or record.expires_at <= self._clock():
            return None
        return record

    def addrs(self, peer: PeerId) -> tuple[str, ...]:
        """The announced addresses of ``peer`` (empty if unknown)."""
        record = self.records.get(peer)
        return record.addrs if record is not None else ()

    def accepted_at(self, peer: PeerId) -> float | None:
        """When (clock time) the record we hold for ``peer`` was accepted here."""
        return self._accepted_at.get(peer)

    async def wait_changed(self, timeout_s: float = 1.0) -> None:
        """Return when a record arrives, or after ``timeout_s`` (to notice expiries)."""
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
        """Follow announcements (gossip and DHT) for the duration of the block.

        The host also *validates and relays* announcements while this runs (with
        ``model_id=None`` a bootstrap relays every model's).
        """
        view = cls(model_id)
        if host.dht is not None:
            host.dht.register_validator(DHT_NAMESPACE, _RecordValidator())
        pubsub = host.pubsub

        def valid(forwarder: PeerId | None, data: bytes) -> bool:
            source = "?" if forwarder is None else str(forwarder)
            try:
                verify_announcement(data, source=source, expired_grace=SUPERSEDE_GRACE_S)
            except RemoteProtocolError as exc:
                logger.info("refused to relay an announcement from %s: %s", source, exc)
                return False
            return True

        async def pump(sub: Subscription) -> None:
            async for msg in sub:
                view.ingest(msg.data, source=str(msg.origin) if msg.origin is not None else "?")

        async with AsyncExitStack() as stack:
            sub: Subscription | None = None
            if pubsub is not None:
                pubsub.set_validator(ANNOUNCE_TOPIC, valid)
                sub = await stack.enter_async_context(pubsub.subscribe(ANNOUNCE_TOPIC))
            # Entered last, so its tasks stop before the subscription is dropped.
            nursery = await stack.enter_async_context(service_nursery())
            if sub is not None:
                nursery.start_soon(pump, sub)
            nursery.start_soon(view._from_dht, host, dht_every_s)
            yield view
