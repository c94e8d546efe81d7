"""Sans-IO session protocol: framing + credit flow control + clean close.

Theory of operation
-------------------
Yamux in py-libp2p resets a stream whose writer has waited 5 s for window space, so a
reader that pauses (a model busy on a long step) would get its peer's writer killed.
We therefore never let yamux's window fill: the adapter drains every stream into
memory continuously, and *this* layer bounds that memory with credits.

Credits are counted in frame payload bytes of application messages (control
messages -- pings, credits, goodbyes -- are free). Each side starts with
:data:`INITIAL_WINDOW` bytes of credit towards the other, which the receiver may raise
at once by granting more (its configured window). A sender may send while its credit
is positive, so it overdraws by at most one frame; the receiver enforces
``received <= granted + max_frame`` and treats more as a protocol violation. When the
application has consumed half a window, the receiver grants that much again.

Ending: :class:`~p2p._control.Goodbye` then EOF is a clean close. EOF *without* a
goodbye means the peer vanished (a ``kill -9`` looks exactly like that on libp2p) and
raises :class:`BrokenStreamError`; EOF inside a frame raises
:class:`TruncatedFrameError`.
"""

from __future__ import annotations

import enum

from p2p._control import Credit, Goodbye, Ping
from p2p._errors import BrokenStreamError, LocalProtocolError, RemoteProtocolError
from p2p._framing import CLOSED, HEADER_SIZE, NEED_DATA, Framer
from p2p._messages import DEFAULT_LIMITS, Message, WireLimits

__all__ = ["SessionProtocol", "SessionEvent", "INITIAL_WINDOW"]

# Credit each side assumes it has before any grant arrives; part of the protocol.
INITIAL_WINDOW = 256 * 1024


class SessionEvent(enum.Enum):
    """Non-message results of :meth:`SessionProtocol.next_event`."""

    NEED_DATA = "need-data"
    """Feed more bytes."""
    GOODBYE = "goodbye"
    """The peer closed cleanly; no more messages will arrive."""
    CLOSED = "closed"
    """EOF after the goodbye; the byte stream is finished."""


class SessionProtocol:
    """One session stream's protocol state, independent of any I/O.

    Args:
        window_bytes: how many bytes of unconsumed messages we are willing to buffer.
        limits: frame and message bounds.
        peer: the peer id as text, for error messages.
    """

    def __init__(
        self,
        *,
        window_bytes: int = 4 * 1024 * 1024,
        limits: WireLimits = DEFAULT_LIMITS,
        peer: str | None = None,
    ) -> None:
        if window_bytes < INITIAL_WINDOW:
            raise ValueError(f"window_bytes must be >= {INITIAL_WINDOW}")
        self.framer = Framer(limits=limits, peer=peer)
        self.peer = peer
        self.window_bytes = window_bytes
        self._send_credit = INITIAL_WINDOW
        self._granted_total = INITIAL_WINDOW
        self._received_total = 0
        self._consumed_ungranted = 0
        self._goodbye_received = False
        self._goodbye_sent = False
        self.credit_changed = False  # set when a grant arrived; the adapter clears it
        self.peer_dead_after = 0.0  # the peer's silence limit, once its ping said it

    # -- outbound ---------------------------------------------------------------

    def initial_bytes(self) -> bytes:
        """Frames to send when the session opens (our window beyond the initial one)."""
        extra = self.window_bytes - INITIAL_WINDOW
        if extra <= 0:
            return b""
        self._granted_total += extra
        return self.framer.send(Credit(amount=extra))

    @property
    def send_credit(self) -> int:
        """Bytes we may still send (may be negative after an overdraft)."""
        return self._send_credit

    def can_send(self) -> bool:
        """True when an application message may be sent now."""
        return self._send_credit > 0

    def send(self, msg: Message) -> bytes:
        """Frame an application message, consuming credit.

        Raises:
            LocalProtocolError: no credit (call :meth:`can_send` first), after our
                goodbye, a control message passed in, or an invalid message.
        """
        if self._goodbye_sent:
            raise LocalProtocolError("send after goodbye")
        if isinstance(msg, Ping | Credit | Goodbye):
            raise LocalProtocolError("control messages are internal to the session")
        if self._send_credit <= 0:
            raise LocalProtocolError("send without credit")
        frame = self.framer.send(msg)
        self._send_credit -= len(frame) - HEADER_SIZE
        return frame

    def ping(self, dead_after: float = 0.0) -> bytes:
        """A heartbeat frame (saying our own silence limit, when given)."""
        return self.framer.send(Ping(dead_after=dead_after))

    def goodbye(self, reason: str = "") -> bytes:
        """The closing frame; nothing may be sent after it."""
        self._goodbye_sent = True
        return self.framer.send(Goodbye(reason=reason[:256]))

    def message_consumed(self, nbytes: int) -> bytes:
        """Note that the application took a message of ``nbytes``.

        Returns:
            A credit frame to send, or ``b""`` when it is not yet worth granting.
        """
        self._consumed_ungranted += nbytes
        if self._goodbye_sent or self._goodbye_received:
            return b""
        if self._consumed_ungranted < self.window_bytes // 2:
            return b""
        amount, self._consumed_ungranted = self._consumed_ungranted, 0
        self._granted_total += amount
        return self.framer.send(Credit(amount=amount))

    # -- inbound ----------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the stream (``b""`` = EOF)."""
        self.framer.receive_data(data)

    def next_event(self) -> tuple[Message, int] | SessionEvent:
        """The next application message with its size in bytes, or an event.

        Raises:
            RemoteProtocolError: bad frame or message, a window violation, data after
                goodbye.
            BrokenStreamError: EOF without a goodbye (the peer vanished).
        """
        while True:
            event = self.framer.next_event()
            if event is NEED_DATA:
                return SessionEvent.NEED_DATA
            if event is CLOSED:
                if not self._goodbye_received:
                    raise BrokenStreamError(f"peer {self.peer} ended the stream without a goodbye")
                return SessionEvent.CLOSED
            if self._goodbye_received:
                raise RemoteProtocolError("frame after goodbye", peer=self.peer)
            if isinstance(event, Ping):
                if event.dead_after > 0:
                    self.peer_dead_after = event.dead_after
                continue
            if isinstance(event, Credit):
                self._send_credit += event.amount
                self.credit_changed = True
                continue
            if isinstance(event, Goodbye):
                self._goodbye_received = True
                return SessionEvent.GOODBYE
            size = self.framer.last_frame_bytes
            self._received_total += size
            if self._received_total > self._granted_total + self.framer.limits.max_frame_bytes:
                raise RemoteProtocolError(
                    "peer sent beyond its flow-control window", peer=self.peer
                )
            return event, size
