"""The thin trio adapter between a :class:`ByteStream` and a :class:`Framer`.

Used directly for short exchanges (RPC); long-lived streams use
:class:`~p2p.SessionStream`, which adds heartbeats and flow control on top of the same
framing. Reads loop, because a libp2p read returns at most ~64 KiB; a deadline is the
caller's business (``trio.fail_after`` around the call).
"""

from __future__ import annotations

from p2p._errors import RemoteProtocolError
from p2p._framing import CLOSED, MAX_READ_CHUNK, NEED_DATA, Framer
from p2p._messages import DEFAULT_LIMITS, Message, WireLimits
from p2p._streams import ByteStream

__all__ = ["FramedStream"]


class FramedStream:
    """Send and receive whole messages on a byte stream.

    Args:
        stream: the byte stream (owned by the caller, who closes it).
        limits: frame and message bounds.
    """

    def __init__(self, stream: ByteStream, *, limits: WireLimits = DEFAULT_LIMITS) -> None:
        self.stream = stream
        peer = stream.remote_peer
        self.framer = Framer(limits=limits, peer=None if peer is None else str(peer))

    async def send(self, msg: Message) -> None:
        """Write one message.

        Raises:
            LocalProtocolError: the message is invalid or too large.
            BrokenStreamError: the stream broke.
        """
        await self.stream.send_all(self.framer.send(msg))

    async def receive(self) -> Message | None:
        """Read one message; None at a clean EOF between frames.

        Raises:
            RemoteProtocolError: a bad frame or message (TruncatedFrameError if the
                stream ended inside a frame).
            BrokenStreamError: the stream broke.
        """
        while True:
            event = self.framer.next_event()
            if event is CLOSED:
                return None
            if event is not NEED_DATA:
                return event
            data = await self.stream.receive_some(MAX_READ_CHUNK)
            self.framer.receive_data(data)

    async def receive_exactly_one(
        self, expected: type[Message] | tuple[type[Message], ...]
    ) -> Message:
        """Read one message of an expected type; EOF or another type is an error.

        Raises:
            RemoteProtocolError: EOF before the message, or a message of another type.
        """
        msg = await self.receive()
        if msg is None:
            raise RemoteProtocolError(
                "stream ended before the expected message", peer=self.framer.peer
            )
        if not isinstance(msg, expected):
            raise RemoteProtocolError(
                f"unexpected message {msg.wire_name} v{msg.wire_version}", peer=self.framer.peer
            )
        return msg
