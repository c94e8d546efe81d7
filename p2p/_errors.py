"""The p2p package's error tree.

Errors are named by who is at fault, as in trio and h11:

* :class:`LocalProtocolError` -- *we* tried to do something the protocol forbids
  (send an over-limit frame, send on a closed session). A bug on this side.
* :class:`RemoteProtocolError` -- the *peer* sent something invalid (bad frame,
  bad message, bad signature). It feeds the peer's rank.
* :class:`BrokenStreamError` -- the world broke the stream (reset, connection lost,
  peer killed mid-stream). Distinct from a clean close, which is
  :class:`StreamClosedError`.
* :class:`PeerDeadError` -- the peer stopped answering heartbeats (frozen, suspended,
  partitioned): a broken stream detected by us rather than by the transport.

Every error raised out of this package derives from :class:`P2PError`, so callers can
retry a declared tuple of them and never need ``except Exception``.
"""

from __future__ import annotations


class P2PError(Exception):
    """Root of every error raised by the p2p package."""


class LocalProtocolError(P2PError):
    """This side misused the protocol (a bug here, not the peer's fault)."""


class RemoteProtocolError(P2PError):
    """The peer sent data that violates the protocol.

    Attributes:
        peer: the offending peer's id as a string, when known (for logs and ranking).
    """

    def __init__(self, message: str, *, peer: str | None = None) -> None:
        super().__init__(message)
        self.peer = peer

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} (peer {self.peer})" if self.peer else base


class BrokenStreamError(P2PError):
    """The stream broke: reset, connection lost, or the peer vanished mid-stream."""


class TruncatedFrameError(RemoteProtocolError, BrokenStreamError):
    """The stream ended inside a frame.

    It is both a protocol violation (a short frame) and a broken stream (a killed peer
    typically causes it), so it can be caught as either.
    """


class PeerDeadError(BrokenStreamError):
    """The peer sent nothing, not even a heartbeat, within the liveness timeout."""


class StreamClosedError(P2PError):
    """The session ended cleanly: the peer said goodbye, or we closed it ourselves."""


class DialError(P2PError):
    """Could not connect to a peer or open a stream to it."""


class IdentityError(P2PError):
    """The node's identity key could not be created or loaded."""


class RpcTimeoutError(P2PError, TimeoutError):
    """A request got no response within its deadline."""


class RemoteRpcError(P2PError):
    """The remote handler refused a request with a declared error code.

    Attributes:
        code: a short machine-readable reason chosen by the server's handler.
        detail: a human-readable explanation (never a stringified exception).
    """

    def __init__(self, code: str, detail: str, *, peer: str | None = None) -> None:
        super().__init__(f"{code}: {detail}" + (f" (peer {peer})" if peer else ""))
        self.code = code
        self.detail = detail
        self.peer = peer
