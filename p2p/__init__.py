"""shardnet's network layer: identity, libp2p host, framing, sessions, RPC, announcements.

Only re-exports live here; see the modules for the code.
"""

from p2p._announce import (
    ANNOUNCE_DOMAIN,
    MAX_ANNOUNCE_TTL,
    Announcement,
    AnnouncementRecordValidator,
    AnnounceState,
    SignedAnnouncement,
    announce_key,
    announce_topic,
    model_key,
    next_seq,
    sign_announcement,
    verify_announcement,
)
from p2p._announcer import (
    AnnounceConfig,
    Announcer,
    LiveSwarm,
    ServingInfo,
    SwarmStatistics,
    announcement_validator,
    open_announcer,
    open_swarm_view,
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
from p2p._host import Host, HostConfig, StreamHandler, open_host, parse_peer_addr
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
from p2p._peer_id import InvalidPeerIdError, PeerId
from p2p._pubsub import GossipConfig, GossipMessage, PubSub, Subscription, TopicValidator
from p2p._rpc import RpcHandler, RpcRefusal, RpcSpec, rpc_request, serve_rpc_stream
from p2p._session import SessionConfig, SessionStatistics, SessionStream, session_context
from p2p._streams import ByteStream, Libp2pByteStream, TrioByteStream
from p2p._swarm_view import SwarmView
from p2p._tensor import INT8_BLOCK, TENSOR_CODECS, TENSOR_DTYPES, Tensor, tensor_payload_bytes

__all__ = [
    "ANNOUNCE_DOMAIN",
    "announce_key",
    "announce_topic",
    "AnnounceConfig",
    "Announcement",
    "announcement_validator",
    "AnnouncementRecordValidator",
    "Announcer",
    "AnnounceState",
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
    "Liveness",
    "LiveSwarm",
    "LocalProtocolError",
    "MAX_ANNOUNCE_TTL",
    "message",
    "Message",
    "model_key",
    "NEED_DATA",
    "next_seq",
    "open_announcer",
    "open_host",
    "open_swarm_view",
    "P2PError",
    "parse_peer_addr",
    "PeerDeadError",
    "PeerId",
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
    "ServingInfo",
    "session_context",
    "SessionConfig",
    "SessionEvent",
    "SessionProtocol",
    "SessionStatistics",
    "SessionStream",
    "sign_announcement",
    "SignedAnnouncement",
    "StreamClosedError",
    "StreamHandler",
    "Subscription",
    "SwarmStatistics",
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
