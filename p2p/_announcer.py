"""Publishing announcements and watching a model's swarm (the trio services).

Theory of operation
-------------------
**Announcer** (:func:`open_announcer`): a serving node's announcement is re-signed with
a fresh ``seq`` and expiry and gossiped on the model's topic every
``refresh_interval``, and at once (at most every ``min_interval``) whenever
:meth:`Announcer.update` changes it. With a DHT, the same signed bytes are also stored
under ``/shardnet/ann/<model>/<peer>`` and the node provides ``/shardnet/model/<model>``,
at most once per refresh, in a background task so a slow DHT never delays gossip.
Leaving the block announces ``draining`` with a short expiry, then stops refreshing:
peers see the node leave at once and forget it when that record expires. A node that
crashes simply stops refreshing and ages out after ``ttl``.

Rates: a gossipsub forwarder relays every node's announcements, and py-libp2p drops
messages above its per-topic limit silently. Each node publishes about
``1/refresh_interval`` messages per second, plus bursts bounded by ``min_interval``;
the host raises the limit (:class:`~p2p.GossipConfig`) well above what a swarm of a
few hundred nodes produces at the defaults.

**Watcher** (:func:`open_swarm_view`): subscribes to the topic with a validator (a
forged, expired or malformed record is dropped at the first honest hop and logged
with the forwarder's id), feeds verified records into a :class:`SwarmView`, seeds it
from the DHT when one is running, prunes records as they expire, and wakes
:meth:`LiveSwarm.wait_changed` callers on every change.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import trio

from p2p._announce import (
    ANNOUNCE_NAMESPACE,
    Announcement,
    AnnouncementRecordValidator,
    AnnounceState,
    announce_key,
    announce_topic,
    model_key,
    next_seq,
    sign_announcement,
    verify_announcement,
)
from p2p._dht import DhtError
from p2p._errors import LocalProtocolError, RemoteProtocolError
from p2p._host import Host
from p2p._peer_id import PeerId
from p2p._pubsub import TopicValidator
from p2p._service import service_nursery
from p2p._swarm_view import SwarmView

__all__ = [
    "AnnounceConfig",
    "Announcer",
    "LiveSwarm",
    "ServingInfo",
    "open_announcer",
    "open_swarm_view",
    "announcement_validator",
]

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
SOFTWARE_VERSION = "shardnet-0.1.0"


@dataclass(frozen=True, slots=True)
class ServingInfo:
    """The part of an announcement the node layer controls."""

    model_id: str
    span_start: int
    span_end: int
    state: AnnounceState = AnnounceState.JOINING
    compute_tps: float = 0.0
    network_tps: float = 0.0
    free_cache_tokens: int = 0
    load: float = 0.0
    version: str = SOFTWARE_VERSION


@dataclass(frozen=True, slots=True)
class AnnounceConfig:
    """Announcement timing.

    Attributes:
        ttl: seconds each published record stays valid.
        refresh_interval: seconds between re-publications (well under ``ttl``).
        min_interval: least seconds between two publications (coalesces updates).
        leave_grace: expiry of the final ``draining`` record when leaving.
        dht_timeout: bound on one DHT store or lookup.
        dht_refresh: seconds between DHT lookups by a watcher.
    """

    ttl: float = 60.0
    refresh_interval: float = 15.0
    min_interval: float = 0.5
    leave_grace: float = 5.0
    dht_timeout: float = 30.0
    dht_refresh: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.min_interval <= self.refresh_interval < self.ttl:
            raise ValueError("need 0 < min_interval <= refresh_interval < ttl")


def announcement_validator(model_id: str, clock: Clock = time.time) -> TopicValidator:
    """The gossip validator for ``model_id``'s topic (drops and logs bad records)."""

    def validate(forwarder: PeerId | None, data: bytes) -> bool:
        source = None if forwarder is None else str(forwarder)
        try:
            announcement = verify_announcement(data, now=clock(), source=source)
        except RemoteProtocolError as exc:
            logger.info("dropped announcement forwarded by %s: %s", source, exc)
            return False
        if announcement.model_id != model_id:
            logger.info("dropped announcement for another model from %s", source)
            return False
        return True

    return validate


