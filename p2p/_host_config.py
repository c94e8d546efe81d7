"""Host configuration and peer addresses (pure data; no I/O).

:class:`HostConfig` is the frozen description of a host that :func:`p2p.open_host`
runs; :func:`parse_peer_addr` splits ``/ip4/.../tcp/N/p2p/<id>`` into its parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import multiaddr.exceptions
from multiaddr import Multiaddr

from p2p._errors import DialError
from p2p._peer_id import InvalidPeerIdError, PeerId
from p2p._pubsub import GossipConfig

__all__ = ["HostConfig", "parse_peer_addr"]


@dataclass(frozen=True, slots=True)
class HostConfig:
    """Everything a host needs besides its identity.

    Attributes:
        listen_addrs: multiaddrs to listen on (``/ip4/0.0.0.0/tcp/0`` = any port).
        bootstrap: multiaddrs ending in ``/p2p/<peer id>`` to join the swarm through.
        enable_mdns: discover peers on the LAN (on for laptops, off in tests).
        psk: a 32-byte pre-shared key: only peers holding it can even handshake.
        allowed_peers: if set, only these peers may connect (either direction).
        enable_dht: run the Kademlia DHT (strict validation).
        dht_server: serve the DHT to others (Kademlia's server mode) and offer this host's
            addresses in peer exchange. A host that comes and goes, like a client, should
            not: servers kept it in their routing tables and handed its address out to
            newcomers, which dialed it and sent it DHT queries it could not answer.
        enable_pubsub: run gossipsub.
        gossip: gossipsub tuning.
        dial_timeout: seconds allowed for one connect or stream open.
        bootstrap_retry: seconds between bootstrap attempts while none succeeds.
        bootstrap_check: seconds between checks that bootstrap peers are connected.
        target_peers: libp2p's auto-connector dials known peers while fewer than this
            are connected (its default, 100, makes every node dial everyone).
        link_delay_s: WAN emulation: one-way delay added to every message this host sends
            to another process (0 = none). The sender is not blocked by it: messages
            are pipelined and arrive in order, each ``link_delay_s`` after it was sent
            (plus its serialization time). Applies to every connection (sessions, RPC,
            gossip, DHT, muxer frames); set it on both hosts for a symmetric link.
        link_bandwidth_bps: WAN emulation: bytes per second this host may send on each
            link, i.e. each connection to a peer (0 = unlimited). A message of ``n``
            bytes takes ``n / link_bandwidth_bps`` to serialize after the ones queued
            before it; senders block once 256 KiB of backlog is queued.
    """

    listen_addrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    enable_mdns: bool = True
    psk: bytes | None = None
    allowed_peers: frozenset[PeerId] | None = None
    enable_dht: bool = True
    dht_server: bool = True
    enable_pubsub: bool = True
    gossip: GossipConfig = field(default_factory=GossipConfig)
    dial_timeout: float = 10.0
    bootstrap_retry: float = 2.0
    bootstrap_check: float = 30.0
    target_peers: int = 8
    link_delay_s: float = 0.0
    link_bandwidth_bps: float = 0.0

    def __post_init__(self) -> None:
        if self.psk is not None and len(self.psk) != 32:
            raise ValueError("psk must be 32 bytes")
        if not self.listen_addrs:
            raise ValueError("listen_addrs must not be empty")
        if not 0.0 <= self.link_delay_s <= 10.0:
            raise ValueError("link_delay_s must be in [0, 10]")
        if self.link_bandwidth_bps < 0.0:
            raise ValueError("link_bandwidth_bps must be >= 0")


def parse_peer_addr(text: str) -> tuple[PeerId, str]:
    """Split ``/ip4/.../tcp/N/p2p/<id>`` into the peer id and the transport address.

    Raises:
        DialError: not a multiaddr, or no valid ``/p2p/`` component.
    """
    try:
        addr = Multiaddr(text)
        peer_text = addr.get_peer_id()
        if peer_text is None:
            raise DialError(f"address {text!r} has no /p2p/<peer id> component")
        peer = PeerId.from_string(peer_text)
        transport = addr.decapsulate(Multiaddr(f"/p2p/{peer_text}"))
    except (multiaddr.exceptions.Error, ValueError, InvalidPeerIdError) as exc:
        raise DialError(f"bad peer address {text!r}: {exc}") from exc
    return peer, str(transport)
