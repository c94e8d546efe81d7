"""Request/response RPC for control traffic, one libp2p stream per call.

Theory of operation
-------------------
An :class:`RpcSpec` names a protocol id, the request and response message types, the
wire limits (the size caps of both messages) and a deadline. The client opens a
stream, sends one framed request, half-closes, and reads exactly one framed reply:
the response type, or an :class:`~p2p._control.RpcFailure` when the server's handler
refused with :class:`RpcRefusal` (a declared code, never a stack trace). The server
reads exactly one request within the deadline, runs the handler under the same
deadline, and writes the reply.

Opening a stream costs ~2 ms on py-libp2p; that is fine for control requests.
Inference traffic uses long-lived :class:`~p2p.SessionStream`\\s instead.

Errors: a timeout is :class:`RpcTimeoutError`; a malformed or unexpected reply is
:class:`RemoteProtocolError` naming the peer; a refusal is :class:`RemoteRpcError`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import trio

from p2p._control import RpcFailure
from p2p._errors import (
    BrokenStreamError,
    LocalProtocolError,
    P2PError,
    RemoteRpcError,
    RpcTimeoutError,
)
from p2p._framed import FramedStream
from p2p._messages import DEFAULT_LIMITS, Message, WireLimits
from p2p._peer_id import PeerId
from p2p._streams import ByteStream

__all__ = ["RpcSpec", "RpcRefusal", "RpcHandler", "rpc_request", "serve_rpc_stream"]

logger = logging.getLogger(__name__)

ReqT = TypeVar("ReqT", bound=Message)
RespT = TypeVar("RespT", bound=Message)


@dataclass(frozen=True, slots=True)
class RpcSpec(Generic[ReqT, RespT]):
    """One RPC: protocol id, message types, size caps and deadline.

    Attributes:
        protocol: versioned protocol id, e.g. ``/shardnet/ping/1``.
        request_type: the request message class.
        response_type: the response message class.
        limits: size caps for both directions (``max_frame_bytes``).
        timeout: seconds for the whole round trip (client) and the handler (server).
    """

    protocol: str
    request_type: type[ReqT]
    response_type: type[RespT]
    limits: WireLimits = field(default=DEFAULT_LIMITS)
    timeout: float = 10.0


class RpcRefusal(P2PError):
    """Raised by an RPC handler to refuse a request with a declared code.

    The client receives it as :class:`RemoteRpcError` with the same code and detail.
    """

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code[:64] or "refused"
        self.detail = detail[:256]


RpcHandler = Callable[[PeerId, Any], Awaitable[Message]]
"""``async (peer, request) -> response``; may raise :class:`RpcRefusal`."""


class StreamOpener(Protocol):
    """What the client needs from a host."""

    async def open_stream(self, peer: PeerId, protocol: str) -> Any:
        """Open a :class:`ByteStream` to ``peer``."""
        ...


async def rpc_request(
    host: StreamOpener, peer: PeerId, spec: RpcSpec[ReqT, RespT], request: ReqT
) -> RespT:
    """Send ``request`` to ``peer`` and return its response.

    Raises:
        DialError: the stream could not be opened.
        RpcTimeoutError: no response within ``spec.timeout``.
        RemoteRpcError: the handler refused.
        RemoteProtocolError: the reply was malformed or of the wrong type.
        BrokenStreamError: the stream broke.
    """
    with trio.move_on_after(spec.timeout):
        stream: ByteStream = await host.open_stream(peer, spec.protocol)
        framed = FramedStream(stream, limits=spec.limits)
        ok = False
        try:
            await framed.send(request)
            await stream.send_eof()
            reply = await framed.receive_exactly_one((spec.response_type, RpcFailure))
            ok = True
        finally:
            with trio.CancelScope(shield=True):
                if ok:
                    await stream.aclose()
                else:
                    await stream.reset()
        if isinstance(reply, RpcFailure):
            raise RemoteRpcError(reply.code, reply.detail, peer=str(peer))
        if not isinstance(reply, spec.response_type):  # narrowed for the type checker
            raise RemoteRpcError("bad-reply", "unexpected reply type", peer=str(peer))
        return reply
    raise RpcTimeoutError(f"{spec.protocol} to {peer} timed out after {spec.timeout}s")


async def serve_rpc_stream(
    stream: ByteStream, spec: RpcSpec[Any, Any], handler: RpcHandler
) -> None:
    """Answer one request on an inbound ``stream`` (the host calls this per stream).

    Raises:
        RemoteProtocolError: the request was malformed (the host logs it, naming the
            peer, and resets the stream).
        BrokenStreamError: the stream broke.
    """
    peer = stream.remote_peer
    if peer is None:
        raise BrokenStreamError("RPC streams must be authenticated")
    framed = FramedStream(stream, limits=spec.limits)
    with trio.move_on_after(spec.timeout) as scope:
        request = await framed.receive_exactly_one(spec.request_type)
        try:
            response = await handler(peer, request)
        except RpcRefusal as refusal:
            response = RpcFailure(code=refusal.code, detail=refusal.detail)
        if not isinstance(response, spec.response_type | RpcFailure):
            raise LocalProtocolError(f"{spec.protocol} handler returned {type(response).__name__}")
        await framed.send(response)
        await stream.aclose()
    if scope.cancelled_caught:
        logger.info("%s request from %s timed out", spec.protocol, peer)
        await stream.reset()
