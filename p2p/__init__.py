"""shardnet's network layer: identity, libp2p host, framing, sessions, RPC, announcements.

Only re-exports live here; the code is in the modules. What the node layer uses:

* ``Identity.load_or_create(data_dir)`` -- the persistent Ed25519 node key;
  ``identity.sign(domain, payload)`` / ``peer_id.verify(domain, payload, sig)``.
* ``async with open_host(identity, HostConfig(...)) as host`` -- the libp2p host
  (Noise + Yamux over TCP, bootstrap + peer exchange, optional mDNS, DHT, gossipsub,
  optional PSK / allowlist, optional WAN emulation with ``link_delay_s`` and
  ``link_bandwidth_bps``). ``host.connect(addr)``, ``host.listen_addrs()``.
* ``async with host.open_session(peer, protocol) as session`` and
  ``host.set_session_handler(protocol, handler)`` -- long-lived framed message streams
  with heartbeats and flow control (``session.send(msg)`` / ``await session.receive()``).
* ``host.request(peer, RpcSpec(...), msg)`` / ``host.set_rpc_handler(spec, handler)``.
* ``Announcer`` and ``SwarmView.watch(host, model_id)`` -- signed announcements
  through gossip and the DHT (``async with announcer.running()`` keeps DHT stores off
  ``publish``'s path; ``keep_publishing`` does it for you).
* ``@message(name, version)`` frozen dataclasses, ``Tensor``, ``WireLimits``.
"""

from p2p._announcements import (
    ANNOUNCE_DOMAIN,
    ANNOUNCE_TOPIC,
    MAX_ANNOUNCE_TTL,
    Announcement,
    AnnouncementFields,
    AnnouncementState,
    Announcer,
    SignedAnnouncement,
    SwarmView,
    announcement_key,
    verify_announcement,
)
from p2p._control import Credit, Goodbye, Ping, RpcFailure
from p2p._dht import Dht, DhtError, RecordValidator
from p2p._errors import (
    BrokenStreamError,
    DialError,
    IdentityError,
    LocalProtocolError,
    P2PError,
    PeerDeadError,
    RemoteProtocolError,
    RemoteRpcError,
    RpcTimeoutError,
    StreamClosedError,
    TruncatedFrameError,
)
from p2p._flow import INITIAL_WINDOW, SessionEvent, SessionProtocol
from p2p._framed import FramedStream
from p2p._framing import CLOSED, HEADER_SIZE, NEED_DATA, Framer, FramerEvent
from p2p._heartbeat import Liveness
from p2p._host import Host, StreamHandler, open_host
from p2p._host_config import HostConfig, parse_peer_addr
from p2p._identity import Identity
from p2p._messages import (
    DEFAULT_LIMITS,
    Message,
    WireLimits,
    decode_message,
    encode_message,
    message,
    registered_messages,
)
from p2p._peer_exchange import PEX, PeerBook, PeerExchangeReply, PeerExchangeRequest, PeerRecord
from p2p._peer_id import InvalidPeerIdError, PeerId
from p2p._pool import Lease, SessionPool, open_session_pool
from p2p._pubsub import GossipConfig, GossipMessage, PubSub, Subscription, TopicValidator
from p2p._rpc import RpcHandler, RpcRefusal, RpcSpec, rpc_request, serve_rpc_stream
from p2p._session import SessionConfig, SessionStatistics, SessionStream, session_context
from p2p._streams import ByteStream, Libp2pByteStream, TrioByteStream
from p2p._tensor import INT8_BLOCK, TENSOR_CODECS, TENSOR_DTYPES, Tensor, tensor_payload_bytes

__all__ = [
    "ANNOUNCE_DOMAIN",
    "ANNOUNCE_TOPIC",
    "Announcement",
    "announcement_key",
    "AnnouncementFields",
    "AnnouncementState",
    "Announcer",
    "BrokenStreamError",
    "ByteStream",
    "CLOSED",
    "Credit",
    "decode_message",
    "DEFAULT_LIMITS",
    "Dht",
    "DhtError",
    "DialError",
    "encode_message",
    "FramedStream",
    "Framer",
    "FramerEvent",
    "Goodbye",
    "GossipConfig",
    "GossipMessage",
    "HEADER_SIZE",
    "Host",
    "HostConfig",
    "Identity",
    "IdentityError",
    "INITIAL_WINDOW",
    "INT8_BLOCK",
    "InvalidPeerIdError",
    "Libp2pByteStream",
    "Lease",
    "Liveness",
    "LocalProtocolError",
    "MAX_ANNOUNCE_TTL",
    "Message",
    "message",
    "NEED_DATA",
    "open_host",
    "open_session_pool",
    "P2PError",
    "parse_peer_addr",
    "PeerBook",
    "PeerDeadError",
    "PeerExchangeReply",
    "PeerExchangeRequest",
    "PeerId",
    "PeerRecord",
    "PEX",
    "Ping",
    "PubSub",
    "RecordValidator",
    "registered_messages",
    "RemoteProtocolError",
    "RemoteRpcError",
    "rpc_request",
    "RpcFailure",
    "RpcHandler",
    "RpcRefusal",
    "RpcSpec",
    "RpcTimeoutError",
    "serve_rpc_stream",
    "SessionPool",
    "session_context",
    "SessionConfig",
    "SessionEvent",
    "SessionProtocol",
    "SessionStatistics",
    "SessionStream",
    "SignedAnnouncement",
    "StreamClosedError",
    "StreamHandler",
    "Subscription",
    "SwarmView",
    "Tensor",
    "TENSOR_CODECS",
    "TENSOR_DTYPES",
    "tensor_payload_bytes",
    "TopicValidator",
    "TrioByteStream",
    "TruncatedFrameError",
    "verify_announcement",
    "WireLimits",
]
