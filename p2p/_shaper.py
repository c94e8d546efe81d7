"""WAN emulation in user space: a one-way delay and a bandwidth cap per link.

Theory of operation
-------------------
A real link serializes bytes at its bandwidth, one message after the other, and each
byte then spends the propagation delay in flight. The sender is held back only by the
bandwidth (its socket buffer fills), never by the delay: messages sent at ``t`` arrive
at ``t + delay + serialization``, pipelined and in order.

:class:`LinkSchedule` is that model as plain arithmetic (sans-IO, any clock): ``push``
returns the time a message is *due* at the far end, ``admit_at`` the time a sender
may queue its next message (back-pressure: at most ``buffer_bytes`` of serialization
backlog, like a socket send buffer).

:class:`ShapedWriter` is the trio part. ``send`` waits for admission, stamps the
message with its due time and queues it; one pump task per link, started in a nursery
the owner provides, writes each message to the real transport at its due time. The
pump is the only writer, so order on the wire is queue order.

The host shapes at the connection level (:mod:`p2p._security`): every byte a host
sends to another process -- session streams, RPC, gossip, DHT, the muxer's own frames
-- goes through its connection's :class:`ShapedWriter`, so one link is one FIFO with
one bandwidth budget, as on a real network. Bytes are counted as the muxer writes them
(payload plus yamux headers), not the Noise and TCP framing underneath.

Errors and ownership: a write error in the pump (connection lost) is stored, the queue
is closed, and the next ``send`` raises :class:`trio.BrokenResourceError`. ``aclose``
lets queued messages go out (bounded by ``flush_timeout``) so data sent just before a
close still arrives before the close does, then stops the pump.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

__all__ = ["DEFAULT_BUFFER_BYTES", "LinkSchedule", "LinkShaper", "ShapedWriter"]

logger = logging.getLogger(__name__)

# Serialization backlog a sender may build before it blocks (a socket send buffer).
DEFAULT_BUFFER_BYTES = 256 * 1024


@dataclass(slots=True)
class LinkSchedule:
    """Due times of messages on one link with a fixed delay and an optional bandwidth.

    Attributes:
        delay_s: one-way propagation delay added to every message.
        bandwidth_bps: bytes per second serialized onto the link (0 = unlimited).
        buffer_bytes: serialization backlog a sender may queue before it must wait.
        busy_until: when the link finishes serializing what is already queued.
    """

    delay_s: float
    bandwidth_bps: float = 0.0
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    busy_until: float = -math.inf

    def __post_init__(self) -> None:
        if self.delay_s < 0 or self.bandwidth_bps < 0 or self.buffer_bytes < 0:
            raise ValueError("delay, bandwidth and buffer must be >= 0")

    def serialization_s(self, nbytes: int) -> float:
        """Seconds the link takes to put ``nbytes`` on the wire."""
        return nbytes / self.bandwidth_bps if self.bandwidth_bps > 0 else 0.0

    def admit_at(self, now: float) -> float:
        """Earliest time a new message may be queued (``now`` when there is room)."""
        if self.bandwidth_bps <= 0:
            return now
        return max(now, self.busy_until - self.buffer_bytes / self.bandwidth_bps)

    def push(self, now: float, nbytes: int) -> float:
        """Queue ``nbytes`` at ``now``; the time they are due at the far end.

        Due times never decrease, so writing in queue order at due times keeps FIFO.
        """
        start = max(now, self.busy_until)
        self.busy_until = start + self.serialization_s(nbytes)
        return self.busy_until + self.delay_s


Write = Callable[[bytes], Awaitable[None]]


class ShapedWriter:
    """Delays and paces writes to one link; see the module docstring.

    Args:
        write: writes one message to the real transport (called by the pump only).
        schedule: the link model.
        broken: exception types from ``write`` that mean the link is gone; they end the
            pump quietly (anything else is a bug and propagates to the nursery).
        name: names the link in log lines.
    """

    def __init__(
        self,
        write: Write,
        schedule: LinkSchedule,
        *,
        broken: tuple[type[BaseException], ...] = (),
        name: str = "link",
    ) -> None:
        self._write = write
        self.schedule = schedule
        self._broken = broken
        self.name = name
        self._send, self._queue = trio.open_memory_channel[tuple[float, bytes]](math.inf)
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._started = False
        self.error: BaseException | None = None
        self.messages_sent = 0
        self.bytes_sent = 0

    def start(self, nursery: trio.Nursery) -> None:
        """Start the pump in ``nursery`` (the owner's lifetime bounds the link's)."""
        nursery.start_soon(self._pump)
        self._started = True

    async def send(self, data: bytes) -> None:
        """Queue ``data``: waits only for bandwidth back-pressure, never for the delay.

        Raises:
            trio.BrokenResourceError: the link failed or is closed.
        """
        now = trio.current_time()
        admit = self.schedule.admit_at(now)
        if admit > now:
            await trio.sleep_until(admit)
            now = trio.current_time()
        if self.error is not None:
            raise trio.BrokenResourceError(f"{self.name} broke: {self.error!r}")
        due = self.schedule.push(now, len(data))
        try:
            self._send.send_nowait((due, data))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise trio.BrokenResourceError(f"{self.name} is closed") from exc

    async def aclose(self, flush_timeout: float = 2.0) -> None:
        """Stop accepting messages, let queued ones go out, then stop the pump.

        Idempotent. Queued messages still undelivered after ``flush_timeout`` seconds
        beyond the last due time are dropped.
        """
        self._send.close()
        if not self._started:
            return
        deadline = max(self.schedule.busy_until + self.schedule.delay_s, trio.current_time())
        with trio.move_on_after(flush_timeout + (deadline - trio.current_time())):
            await self._done.wait()
        self._scope.cancel()

    async def _pump(self) -> None:
        with self._scope:
            try:
                async for due, data in self._queue:
                    await trio.sleep_until(due)
                    await self._write(data)
                    self.messages_sent += 1
                    self.bytes_sent += len(data)
            except self._broken as exc:
                self.error = exc
                logger.debug("shaped %s stopped: %r", self.name, exc)
            finally:
                self._queue.close()
                self._done.set()


class LinkShaper:
    """Hands out one :class:`ShapedWriter` per link, their pumps in one owner's nursery.

    Args:
        delay_s: one-way delay of every link (0 = none).
        bandwidth_bps: bytes per second of every link (0 = unlimited).
        buffer_bytes: serialization backlog a sender may queue before it waits.
    """

    def __init__(
        self,
        *,
        delay_s: float = 0.0,
        bandwidth_bps: float = 0.0,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ) -> None:
        LinkSchedule(delay_s, bandwidth_bps, buffer_bytes)  # validates
        self.delay_s = delay_s
        self.bandwidth_bps = bandwidth_bps
        self.buffer_bytes = buffer_bytes
        self._nursery: trio.Nursery | None = None

    @property
    def enabled(self) -> bool:
        """Whether links are shaped at all (otherwise :meth:`link` returns None)."""
        return self.delay_s > 0 or self.bandwidth_bps > 0

    def bind(self, nursery: trio.Nursery) -> None:
        """Run future pumps in ``nursery``; it must outlive every shaped link."""
        self._nursery = nursery

    def link(
        self, write: Write, *, broken: tuple[type[BaseException], ...] = (), name: str = "link"
    ) -> ShapedWriter | None:
        """A running shaped writer in front of ``write``, or None when shaping is off.

        Raises:
            trio.ClosedResourceError: no nursery bound, or it no longer takes tasks.
        """
        if not self.enabled:
            return None
        if self._nursery is None:
            raise trio.ClosedResourceError("link shaper is not running")
        schedule = LinkSchedule(self.delay_s, self.bandwidth_bps, self.buffer_bytes)
        writer = ShapedWriter(write, schedule, broken=broken, name=name)
        try:
            writer.start(self._nursery)
        except RuntimeError as exc:  # "Nursery is closed to new arrivals"
            raise trio.ClosedResourceError("link shaper has stopped") from exc
        return writer
