"""Byte streams: the one interface the session and RPC layers need, and its adapters.

:class:`ByteStream` is a minimal, trio-flavoured stream contract: ``receive_some``
returns ``b""`` at a clean EOF and raises :class:`BrokenStreamError` when the stream
broke. Two adapters implement it:

* :class:`Libp2pByteStream` over a py-libp2p ``INetStream``. It maps libp2p's zoo of
  exceptions (``StreamEOF``, ``StreamReset``, ``StreamClosed``, ``MuxedStream*``,
  trio resource errors...) onto ours, explicitly, so nothing above ever meets them.
  Reads and writes go straight to the muxed stream under the ``NetStream``: the
  ``NetStream`` wraps each in a state lock (a scheduler trip each, and contention
  between a session's reader and writer) to track a state we keep ourselves;
  closing and resetting still go through it, so the swarm's bookkeeping is kept.
* :class:`TrioByteStream` over any ``trio.abc.Stream`` (memory streams in tests, a
  plain TCP socket in the benchmark).
"""

from __future__ import annotations

from typing import Protocol

import trio
from libp2p.abc import IMuxedStream, INetStream
from libp2p.io.exceptions import IOException
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.network.stream.net_stream import NetStream
from libp2p.stream_muxer.exceptions import MuxedConnError, MuxedStreamEOF, MuxedStreamError

from p2p._errors import BrokenStreamError, RemoteProtocolError
from p2p._peer_id import PeerId
from p2p._select import Answer

__all__ = ["ByteStream", "Libp2pByteStream", "TrioByteStream"]

# Everything py-libp2p's NetStream/Yamux raise for a stream that is gone: reset,
# closed, connection lost. (StreamEOF is handled first: it is a clean EOF.)
_LIBP2P_BROKEN: tuple[type[BaseException], ...] = (
    IOException,  # StreamError, StreamReset, StreamClosed, ConnectionClosedError, ...
    MuxedStreamError,
    MuxedConnError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


# How long a FIN or RST may wait for the connection's write lock before we give up.
_CONTROL_WRITE_TIMEOUT = 2.0


class ByteStream(Protocol):
    """A reliable, ordered byte stream to one peer."""

    @property
    def remote_peer(self) -> PeerId | None:
        """The authenticated peer at the other end (None for anonymous test streams)."""
        ...

    async def receive_some(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` at a clean EOF.

        Raises:
            BrokenStreamError: the stream was reset or the connection lost.
        """
        ...

    async def send_all(self, data: bytes) -> None:
        """Write all of ``data``.

        Raises:
            BrokenStreamError: the stream was reset, closed or the connection lost.
        """
        ...

    async def send_eof(self) -> None:
        """Half-close: the peer reads EOF after what we sent."""
        ...

    async def aclose(self) -> None:
        """Close gracefully (pending data is still delivered)."""
        ...

    async def reset(self) -> None:
        """Abort: discard the stream in both directions."""
        ...


class Libp2pByteStream:
    """:class:`ByteStream` over a py-libp2p stream."""

    __slots__ = ("_stream", "_muxed", "_peer", "_eof", "_done", "_answer")

    def __init__(self, stream: INetStream, *, answer: Answer | None = None) -> None:
        """`answer`: the stream was opened lazily (`p2p/_select.py`), and the first reads
        must find the peer's acceptance of the proposed protocol before its data."""
        self._stream = stream
        self._muxed: IMuxedStream | INetStream = getattr(stream, "muxed_stream", stream)
        self._peer = PeerId.from_bytes(stream.muxed_conn.peer_id.to_bytes())
        self._eof = False
        self._done = False  # closed or reset: further close/reset calls are no-ops
        self._answer = answer

    @property
    def remote_peer(self) -> PeerId:
        """The peer authenticated by the Noise handshake."""
        return self._peer

    @property
    def protocol(self) -> str | None:
        """The negotiated protocol id."""
        proto = self._stream.get_protocol()
        return None if proto is None else str(proto)

    async def receive_some(self, max_bytes: int) -> bytes:
        """Raises `RemoteProtocolError` if the peer refused a lazily proposed protocol."""
        while self._answer is not None:
            data = await self._read(max_bytes)
            if not data:
                raise RemoteProtocolError(f"stream from {self._peer.short()} ended before "
                                          "accepting its protocol")
            rest = self._answer.feed(data)
            if rest is not None:
                self._answer = None
                if rest:
                    return rest
        return await self._read(max_bytes)

    async def _read(self, max_bytes: int) -> bytes:
        if self._eof:
            return b""
        try:
            data = await self._muxed.read(max_bytes)
        except (StreamEOF, MuxedStreamEOF):
            self._eof = True
            return b""
        except _LIBP2P_BROKEN as exc:
            raise BrokenStreamError(f"stream from {self._peer.short()} broke: {exc!r}") from exc
        if not data:
            self._eof = True
        return data

    async def send_all(self, data: bytes) -> None:
        try:
            await self._muxed.write(data)
        except _LIBP2P_BROKEN as exc:
            raise BrokenStreamError(f"stream to {self._peer.short()} broke: {exc!r}") from exc
        except trio.Cancelled:
            # Yamux writes a large buffer as several frames: part of it may be on the
            # wire. Reset, so the peer sees a broken stream rather than a short frame
            # followed by unrelated bytes.
            with trio.CancelScope(shield=True):
                await self.reset()
            raise

    async def send_eof(self) -> None:
        # Shielded: a cancelled FIN would leave the peer waiting forever.
        with trio.CancelScope(shield=True), trio.move_on_after(_CONTROL_WRITE_TIMEOUT):
            try:
                if isinstance(self._stream, NetStream):
                    await self._stream.close_write()
                else:
                    await self._stream.close()
            except _LIBP2P_BROKEN as exc:
                raise BrokenStreamError(f"stream to {self._peer.short()} broke: {exc!r}") from exc

    async def aclose(self) -> None:
        if self._done:
            return
        self._done = True
        # Shielded: yamux marks the stream closed even when the FIN write is cancelled,
        # and the peer would then wait forever.
        with trio.CancelScope(shield=True), trio.move_on_after(_CONTROL_WRITE_TIMEOUT):
            try:
                await self._stream.close()
            except _LIBP2P_BROKEN:
                await self._stream.reset()

    async def reset(self) -> None:
        if self._done:
            return
        self._done = True
        # Shielded for the same reason as aclose (a lost RST leaves the peer's reader
        # blocked until the connection dies); bounded in case the connection is stuck.
        with trio.CancelScope(shield=True), trio.move_on_after(_CONTROL_WRITE_TIMEOUT):
            await self._stream.reset()


class TrioByteStream:
    """:class:`ByteStream` over a ``trio.abc.Stream`` (tests, baselines)."""

    __slots__ = ("_stream", "_peer")

    def __init__(self, stream: trio.abc.Stream, *, remote_peer: PeerId | None = None) -> None:
        self._stream = stream
        self._peer = remote_peer

    @property
    def remote_peer(self) -> PeerId | None:
        return self._peer

    async def receive_some(self, max_bytes: int) -> bytes:
        try:
            return await self._stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise BrokenStreamError(f"stream broke: {exc!r}") from exc

    async def send_all(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise BrokenStreamError(f"stream broke: {exc!r}") from exc

    async def send_eof(self) -> None:
        if isinstance(self._stream, trio.abc.HalfCloseableStream):
            try:
                await self._stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise BrokenStreamError(f"stream broke: {exc!r}") from exc

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def reset(self) -> None:
        await trio.aclose_forcefully(self._stream)
