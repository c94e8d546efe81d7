"""Long-lived bidirectional session streams (the trio adapter over :mod:`p2p._flow`).

Theory of operation
-------------------
A :class:`SessionStream` lives inside :func:`session_context`, which owns a nursery
with three tasks:

* the **reader** drains the byte stream continuously (so yamux's window never fills and
  its 5-second writer reset never fires), feeds :class:`SessionProtocol`, and queues
  application messages in an unbounded channel whose size is bounded by credits;
* the **watchdog** declares the peer dead when no byte has arrived for
  ``dead_after`` seconds (libp2p never notices a frozen peer);
* the **pinger** sends a heartbeat whenever we have been silent for ``ping_interval``.

``send`` waits for credit, then writes under a FIFO lock; ``receive`` returns queued
messages in order and grants credit back as they are consumed.

Errors and ownership: the first failure (protocol violation, broken stream, dead
peer) is stored, the stream is reset, waiting callers are woken, and every later
``send``/``receive`` raises that stored error. Messages that arrived before a failure
are still delivered first. A clean end (the peer's goodbye) makes ``receive`` raise
:class:`StreamClosedError`. Leaving the context normally sends our goodbye; leaving it
with an exception resets the stream so the peer sees a broken session, not a clean one.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from p2p._errors import (
    BrokenStreamError,
    LocalProtocolError,
    P2PError,
    PeerDeadError,
    RemoteProtocolError,
    StreamClosedError,
)
from p2p._flow import SessionEvent, SessionProtocol
from p2p._framing import MAX_READ_CHUNK
from p2p._heartbeat import Liveness
from p2p._messages import DEFAULT_LIMITS, Message, WireLimits
from p2p._peer_id import PeerId
from p2p._service import service_nursery
from p2p._streams import ByteStream

__all__ = ["SessionConfig", "SessionStream", "SessionStatistics", "session_context"]

logger = logging.getLogger(__name__)

# However strict a peer's silence limit, we do not ping more often than this.
MIN_PING_INTERVAL = 0.05


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Tuning of one session stream (both sides should use the same values).

    Attributes:
        dead_after: seconds of silence after which the peer is declared dead.
        ping_interval: seconds of our silence before a heartbeat; default dead_after/4.
        window_bytes: bytes of unconsumed messages we buffer (flow-control window).
        limits: frame and message bounds.
        close_timeout: how long a graceful close may take before we reset instead.
    """

    dead_after: float = 5.0
    ping_interval: float | None = None
    window_bytes: int = 4 * 1024 * 1024
    limits: WireLimits = field(default=DEFAULT_LIMITS)
    close_timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    """Counters of one session, for observability."""

    messages_sent: int
    messages_received: int
    bytes_received: int
    pings_sent: int
    send_credit: int
    queued_messages: int
    closed: bool
    error: str | None