def _register_dht_validator(host: Host, clock: Clock) -> None:
    if host.dht is not None:
        host.dht.register_validator(ANNOUNCE_NAMESPACE, AnnouncementRecordValidator(clock))


class Announcer:
    """Keeps this node's announcement fresh. Obtain one from :func:`open_announcer`."""

    def __init__(self, host: Host, info: ServingInfo, config: AnnounceConfig, clock: Clock) -> None:
        self._host = host
        self._info = info
        self._config = config
        self._clock = clock
        self._topic = announce_topic(info.model_id)
        self._dirty = trio.Event()
        self._current: Announcement | None = None
        self._left = False
        self._dht_busy = False
        self._last_dht = -math.inf
        self.published = 0

    @property
    def info(self) -> ServingInfo:
        """What is being announced."""
        return self._info

    @property
    def current(self) -> Announcement | None:
        """The last published announcement."""
        return self._current

    def update(self, info: ServingInfo) -> None:
        """Announce new serving info soon (within ``min_interval``).

        Raises:
            LocalProtocolError: the model changed (open another announcer instead).
        """
        if info.model_id != self._info.model_id:
            raise LocalProtocolError("an announcer serves one model; open another")
        self._info = info
        self._dirty.set()

    def _build(self, info: ServingInfo, ttl: float) -> Announcement:
        previous = -1 if self._current is None else self._current.seq
        return Announcement(
            peer=self._host.peer_id,
            addrs=self._host.listen_addrs()[:16],
            model_id=info.model_id,
            span_start=info.span_start,
            span_end=info.span_end,
            state=info.state,
            compute_tps=info.compute_tps,
            network_tps=info.network_tps,
            free_cache_tokens=info.free_cache_tokens,
            load=info.load,
            version=info.version,
            seq=next_seq(previous),
            expires_at=self._clock() + ttl,
        )

    async def _publish(self, announcement: Announcement, nursery: trio.Nursery | None) -> bytes:
        data = sign_announcement(self._host.identity, announcement)
        self._current = announcement
        if self._host.pubsub is not None:
            await self._host.pubsub.publish(self._topic, data)
        self.published += 1
        due = self._clock() >= self._last_dht + self._config.refresh_interval
        if nursery is not None and self._host.dht is not None and due and not self._dht_busy:
            self._dht_busy = True
            self._last_dht = self._clock()
            nursery.start_soon(self._store_in_dht, announcement, data)
        return data

    async def _store_in_dht(self, announcement: Announcement, data: bytes) -> None:
        dht = self._host.dht
        try:
            if dht is None:
                return
            with trio.move_on_after(self._config.dht_timeout):
                await dht.put(announce_key(announcement.model_id, announcement.peer), data)
                await dht.provide(model_key(announcement.model_id))
        except (DhtError, LocalProtocolError) as exc:
            logger.info("DHT publication of our announcement failed: %s", exc)
        finally:
            self._dht_busy = False

    async def serve(self, nursery: trio.Nursery) -> None:
        """Publish now, then on every update and refresh, until cancelled."""
        cfg = self._config
        while not self._left:
            self._dirty = trio.Event()
            await self._publish(self._build(self._info, cfg.ttl), nursery)
            with trio.move_on_after(cfg.refresh_interval):
                await self._dirty.wait()
            await trio.sleep(cfg.min_interval)

    async def leave(self) -> None:
        """Announce ``draining`` with a short expiry and stop refreshing."""
        if self._left:
            return
        self._left = True
        info = replace(self._info, state=AnnounceState.DRAINING)
        await self._publish(self._build(info, self._config.leave_grace), None)


@asynccontextmanager
async def open_announcer(
    host: Host,
    info: ServingInfo,
    *,
    config: AnnounceConfig | None = None,
    clock: Clock = time.time,
) -> AsyncIterator[Announcer]:
    """Announce ``info`` for the duration of the block (leaving announces draining)."""
    announcer = Announcer(host, info, config or AnnounceConfig(), clock)
    if host.pubsub is not None:
        host.pubsub.set_validator(announcer._topic, announcement_validator(info.model_id, clock))
    _register_dht_validator(host, clock)
    async with service_nursery() as nursery:
        nursery.start_soon(announcer.serve, nursery)
        try:
            yield announcer
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                await announcer.leave()


