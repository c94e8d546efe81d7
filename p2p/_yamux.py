"""Yamux with its hot paths rewritten: py-libp2p's muxer, fewer scheduler trips.

Theory of operation
-------------------
py-libp2p 0.8.1's ``Yamux`` is correct but slow on the paths every message takes. A
64-byte message crossed about a dozen ``trio.Lock``\\s on its way (each uncontended
acquire is still a trip through the scheduler), and the receive window was handed
back on every other read: with ``PY_YAMUX_RELEASE_ON_READ=0`` its "partial slack"
branch still sends a WINDOW_UPDATE whenever a read drains the buffer, so half of all
frames on the wire were window updates, each one more socket write, wake-up and read
on both sides. A 1 MiB write went out as sixteen 64 KiB frames, each split into two
Noise messages (a 64 KiB frame is 17 bytes over the Noise limit).

:class:`FastYamux` keeps the library's wire protocol, its data structures and every
method that is not on a hot path (close, accept, the stale-stream sweeper, the RTT
pinger), and replaces:

* ``handle_incoming``: the same frame handling (SYN, ACK, FIN, RST, window updates,
  pings, GO_AWAY, the 60 s body deadline, the 16 MiB frame bound), without per-frame
  log formatting, and without locks on the DATA and WINDOW_UPDATE paths: trio only
  switches tasks at an ``await``, and those paths have none between reading the frame
  and updating the stream;
* ``_write_frame``: the connection's write lock taken without a scheduler trip when
  it is free;
* streams (:class:`FastYamuxStream`) that write up to :data:`MAX_FRAME_PAYLOAD` bytes
  per frame (within the send window; yamux allows any frame up to the window), wait for
  window updates on an event instead of polling every 10 ms, read without locks, report
  a reset stream as reset (the library reports it as a clean EOF once the stream's
  bookkeeping is dropped), and hand receive window back go-yamux style: once half the
  window has been consumed.
  The library's 5 s limit on waiting for window (then the stream errors) is kept,
  except on a shaped link (WAN emulation), where the window of a slow emulated link can
  legitimately stay shut longer (sessions still detect a dead peer by heartbeats).
"""

from __future__ import annotations

import logging
import math
import struct

import trio
from libp2p.abc import IHost, IMuxedConn, ISecureConn
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import IncompleteReadError, IOException
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamError, MuxedStreamReset
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
from libp2p.stream_muxer.yamux.yamux import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    GO_AWAY_NORMAL,
    HEADER_SIZE,
    MAX_WINDOW_SIZE,
    PROTOCOL_ID,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    YAMUX_HEADER_FORMAT,
    Yamux,
    YamuxStream,
)

from p2p._secure_session import NoiseSession

__all__ = ["FastYamux", "FastYamuxStream", "MAX_FRAME_PAYLOAD", "use_fast_yamux"]

logger = logging.getLogger(__name__)

_HEADER = struct.Struct(YAMUX_HEADER_FORMAT)
# Largest DATA frame we write. Bigger frames cost the reader less per byte; smaller
# ones let other streams' frames through sooner. (The library writes 64 KiB.)
MAX_FRAME_PAYLOAD = 256 * 1024
# How long a writer waits for the peer to open the window before the stream errors
# (py-libp2p's limit; not applied on a shaped link, where a slow emulated link, not a
# stalled reader, can keep the window shut that long).
WINDOW_WAIT_LIMIT = 5.0
# Deadline for the body of a DATA frame once its header has arrived.
DATA_BODY_TIMEOUT = 60.0

# What reading from a dead connection raises: the receive loop ends, the connection
# is cleaned up.
_CONNECTION_GONE: tuple[type[BaseException], ...] = (
    IOException,  # includes IncompleteReadError, RawConnError, ConnectionClosedError
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)


async def _read_exactly(conn: object, n: int) -> bytes:
    """Exactly ``n`` bytes from the secured connection.

    Raises:
        IncompleteReadError: the connection ended first.
    """
    read = conn.read  # type: ignore[attr-defined]
    data: bytes = await read(n)
    if len(data) == n:
        return data
    buf = bytearray(data)
    while len(buf) < n:
        try:
            chunk = await read(n - len(buf))
        except IncompleteReadError as exc:
            raise IncompleteReadError(str(exc), expected_bytes=n, received_bytes=len(buf)) from exc
        if not chunk:
            raise IncompleteReadError(
                "Connection closed", expected_bytes=n, received_bytes=len(buf)
            )
        buf += chunk
    return bytes(buf)


