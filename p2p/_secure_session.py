"""The Noise transport session under every connection: atomic, batched, buffered.

Theory of operation
-------------------
After the Noise handshake, py-libp2p's ``SecureSession`` moves bytes between the muxer
and the TCP socket one Noise message at a time: every write is one socket send per
64 KiB message (a 64 KiB yamux frame is *two* messages, since a Noise message carries
at most 65,519 plaintext bytes), and every read is two socket reads (the 2-byte length,
then the body), each behind a lock of its own; each of those is a trio checkpoint, a
trip through the scheduler. :class:`NoiseSession` keeps the same wire format and the
same interface, and does the same work with fewer trips:

* **writes** encrypt a whole buffer into as many Noise messages as it needs and send
  them with one ``send_all``, under a cancel shield (see below);
* **reads** receive up to :data:`RECV_BYTES` at a time, decrypt every complete Noise
  message in that chunk into a plaintext buffer, and serve reads from it;
* both go straight to the ``trio.SocketStream`` when the connection is plain TCP, and
  through the raw connection's own ``read``/``write`` otherwise (e.g. under a PSK).

**Cancellation tears the connection** (py-libp2p 0.8.1, measured): Noise encrypts a
message, advancing its nonce, and then awaits the socket write; a write cancelled at
that await leaves a gap, the peer fails to authenticate every later message and drops
the whole connection with every stream on it. So each write runs under a cancel
shield: its messages are either entirely on the wire or not started, and cancellation
lands right after. A write that makes no progress for :data:`WRITE_STALL_TIMEOUT`
seconds (peer frozen with full TCP buffers) closes the connection instead of hanging:
after a half-written message nothing else may follow.

**WAN emulation**: with :attr:`NoiseSession.shaped` set (:mod:`p2p._shaper`), ``write``
only queues the bytes; the link's pump performs the atomic writes at their due times.

Errors follow py-libp2p's conventions, so its muxer handles them as before: a broken
socket or a failed decryption raises ``ConnectionClosedError``; a read at EOF returns
what it has or raises ``IncompleteReadError``.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError
from libp2p.security.secure_session import SecureSession
from noise.exceptions import (  # type: ignore[import-untyped]
    NoiseInvalidMessage,
    NoiseMaxNonceError,
)

from p2p._shaper import ShapedWriter

__all__ = ["NoiseSession", "WRITE_STALL_TIMEOUT", "RECV_BYTES", "MAX_PLAINTEXT"]

logger = logging.getLogger(__name__)

WRITE_STALL_TIMEOUT = 60.0
# Largest plaintext of one Noise transport message: 65535 minus the 16-byte tag.
MAX_PLAINTEXT = 65535 - 16
# Bytes asked of the socket per read (a few Noise messages).
RECV_BYTES = 256 * 1024


def _socket_of(conn: Any) -> trio.SocketStream | None:
    """The TCP socket under a Noise read-writer, if nothing sits in between."""
    raw = getattr(getattr(conn, "read_writer", None), "read_write_closer", None)
    sock = getattr(getattr(raw, "stream", None), "stream", None)
    return sock if isinstance(sock, trio.SocketStream) else None


class NoiseSession(SecureSession):
    """A Noise session with atomic, batched writes and buffered reads.

    Built from the session py-libp2p's Noise handshake returns (same keyword
    arguments as ``SecureSession``); the handshake reads exactly, so no byte of the
    transport phase is buffered anywhere else when this takes over.
    """

    shaped: ShapedWriter | None = None  # set by SafeNoise when link shaping is on

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._noise = self.conn.noise_state  # type: ignore[attr-defined]
        self._raw = self.conn.read_writer.read_write_closer  # type: ignore[attr-defined]
        self._socket = _socket_of(self.conn)
        self._cipher = bytearray()  # received, not yet decrypted
        self._plain = bytearray()  # decrypted, not yet read
        self._eof = False
        self._write_lock = trio.Lock()

    # -- writing ---------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        if self.shaped is None:
            await self.write_now(data)
            return
        try:
            await self.shaped.send(data)
        except trio.BrokenResourceError as exc:
            raise ConnectionClosedError(f"shaped link to {self.remote_peer} broke") from exc

    async def write_now(self, data: bytes) -> None:
        """Encrypt and send ``data`` at once, atomically (see the module docstring)."""
        if not data:
            return
        # Uncontended fast path: no scheduling round-trip for the lock.
        try:
            self._write_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._write_lock.acquire()
        try:
            wire = self._seal(data)
            # One scope: the shield keeps outer cancellation out, its own deadline
            # still fires (a stalled peer). Cancellation pending outside is delivered
            # at the caller's next checkpoint.
            deadline = trio.current_time() + WRITE_STALL_TIMEOUT
            with trio.CancelScope(shield=True, deadline=deadline) as guard:
                await self._send_raw(wire)
        finally:
            self._write_lock.release()
        if guard.cancelled_caught:
            logger.warning(
                "write to %s stalled %.0fs; closing the connection",
                self.remote_peer,
                WRITE_STALL_TIMEOUT,
            )
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await self.conn.close()
            raise ConnectionClosedError("write stalled; connection closed")

    def _seal(self, data: bytes) -> bytes:
        """``data`` as length-prefixed Noise messages, ready for the wire."""
        encrypt = self._noise.encrypt
        if len(data) <= MAX_PLAINTEXT:
            sealed: bytes = encrypt(bytes(data))
            return len(sealed).to_bytes(2, "big") + sealed
        parts: list[bytes] = []
        for start in range(0, len(data), MAX_PLAINTEXT):
            sealed = encrypt(bytes(data[start : start + MAX_PLAINTEXT]))
            parts.append(len(sealed).to_bytes(2, "big"))
            parts.append(sealed)
        return b"".join(parts)

    async def _send_raw(self, wire: bytes) -> None:
        if self._socket is None:
            await self._raw.write(wire)
            return
        try:
            await self._socket.send_all(wire)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosedError(f"connection to {self.remote_peer} lost: {exc}") from exc

    # -- reading ---------------------------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        """Decrypted bytes a ``read`` can return without waiting."""
        return len(self._plain)

    async def read(self, n: int | None = None) -> bytes:
        """Exactly ``n`` bytes (fewer only at EOF), or the next available bytes.

        Raises:
            IncompleteReadError: EOF with nothing left to return.
            ConnectionClosedError: the connection broke or a message failed to decrypt.
        """
        if n == 0:
            return b""
        plain = self._plain
        want = 1 if n is None else n
        while len(plain) < want and await self._decrypt_more():
            pass
        if not plain:
            raise IncompleteReadError("Connection closed", expected_bytes=want, received_bytes=0)
        if n is None or n >= len(plain):
            data = bytes(plain)
            plain.clear()
            return data
        with memoryview(plain) as view:
            data = bytes(view[:n])
        del plain[:n]  # bytearray drops a prefix without moving the rest
        return data

    async def _decrypt_more(self) -> bool:
        """Decrypt at least one more Noise message into the plaintext buffer.

        Returns False at EOF (at a message boundary).
        """
        buf = self._cipher
        while True:
            produced = False
            while len(buf) >= 2:
                end = 2 + ((buf[0] << 8) | buf[1])
                if len(buf) < end:
                    break
                with memoryview(buf) as view:
                    sealed = bytes(view[2:end])
                del buf[:end]
                try:
                    self._plain += self._noise.decrypt(sealed)
                except (NoiseInvalidMessage, NoiseMaxNonceError) as exc:
                    raise ConnectionClosedError(
                        f"Noise message from {self.remote_peer} failed to decrypt: {exc}"
                    ) from exc
                produced = True
            if produced:
                return True
            if self._eof:
                return False
            data = await self._receive_raw()
            if not data:
                self._eof = True
                if buf:
                    raise IncompleteReadError(
                        "Connection closed inside a Noise message",
                        expected_bytes=2 + ((buf[0] << 8) | buf[1]) if len(buf) >= 2 else 2,
                        received_bytes=len(buf),
                    )
                return False
            buf += data

    async def _receive_raw(self) -> bytes:
        if self._socket is None:
            data: bytes = await self._raw.read(RECV_BYTES)
            return data
        try:
            return await self._socket.receive_some(RECV_BYTES)
        except trio.ClosedResourceError:
            return b""  # closed locally: an EOF for the reader, as in py-libp2p
        except trio.BrokenResourceError as exc:
            raise ConnectionClosedError(f"connection to {self.remote_peer} lost: {exc}") from exc

    # -- closing ---------------------------------------------------------------------

    async def close(self) -> None:
        # A shaped link first lets what is in flight arrive (bounded), as TCP would.
        try:
            if self.shaped is not None:
                await self.shaped.aclose()
        finally:
            await self.conn.close()
