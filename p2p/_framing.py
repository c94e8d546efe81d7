"""Sans-IO framing: bytes in, messages out (h11-style; no trio, no libp2p).

Theory of operation
-------------------
A frame is an 8-byte header followed by a payload::

    +----------------+----------------+--------------------+
    | length (u32 BE)| check (u32 BE) | payload (length B) |
    +----------------+----------------+--------------------+

The payload is one encoded :class:`~p2p.Message`. The length is checked against
``WireLimits.max_frame_bytes`` as soon as the header arrives, *before* any of the
payload is buffered, so a hostile length costs nothing. The check is a crc32 of the
length bytes and the first :data:`CHECKED_BYTES` of the payload: a stream that lost
its framing (a header read from the middle of a payload), a corrupted length, or a
damaged small message is an error instead of a wrong message. Large payloads are not
checksummed end to end on purpose: a crc32 of a megabyte costs more CPU than
encrypting it, and every byte on a real link is already authenticated by Noise
(ChaCha20-Poly1305) and by TCP's own checksum under it. A stream that ends inside a
frame raises :class:`TruncatedFrameError`, never yields a short message (libp2p
reports a killed peer as a clean EOF; this is how we notice).

:class:`Framer` is the protocol object: the I/O adapter feeds it whatever bytes it
read (``receive_data``; ``b""`` means EOF), then calls ``next_event`` until it says
``NEED_DATA``; ``send(msg)`` returns the bytes to write. Buffered bytes are bounded: at
most one partial frame plus one read's worth of data, or ``receive_data`` raises
:class:`LocalProtocolError` (the adapter forgot to drain events).

After a protocol error the framer is poisoned: every later call re-raises it, like
h11's ``ERROR`` state, so nobody keeps parsing a desynchronized stream.
"""

from __future__ import annotations

import enum
import struct
import zlib
from typing import Final

from p2p._errors import LocalProtocolError, RemoteProtocolError, TruncatedFrameError
from p2p._messages import DEFAULT_LIMITS, Message, WireLimits, decode_message, encode_message

__all__ = [
    "CHECKED_BYTES",
    "CLOSED",
    "Framer",
    "FramerEvent",
    "HEADER_SIZE",
    "MAX_READ_CHUNK",
    "NEED_DATA",
    "frame_check",
]

_HEADER = struct.Struct(">II")
_LENGTH = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
# Payload bytes covered by a frame's check (all of a small message).
CHECKED_BYTES = 4096
# The most an adapter should feed per receive_data call; part of the buffer bound.
MAX_READ_CHUNK = 256 * 1024


def frame_check(length: int, payload: bytes | memoryview) -> int:
    """The header's check word for a payload of ``length`` bytes starting ``payload``."""
    return zlib.crc32(payload[:CHECKED_BYTES], zlib.crc32(_LENGTH.pack(length)))


class FramerEvent(enum.Enum):
    """Non-message results of :meth:`Framer.next_event`."""

    NEED_DATA = "need-data"
    """No complete frame buffered: feed more bytes."""
    CLOSED = "closed"
    """The peer ended the byte stream cleanly, at a frame boundary."""


NEED_DATA: Final = FramerEvent.NEED_DATA
CLOSED: Final = FramerEvent.CLOSED


class Framer:
    """Length-prefixed, checksummed msgpack frames over any reliable byte stream.

    Args:
        limits: frame and message bounds for both directions.
        peer: the peer's id as text, used in error messages and log lines.
    """

    def __init__(self, *, limits: WireLimits = DEFAULT_LIMITS, peer: str | None = None) -> None:
        self.limits = limits
        self.peer = peer
        self._buf = bytearray()
        self._need: int | None = None  # payload length of the frame being buffered
        self._crc = 0
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self.max_buffered_bytes = limits.max_frame_bytes + HEADER_SIZE + MAX_READ_CHUNK
        self.bytes_received = 0
        self.frames_received = 0
        self.last_frame_bytes = 0  # payload size of the message last returned

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        """True while a frame has started but not fully arrived."""
        return bool(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the stream; ``b""`` signals EOF.

        Raises:
            LocalProtocolError: data after EOF, or the buffer bound would be exceeded
                (the caller must drain ``next_event`` before feeding more).
        """
        if self._error is not None:
            raise self._error
        if self._eof:
            raise LocalProtocolError("receive_data after EOF")
        if not data:
            self._eof = True
            return
        if len(self._buf) + len(data) > self.max_buffered_bytes:
            raise LocalProtocolError(
                "framer buffer bound exceeded; drain next_event() before feeding more"
            )
        self._buf += data
        self.bytes_received += len(data)

    def next_event(self) -> Message | FramerEvent:
        """Return the next complete message, ``NEED_DATA`` or ``CLOSED``.

        Raises:
            RemoteProtocolError: an over-limit length, a checksum mismatch, or an
                invalid message (the framer is poisoned afterwards).
            TruncatedFrameError: EOF arrived inside a frame.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            if exc.peer is None:
                exc.peer = self.peer
            self._error = exc
            raise

    def _next_event(self) -> Message | FramerEvent:
        buf = self._buf
        if self._need is None:
            if len(buf) < HEADER_SIZE:
                return self._starved()
            length, crc = _HEADER.unpack_from(buf, 0)
            if length > self.limits.max_frame_bytes:
                raise RemoteProtocolError(
                    f"frame of {length} bytes exceeds the {self.limits.max_frame_bytes} limit"
                )
            self._need, self._crc = length, crc
        end = HEADER_SIZE + self._need
        if len(buf) < end:
            return self._starved()
        # Check and decode straight from the buffer (no copy of a large payload), then
        # drop the frame; the view must be released before the bytearray can shrink.
        with memoryview(buf) as view:
            payload = view[HEADER_SIZE:end]
            try:
                if frame_check(self._need, payload) != self._crc:
                    raise RemoteProtocolError("frame checksum mismatch")
                msg = decode_message(payload, self.limits)
            finally:
                payload.release()
        del buf[:end]
        self._need = None
        self.frames_received += 1
        self.last_frame_bytes = end - HEADER_SIZE
        return msg

    def _starved(self) -> FramerEvent:
        if not self._eof:
            return NEED_DATA
        if self._buf:
            have = len(self._buf)
            want = HEADER_SIZE if self._need is None else HEADER_SIZE + self._need
            raise TruncatedFrameError(f"stream ended inside a frame ({have}/{want} bytes)")
        return CLOSED

    def send(self, msg: Message) -> bytes:
        """Encode one message as a frame.

        Raises:
            LocalProtocolError: the message is invalid or over the frame limit.
        """
        payload = encode_message(msg, self.limits)
        return _HEADER.pack(len(payload), frame_check(len(payload), payload)) + payload