class FastYamuxStream(YamuxStream):
    """A yamux stream with lock-free reads and writes and go-yamux window updates."""

    def __init__(self, stream_id: int, conn: Yamux, is_initiator: bool) -> None:
        super().__init__(stream_id, conn, is_initiator)
        self._window_opened = trio.Event()
        # One write at a time: a write cut into several frames (send window exhausted, or
        # over MAX_FRAME_PAYLOAD) must reach the peer contiguous, or another task's write
        # lands inside it. py-libp2p's pubsub writes one stream per peer from several tasks.
        self._writing = trio.StrictFIFOLock()

    def window_grew(self) -> None:
        """Wake a writer waiting for send window (called when the peer grants more)."""
        self._window_opened.set()

    async def write(self, data: bytes) -> None:
        try:  # uncontended: no scheduler trip (the frame write checkpoints anyway)
            self._writing.acquire_nowait()
        except trio.WouldBlock:
            await self._writing.acquire()
        try:
            await self._write_frames(data)
        finally:
            self._writing.release()

    async def _write_frames(self, data: bytes) -> None:
        total = len(data)
        sent = 0
        while sent < total:
            if self.send_closed:
                raise MuxedStreamError("Stream is closed for sending")
            if self.closed:
                raise MuxedStreamError("Stream is closed")
            if self.send_window <= 0:
                await self._wait_for_window()
                continue
            size = min(self.send_window, MAX_FRAME_PAYLOAD, total - sent)
            self.send_window -= size
            header = _HEADER.pack(0, TYPE_DATA, 0, self.stream_id, size)
            if sent == 0 and size == total:
                frame = header + data
            else:
                frame = header + data[sent : sent + size]
            await self.conn._write_frame(frame)
            sent += size

    async def _wait_for_window(self) -> None:
        shaped = getattr(self.conn.secured_conn, "shaped", None) is not None
        with trio.move_on_after(math.inf if shaped else WINDOW_WAIT_LIMIT) as scope:
            while self.send_window <= 0 and not self.closed:
                self._window_opened = trio.Event()
                # Woken by a window update; the short timeout notices a stream or
                # connection closed under us (those paths are the library's).
                with trio.move_on_after(0.05):
                    await self._window_opened.wait()
        if scope.cancelled_caught:
            raise MuxedStreamError("Timed out waiting for window update after 5 seconds.")

    async def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            return await super().read(n)  # "read everything": rare, the library's path
        if n == 0:
            return b""
        conn = self.conn
        sid = self.stream_id
        while True:
            # Yamux.read_stream's checks in its order, but a stream the peer reset (or
            # whose connection died) reads as reset, not as a clean EOF, even once its
            # bookkeeping is gone.
            if sid not in conn.streams:
                if self.reset_received:
                    raise MuxedStreamReset("Stream was reset")
                raise MuxedStreamEOF("Stream closed")
            if conn.event_shutting_down.is_set():
                raise MuxedStreamEOF("Connection shut down")
            buffer = conn.stream_buffers.get(sid)
            if buffer is None:
                if self.reset_received:
                    raise MuxedStreamReset("Stream was reset")
                raise MuxedStreamEOF("Stream buffer closed")
            if buffer and (self.recv_closed or not self.reset_received):
                if n >= len(buffer):
                    data = bytes(buffer)
                    buffer.clear()
                else:
                    data = bytes(buffer[:n])
                    del buffer[:n]
                if self.closed:
                    conn._finalize_stream_locked(self, fully_closed=True)
                await self._auto_tune_and_send_window_update(bytes_read=len(data))
                return data
            if self.reset_received:
                raise MuxedStreamReset("Stream was reset")
            if self.recv_closed:
                raise MuxedStreamEOF("Stream is closed for receiving")
            if self.closed:
                raise MuxedStreamReset("Stream is reset or closed")
            event = conn.stream_events.get(sid)
            if event is None:
                raise MuxedStreamEOF("Stream was removed")
            await event.wait()
            if sid in conn.stream_events:
                conn.stream_events[sid] = trio.Event()

    async def _auto_tune_and_send_window_update(self, *, bytes_read: int = 0) -> None:
        # go-yamux: grant once the consumed-but-not-granted bytes reach half the
        # target window (auto-tuning the target up when that happens quickly).
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        consumed = self.target_recv_window - (self.recv_window + buffered)
        if consumed <= 0 or consumed < self.target_recv_window // 2:
            return
        delta = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
        self._pending_recv_release = 0
        if delta > 0:
            await self.send_window_update(delta)


