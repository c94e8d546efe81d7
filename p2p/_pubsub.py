"""A typed adapter over py-libp2p's gossipsub, tuned so it does not drop our traffic.

What bites, measured on 0.8.1 (see shared/notes/libp2p.md), and what we do:

* The default heartbeat is 120 s, so mesh repair and gossip (IHAVE) are glacial: we use
  1 s (:attr:`GossipConfig.heartbeat_interval`).
* Spam protection silently drops more than ~10 messages/s per topic *per forwarder*; a
  forwarder relays everyone's messages, so 20 nodes refreshing once a second already
  exceed it. We raise the per-topic limit (:attr:`GossipConfig.max_messages_per_topic_per_second`)
  and publishers keep their own rate low.
* Messages over 1 MiB never arrive: :meth:`PubSub.publish` refuses anything over
  :attr:`GossipConfig.max_message_bytes` (64 KiB by default) with a LocalProtocolError.
* Its "GRAFT flood" check penalises and prunes legitimate re-grafts, which emptied
  meshes on a star topology; it is disabled (see :class:`_GossipSub`). Peer exchange on
  PRUNE is on, and eclipse protection (IP diversity) is off: on a LAN or loopback every
  peer shares a few addresses.

Topic validators are plain typed callables ``(forwarder, data) -> bool`` run before a
message is delivered *or forwarded*, so a rejected message (a forged announcement)
stops at the first honest hop.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
from google.protobuf.message import DecodeError
from libp2p.abc import INetStream, ISubscriptionAPI
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service.exceptions import LifecycleError

from p2p._errors import LocalProtocolError
from p2p._peer_id import InvalidPeerIdError, PeerId

__all__ = ["GossipConfig", "GossipMessage", "PubSub", "Subscription", "TopicValidator"]

logger = logging.getLogger(__name__)

TopicValidator = Callable[[PeerId | None, bytes], bool]
"""``(forwarder, data) -> accept?``; must not raise."""


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Gossipsub tuning.

    Attributes:
        heartbeat_interval: seconds between mesh maintenance rounds (libp2p wants int).
        degree: target mesh degree D; degree_low/degree_high bound it.
        max_messages_per_topic_per_second: per-forwarder spam limit per topic.
        max_message_bytes: largest payload we publish or accept.
    """

    heartbeat_interval: int = 1
    degree: int = 6
    degree_low: int = 4
    degree_high: int = 12
    max_messages_per_topic_per_second: float = 200.0
    max_message_bytes: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class GossipMessage:
    """A delivered pubsub message.

    Attributes:
        topic: the topic it arrived on.
        data: the payload (already accepted by the topic validator).
        origin: the peer that published it (libp2p-signed), if parseable.
    """

    topic: str
    data: bytes
    origin: PeerId | None


def _peer(raw: bytes) -> PeerId | None:
    try:
        return PeerId.from_bytes(raw)
    except InvalidPeerIdError:
        return None


class _GossipSub(GossipSub):
    """GossipSub without py-libp2p 0.8.1's "GRAFT flood" check.

    That check stamps the time a peer sent *us* a PRUNE and then treats the same
    peer's GRAFT within 10 s as a flood (penalty + PRUNE). A peer that pruned us and
    later needs mesh peers is doing nothing wrong; on a star topology the check made
    meshes thrash to zero members and announcements stopped propagating.
    """

    def _check_graft_flood_protection(self, peer_id: ID, topic: str) -> bool:
        return True

    def _get_in_topic_gossipsub_peers_from_minus(
        self, topic: str, num_to_select: int, minus: Iterable[ID], backoff_check: bool = False
    ) -> list[ID]:
        # py-libp2p 0.8.1 indexes pubsub.peer_topics[topic] unguarded here. The entry is gone
        # once no known peer subscribes, and the whole table is cleared when the pubsub
        # service stops while connections still deliver RPCs; a GRAFT then is answered with
        # a PRUNE carrying peer exchange (do_px), and the KeyError tore down the host.
        if self.pubsub is not None and topic not in self.pubsub.peer_topics:
            return []
        return super()._get_in_topic_gossipsub_peers_from_minus(
            topic, num_to_select, minus, backoff_check
        )