class SessionStream:
    """A framed, flow-controlled, heartbeat-checked bidirectional message stream.

    Obtain one from :meth:`Host.open_session` or a session handler; do not construct
    it directly (its tasks must run in :func:`session_context`).
    """

    def __init__(self, stream: ByteStream, *, config: SessionConfig, protocol: str = "") -> None:
        self._stream = stream
        self.config = config
        self.protocol = protocol
        peer = stream.remote_peer
        self._peer_text = "anonymous" if peer is None else str(peer)
        self._proto = SessionProtocol(
            window_bytes=config.window_bytes, limits=config.limits, peer=self._peer_text
        )
        self._liveness = Liveness.start(
            trio.current_time(), dead_after=config.dead_after, ping_interval=config.ping_interval
        )
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[Message, int]](math.inf)
        self._write_lock = trio.StrictFIFOLock()
        self._credit_event = trio.Event()
        self._interval_changed = trio.Event()
        self._error: P2PError | None = None
        self._goodbye_received = False
        self._closing = False
        self._messages_sent = 0
        self._messages_received = 0
        self._pings_sent = 0

    @property
    def peer(self) -> PeerId | None:
        """The authenticated peer at the other end."""
        return self._stream.remote_peer

    # -- public API ---------------------------------------------------------------

    async def send(self, msg: Message) -> None:
        """Send one application message, waiting for flow-control credit if needed.

        Raises:
            LocalProtocolError: invalid or over-limit message.
            StreamClosedError: we already closed the session.
            BrokenStreamError / PeerDeadError / RemoteProtocolError: the session failed.
        """
        while True:
            self._raise_if_unusable()
            if self._proto.can_send():
                break
            await self._credit_event.wait()
        frame = self._proto.send(msg)
        await self._write(frame)
        self._messages_sent += 1

    async def receive(self) -> Message:
        """The next application message, in order.

        Raises:
            StreamClosedError: the peer closed cleanly (or we closed the session).
            BrokenStreamError / PeerDeadError / RemoteProtocolError: the session failed
                (after any messages received before the failure).
        """
        try:
            try:  # fast path: a message already queued needs no scheduling round-trip
                await trio.lowlevel.checkpoint_if_cancelled()
                msg, size = self._inbox.receive_nowait()
            except trio.WouldBlock:
                msg, size = await self._inbox.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._error is not None:
                raise self._error from None
            raise StreamClosedError(f"session with {self._peer_text} closed") from None
        self._messages_received += 1
        grant = self._proto.message_consumed(size)
        if grant and self._error is None and not self._closing:
            with contextlib.suppress(P2PError):  # stored; the next call reports it
                await self._write(grant)
        return msg

    # An iterator object rather than an async generator: a loop body that raises
    # (say a send failing) leaves nothing behind for the garbage collector to finalize.
    def __aiter__(self) -> SessionStream:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.receive()
        except StreamClosedError:
            raise StopAsyncIteration from None

    async def aclose(self, reason: str = "") -> None:
        """Say goodbye and close; idempotent. Falls back to a reset on failure."""
        if self._closing:
            return
        self._closing = True
        self._credit_event.set()
        clean = False
        if self._error is None:
            with trio.move_on_after(self.config.close_timeout):
                try:
                    await self._write(self._proto.goodbye(reason))
                    await self._stream.aclose()
                    clean = True
                except P2PError:
                    pass
        if not clean:
            await self._stream.reset()
        self._inbox_send.close()

    async def abort(self) -> None:
        """Reset the stream without a goodbye (the peer sees a broken session)."""
        if self._closing:
            return
        self._closing = True
        self._fail(BrokenStreamError(f"session with {self._peer_text} aborted locally"))
        await self._stream.reset()

    def statistics(self) -> SessionStatistics:
        """A snapshot of this session's counters."""
        return SessionStatistics(
            messages_sent=self._messages_sent,
            messages_received=self._messages_received,
            bytes_received=self._proto.framer.bytes_received,
            pings_sent=self._pings_sent,
            send_credit=self._proto.send_credit,
            queued_messages=self._inbox.statistics().current_buffer_used,
            closed=self._closing or self._goodbye_received,
            error=None if self._error is None else repr(self._error),
        )

    # -- internals ------------------------------------------------------------------

    def _raise_if_unusable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closing:
            raise StreamClosedError(f"session with {self._peer_text} is closed")

    async def _write(self, data: bytes) -> None:
        # Uncontended fast path: take the lock without a scheduling round-trip (the
        # write below checkpoints anyway); ~10% of a 64-byte round trip.
        try:
            self._write_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._write_lock.acquire()
        try:
            self._raise_error_only()
            try:
                await self._stream.send_all(data)
            except BrokenStreamError as exc:
                self._fail(exc)
                raise
            self._liveness.on_send(trio.current_time())
        finally:
            self._write_lock.release()

    def _raise_error_only(self) -> None:
        if self._error is not None:
            raise self._error

    def _fail(self, exc: P2PError) -> None:
        """Record the first failure and wake everyone waiting."""
        if self._error is not None or (
            self._goodbye_received and not isinstance(exc, RemoteProtocolError)
        ):
            return
        self._error = exc
        if isinstance(exc, RemoteProtocolError):
            logger.warning(
                "session %s: protocol violation by peer %s: %s", self.protocol, self._peer_text, exc
            )
        else:
            logger.info("session %s with peer %s failed: %s", self.protocol, self._peer_text, exc)
        self._inbox_send.close()
        self._credit_event.set()

    async def _send_initial(self) -> None:
        # Our window beyond the initial one, and a ping that tells the peer our silence limit.
        frames = self._proto.initial_bytes() + self._proto.ping(self.config.dead_after)
        with contextlib.suppress(P2PError):  # stored; surfaces on first use
            await self._write(frames)

    def _heed_peer_limit(self) -> None:
        """Ping at least four times within the peer's silence limit, if it is the stricter."""
        wanted = max(self._proto.peer_dead_after / 4, MIN_PING_INTERVAL)
        if wanted < self._liveness.ping_interval:
            self._liveness.ping_interval = wanted
            self._interval_changed.set()

    async def _reader(self) -> None:
        try:
            while True:
                data = await self._stream.receive_some(MAX_READ_CHUNK)
                self._liveness.on_receive(trio.current_time())
                self._proto.receive_data(data)
                if self._drain_events():
                    return
        except (RemoteProtocolError, BrokenStreamError, LocalProtocolError) as exc:
            if self._closing:
                return  # our own close tore the stream down; not a failure
            self._fail(exc)
            await self._stream.reset()

    def _drain_events(self) -> bool:
        """Process buffered frames; True once the stream is finished."""
        while True:
            event = self._proto.next_event()
            if self._proto.peer_dead_after:
                self._heed_peer_limit()
            if self._proto.credit_changed:
                self._proto.credit_changed = False
                self._credit_event.set()
                self._credit_event = trio.Event()
            if event is SessionEvent.NEED_DATA:
                return False
            if event is SessionEvent.GOODBYE:
                self._goodbye_received = True
                self._inbox_send.close()
                continue
            if event is SessionEvent.CLOSED:
                return True
            # Closed here (`aclose`, `abort`, a failure) while the stream still reads: a yamux
            # close is a half-close, and the peer may have sent this before our goodbye
            # reached it. Nobody is left to read it.
            with contextlib.suppress(trio.ClosedResourceError):
                self._inbox_send.send_nowait(event)

    async def _watchdog(self) -> None:
        while True:
            await trio.sleep_until(self._liveness.dead_at())
            if self._goodbye_received or self._closing or self._error is not None:
                return
            if not self._liveness.is_dead(trio.current_time()):
                continue
            # Give the reader one scheduling round: after a long local stall both
            # tasks wake together and queued bytes may be waiting to be counted.
            await trio.lowlevel.checkpoint()
            if self._liveness.is_dead(trio.current_time()):
                self._fail(
                    PeerDeadError(
                        f"peer {self._peer_text} silent for {self.config.dead_after:.1f}s"
                    )
                )
                await self._stream.reset()
                return

    async def _pinger(self) -> None:
        while True:
            with trio.move_on_at(self._liveness.ping_at()):
                await self._interval_changed.wait()  # the peer asked for more frequent pings
                self._interval_changed = trio.Event()
            if self._closing or self._error is not None:
                return
            if self._liveness.ping_due(trio.current_time()):
                try:
                    await self._write(self._proto.ping(self.config.dead_after))
                except P2PError:
                    return
                self._pings_sent += 1


@asynccontextmanager
async def session_context(
    stream: ByteStream, *, config: SessionConfig, protocol: str = ""
) -> AsyncIterator[SessionStream]:
    """Run a session over ``stream`` for the duration of the block.

    Leaving the block normally closes the session with a goodbye; leaving it with an
    exception (including cancellation) resets the stream instead. An exception from
    the block is re-raised as itself, not wrapped in an ExceptionGroup by the
    session's nursery.
    """
    session = SessionStream(stream, config=config, protocol=protocol)
    async with service_nursery() as nursery:
        nursery.start_soon(session._reader)
        nursery.start_soon(session._watchdog)
        nursery.start_soon(session._pinger)
        ok = False
        try:
            await session._send_initial()
            yield session
            ok = True
        finally:
            with trio.CancelScope(shield=True):
                if ok:
                    await session.aclose()
                else:
                    await session.abort()