class FastYamux(Yamux):
    """py-libp2p's Yamux with the hot paths of :mod:`p2p._yamux` (same wire protocol)."""

    async def _write_frame(self, data: bytes) -> None:
        try:
            self._write_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._write_lock.acquire()
        try:
            await self.secured_conn.write(data)
        finally:
            self._write_lock.release()
        # The secured write is cancel-shielded; cancellation lands here, between frames.
        await trio.lowlevel.checkpoint_if_cancelled()

    async def open_stream(self) -> FastYamuxStream:
        await self.stream_backlog_semaphore.acquire()
        async with self.streams_lock:
            if self.event_shutting_down.is_set():
                self.stream_backlog_semaphore.release()
                raise MuxedStreamError("Connection is shutting down")
            stream_id = self.next_stream_id
            self.next_stream_id += 2
            stream = FastYamuxStream(stream_id, self, True)
            stream._owns_backlog_slot = True
            self.streams[stream_id] = stream
            self.stream_buffers[stream_id] = bytearray()
            self.stream_events[stream_id] = trio.Event()
        syn = _HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_SYN, stream_id, 0)
        opened = False
        try:
            await self._write_frame(syn)
            opened = True
        except IOException as exc:
            raise MuxedStreamError(f"Failed to send SYN: {exc}") from exc
        finally:
            if not opened:
                self.stream_backlog_semaphore.release()
                stream._backlog_slot_released = True
                self.streams.pop(stream_id, None)
                self.stream_buffers.pop(stream_id, None)
                self.stream_events.pop(stream_id, None)
        return stream

    async def handle_incoming(self) -> None:
        # Ends when close() sets event_shutting_down, or with a cleanup on any way the
        # connection can fail (the library's behaviour; cleanup calls on_close).
        while not self.event_shutting_down.is_set():
            try:
                header = await _read_exactly(self.secured_conn, HEADER_SIZE)
                _, typ, flags, stream_id, length = _HEADER.unpack(header)
                if typ == TYPE_DATA and length > MAX_WINDOW_SIZE:
                    logger.warning(
                        "yamux: peer %s sent a %d-byte DATA frame; closing the connection",
                        self.peer_id,
                        length,
                    )
                    break
                if typ in (TYPE_DATA, TYPE_WINDOW_UPDATE):
                    if flags & FLAG_SYN:
                        await self._on_syn(typ, flags, stream_id, length)
                    elif typ == TYPE_DATA:
                        body = await self._read_body(length) if length else b""
                        self._on_data(stream_id, flags, body)
                    else:
                        self._on_window_update(stream_id, flags, length)
                elif typ == TYPE_PING:
                    await self._on_ping(flags, length)
                elif typ == TYPE_GO_AWAY:
                    level = logging.DEBUG if length == GO_AWAY_NORMAL else logging.INFO
                    logger.log(level, "yamux: GO_AWAY (%d) from %s", length, self.peer_id)
                    break
            except IncompleteReadError as exc:
                if exc.is_clean_close:
                    logger.debug("yamux connection to %s closed cleanly", self.peer_id)
                else:
                    logger.info("yamux connection to %s ended mid-frame: %s", self.peer_id, exc)
                break
            except _CONNECTION_GONE as exc:
                logger.debug("yamux connection to %s lost: %r", self.peer_id, exc)
                break
        else:
            return
        await self._cleanup_on_error()

    async def _read_body(self, length: int) -> bytes:
        conn = self.secured_conn
        if isinstance(conn, NoiseSession) and conn.buffered_bytes >= length:
            return await conn.read(length)  # already here: no deadline to arm
        with trio.fail_after(DATA_BODY_TIMEOUT):
            return await _read_exactly(self.secured_conn, length)

    def _deliver(self, stream: YamuxStream, body: bytes) -> None:
        buffer = self.stream_buffers.get(stream.stream_id)
        if buffer is None:
            return  # finalized under us; nobody will read it
        buffer.extend(body)
        stream.recv_window -= len(body)
        if stream.recv_window < 0:
            logger.warning(
                "yamux stream %d: peer %s exceeded the receive window by %d bytes",
                stream.stream_id,
                self.peer_id,
                -stream.recv_window,
            )
            stream.recv_window = 0

    def _grow_window(self, stream: YamuxStream, increment: int) -> None:
        stream.send_window += increment
        if isinstance(stream, FastYamuxStream):
            stream.window_grew()

    def _wake_reader(self, stream_id: int) -> None:
        event = self.stream_events.get(stream_id)
        if event is not None:
            event.set()

    def _on_flags(self, stream: YamuxStream, flags: int) -> None:
        """FIN / RST on a DATA or WINDOW_UPDATE frame (the stream's event already set)."""
        if flags & FLAG_FIN:
            stream.recv_closed = True
            if stream.send_closed:
                stream.closed = True
        if flags & FLAG_RST:
            stream.closed = True
            stream.reset_received = True
        if flags & (FLAG_FIN | FLAG_RST):
            self._wake_reader(stream.stream_id)
            if isinstance(stream, FastYamuxStream):
                stream.window_grew()  # wake a writer so it sees the stream end
        if stream.closed:
            self._finalize_stream_locked(stream, fully_closed=True)

    def _on_data(self, stream_id: int, flags: int, body: bytes) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # a stream we no longer track: drop, as the library does
        if flags & FLAG_ACK:
            if body:
                self._deliver(stream, body)
                self._wake_reader(stream_id)
            return
        self._deliver(stream, body)
        self._wake_reader(stream_id)
        self._on_flags(stream, flags)

    def _on_window_update(self, stream_id: int, flags: int, increment: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if increment > 0:
            self._grow_window(stream, increment)
        if flags & FLAG_ACK:
            return
        self._on_flags(stream, flags)

    async def _on_syn(self, typ: int, flags: int, stream_id: int, length: int) -> None:
        """A new inbound stream (SYN on DATA or WINDOW_UPDATE), as the library does it."""
        payload = b""
        payload_lost = False
        if typ == TYPE_DATA and length > 0:
            try:
                payload = await self._read_body(length)
            except IncompleteReadError as exc:
                logger.info("yamux: SYN data for stream %d cut short: %s", stream_id, exc)
                payload_lost = True
        reply: bytes | None = None
        notify: YamuxStream | None = None
        async with self.streams_lock:
            if stream_id in self.streams:
                reply = _HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0)
            else:
                stream = FastYamuxStream(stream_id, self, False)
                self.streams[stream_id] = stream
                self.stream_buffers[stream_id] = bytearray()
                self.stream_events[stream_id] = trio.Event()
                if payload_lost:
                    stream.recv_closed = True
                    stream.closed = True
                    self.stream_events[stream_id].set()
                elif typ == TYPE_WINDOW_UPDATE and length > 0:
                    self._grow_window(stream, length)
                elif payload:
                    self._deliver(stream, payload)
                    self.stream_events[stream_id].set()
                if flags & FLAG_FIN:
                    stream.recv_closed = True
                    if stream.send_closed:
                        stream.closed = True
                    self.stream_events[stream_id].set()
                    if stream.closed:
                        self._finalize_stream_locked(stream, fully_closed=True)
                if flags & FLAG_RST:
                    # Reset on arrival: deliver it so accept_stream sees it, no ACK.
                    stream.closed = True
                    stream.reset_received = True
                    self.stream_events[stream_id].set()
                    self._finalize_stream_locked(stream, fully_closed=True)
                else:
                    reply = _HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_ACK, stream_id, 0)
                notify = stream
        if reply is not None:
            await self._write_frame(reply)
        if notify is not None:
            await self.new_stream_send_channel.send(notify)

    async def _on_ping(self, flags: int, value: int) -> None:
        if flags & FLAG_SYN:
            await self._write_frame(_HEADER.pack(0, TYPE_PING, FLAG_ACK, 0, value))
        elif flags & FLAG_ACK:
            sample = trio.current_time() - self._ping_sent_time
            self._rtt = sample if self._rtt == 0.0 else (self._rtt + sample) / 2
            self._ping_event.set()