class SafePubsub(Pubsub):
    """Pubsub whose stream reader survives a peer's undecodable RPC and our own shutdown.

    py-libp2p 0.8.1 lets ``DecodeError`` escape ``continuously_read_stream``; it ends the
    connection's task group and with it the whole host: one garbled or hostile message
    killed a node. Here it costs that peer's pubsub stream only.

    The reader is a task of the *connection*, not of the pubsub service, so it keeps
    reading while the service stops. A subscription or message arriving after the
    service's task nursery has closed, but before the service reports itself finished,
    makes ``manager.run_task`` raise ("Nursery is closed to new arrivals"), and that too
    tore down the host on its way out (a CI failure, at a client's close). Once the
    service is cancelled the stream is simply closed.
    """

    async def continuously_read_stream(self, stream: INetStream) -> None:
        try:
            await super().continuously_read_stream(stream)
        except DecodeError as exc:
            logger.warning("pubsub: undecodable RPC from %s, stream reset: %s",
                           stream.muxed_conn.peer_id, exc)
            await stream.reset()
        except (RuntimeError, LifecycleError):
            if not self.manager.is_cancelled:
                raise
            logger.debug("pubsub: stopped; stream from %s dropped", stream.muxed_conn.peer_id)
            await stream.reset()


def make_gossipsub(config: GossipConfig) -> GossipSub:
    """The router with our tuning (eclipse protection off: on loopback and small LANs
    every peer shares a handful of IPs and it only churns the mesh)."""
    return _GossipSub(
        protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],
        degree=config.degree,
        degree_low=config.degree_low,
        degree_high=config.degree_high,
        heartbeat_interval=config.heartbeat_interval,
        max_messages_per_topic_per_second=config.max_messages_per_topic_per_second,
        eclipse_protection_enabled=False,
        prune_back_off=10,
        do_px=True,
    )


class Subscription:
    """Messages arriving on one topic (an async iterator of :class:`GossipMessage`)."""

    def __init__(self, topic: str, sub: ISubscriptionAPI) -> None:
        self.topic = topic
        self._sub = sub

    async def receive(self) -> GossipMessage:
        """The next accepted message."""
        msg = await self._sub.get()
        return GossipMessage(topic=self.topic, data=bytes(msg.data), origin=_peer(msg.from_id))

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> GossipMessage:
        try:
            return await self.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None


class PubSub:
    """Publish/subscribe on gossipsub topics, with typed validators."""

    def __init__(self, pubsub: Pubsub, router: GossipSub, config: GossipConfig) -> None:
        self._pubsub = pubsub
        self._router = router
        self.config = config

    def set_validator(self, topic: str, validator: TopicValidator) -> None:
        """Install the topic's validator (one per topic; replaces any previous one)."""
        max_bytes = self.config.max_message_bytes

        def check(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            if len(msg.data) > max_bytes:
                logger.info("dropped oversized gossip on %s from %s", topic, forwarder)
                return False
            return validator(_peer(forwarder.to_bytes()), bytes(msg.data))

        self._pubsub.set_topic_validator(topic, check, False)

    def remove_validator(self, topic: str) -> None:
        """Remove the topic's validator (every message is then accepted)."""
        self._pubsub.remove_topic_validator(topic)

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish ``data`` on ``topic``.

        Raises:
            LocalProtocolError: the payload exceeds ``max_message_bytes``.
        """
        if len(data) > self.config.max_message_bytes:
            raise LocalProtocolError(
                f"gossip payload of {len(data)} bytes exceeds {self.config.max_message_bytes}"
            )
        await self._pubsub.publish(topic, data)

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Subscription]:
        """Subscribe for the duration of the block.

        Our own publications are delivered too (libp2p loops them back).
        """
        sub = await self._pubsub.subscribe(topic)
        try:
            yield Subscription(topic, sub)
        finally:
            with trio.CancelScope(shield=True):
                await self._pubsub.unsubscribe(topic)

    def mesh_peers(self, topic: str) -> list[PeerId]:
        """Peers in our gossipsub mesh for ``topic`` (full-message forwarding)."""
        peers = self._router.mesh.get(topic, set())
        return sorted(p for p in (_peer(i.to_bytes()) for i in peers) if p is not None)

    def topic_peers(self, topic: str) -> list[PeerId]:
        """Peers known to be subscribed to ``topic``."""
        peers = self._pubsub.peer_topics.get(topic, set())
        return sorted(p for p in (_peer(i.to_bytes()) for i in peers) if p is not None)