@dataclass(slots=True)
class SwarmStatistics:
    """Counters of a watcher."""

    accepted: int = 0
    ignored: int = 0
    rejected: int = 0
    dht_found: int = 0
    last_change: float = field(default=0.0)


class LiveSwarm:
    """A :class:`SwarmView` kept current by gossip and the DHT."""

    def __init__(self, model_id: str, clock: Clock) -> None:
        self.view = SwarmView(model_id)
        self.model_id = model_id
        self._clock = clock
        self._changed = trio.Event()
        self._accepted_at: dict[PeerId, float] = {}
        self.stats = SwarmStatistics()

    def live(self, *, include_draining: bool = True) -> tuple[Announcement, ...]:
        """Current unexpired announcements, one per peer, sorted by peer id."""
        return self.view.live(self._clock(), include_draining=include_draining)

    def get(self, peer: PeerId) -> Announcement | None:
        """The live announcement of ``peer``, if any."""
        return self.view.get(peer, self._clock())

    def accepted_at(self, peer: PeerId) -> float | None:
        """When (clock time) the current record of ``peer`` was accepted here."""
        return self._accepted_at.get(peer)

    async def wait_changed(self) -> None:
        """Return after the next change (a record added, replaced or expired)."""
        await self._changed.wait()

    def _notify(self) -> None:
        self.stats.last_change = self._clock()
        self._changed.set()
        self._changed = trio.Event()

    def offer_bytes(self, data: bytes, source: str | None) -> bool:
        """Verify and offer signed announcement bytes; True if the view changed."""
        try:
            announcement = verify_announcement(data, now=self._clock(), source=source)
        except RemoteProtocolError as exc:
            self.stats.rejected += 1
            logger.info("ignored announcement from %s: %s", source, exc)
            return False
        if self.view.offer(announcement, self._clock()):
            self._accepted_at[announcement.peer] = self._clock()
            self.stats.accepted += 1
            self._notify()
            return True
        self.stats.ignored += 1
        return False

    async def _pump(self, host: Host) -> None:
        pubsub = host.pubsub
        if pubsub is None:
            return
        async with pubsub.subscribe(announce_topic(self.model_id)) as subscription:
            async for msg in subscription:
                self.offer_bytes(msg.data, None if msg.origin is None else str(msg.origin))

    async def _expire(self) -> None:
        while True:
            nxt = self.view.next_expiry()
            if nxt is None:
                await self.wait_changed()
                continue
            with trio.move_on_after(max(0.0, nxt - self._clock()) + 0.01):
                await self.wait_changed()
            gone = self.view.expire(self._clock())
            for peer in gone:
                self._accepted_at.pop(peer, None)
            if gone:
                self._notify()

    async def _dht_sync(self, host: Host, config: AnnounceConfig) -> None:
        dht = host.dht
        if dht is None:
            return
        while True:
            with trio.move_on_after(config.dht_timeout):
                try:
                    for peer in await dht.find_providers(model_key(self.model_id)):
                        value = await dht.get(announce_key(self.model_id, peer))
                        if value is not None and self.offer_bytes(value, "dht"):
                            self.stats.dht_found += 1
                except DhtError as exc:
                    logger.info("DHT lookup for %s failed: %s", self.model_id, exc)
            await trio.sleep(config.dht_refresh)


@asynccontextmanager
async def open_swarm_view(
    host: Host,
    model_id: str,
    *,
    config: AnnounceConfig | None = None,
    clock: Clock = time.time,
) -> AsyncIterator[LiveSwarm]:
    """Track ``model_id``'s serving nodes for the duration of the block."""
    cfg = config or AnnounceConfig()
    swarm = LiveSwarm(model_id, clock)
    if host.pubsub is not None:
        host.pubsub.set_validator(announce_topic(model_id), announcement_validator(model_id, clock))
    _register_dht_validator(host, clock)
    async with service_nursery() as nursery:
        nursery.start_soon(swarm._pump, host)
        nursery.start_soon(swarm._expire)
        nursery.start_soon(swarm._dht_sync, host, cfg)
        yield swarm