class _FastMuxerMultistream(MuxerMultistream):
    """Muxer negotiation that builds a :class:`FastYamux` for ``/yamux/1.0.0``.

    py-libp2p's ``MuxerMultistream.new_conn`` constructs its own ``Yamux`` for that
    protocol whatever class the muxer map names, so the map alone cannot swap it.
    """

    async def new_conn(self, conn: ISecureConn, peer_id: ID) -> IMuxedConn:
        protocol, transport_class = await self._selector.select(
            conn, conn.is_initiator, self.negotiate_timeout
        )
        muxed: IMuxedConn
        if protocol == PROTOCOL_ID:
            muxed = FastYamux(conn, peer_id, is_initiator=conn.is_initiator)
        else:
            muxed = transport_class(conn, peer_id)
        return self._annotate_connection(muxed, conn, protocol)


def use_fast_yamux(host: IHost) -> None:
    """Make ``host`` (not yet running) speak yamux through :class:`FastYamux`.

    Raises:
        TypeError: the host's network has no transport upgrader to configure.
    """
    upgrader = getattr(host.get_network(), "upgrader", None)
    current = getattr(upgrader, "muxer_multistream", None)
    if not isinstance(current, MuxerMultistream):
        raise TypeError("this libp2p host has no muxer negotiation to configure")
    fast = _FastMuxerMultistream({TProtocol(PROTOCOL_ID): FastYamux}, current.negotiate_timeout)
    upgrader.muxer_multistream = fast  # type: ignore[union-attr]
