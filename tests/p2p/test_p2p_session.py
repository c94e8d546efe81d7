"""SessionStream over in-memory streams: deterministic heartbeat, credit and close tests."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from p2p import (
    BrokenStreamError,
    Framer,
    Identity,
    Message,
    PeerDeadError,
    RemoteProtocolError,
    SessionConfig,
    SessionStream,
    StreamClosedError,
    TrioByteStream,
    message,
    session_context,
)


@message("test.Step", 1)
@dataclass(frozen=True, slots=True)
class Step(Message):
    seq: int
    data: bytes = b""


PEER = Identity.from_seed(b"\x02" * 32).peer_id
CONFIG = SessionConfig(dead_after=2.0, window_bytes=512 * 1024)


@asynccontextmanager
async def session_pair(
    config: SessionConfig = CONFIG,
) -> AsyncIterator[tuple[SessionStream, SessionStream]]:
    left, right = trio.testing.memory_stream_pair()
    async with (
        session_context(TrioByteStream(left, remote_peer=PEER), config=config) as a,
        session_context(TrioByteStream(right, remote_peer=PEER), config=config) as b,
    ):
        yield a, b


async def test_messages_flow_both_ways_in_order() -> None:
    async with session_pair() as (a, b):
        for i in range(50):
            await a.send(Step(seq=i))
        assert [(await b.receive()).seq for _ in range(50)] == list(range(50))  # type: ignore[attr-defined]
        await b.send(Step(seq=99))
        assert await a.receive() == Step(seq=99)


async def test_clean_close_delivers_pending_then_ends() -> None:
    left, right = trio.testing.memory_stream_pair()
    async with session_context(TrioByteStream(right), config=CONFIG) as b:
        async with session_context(TrioByteStream(left), config=CONFIG) as a:
            await a.send(Step(seq=1))
            await a.send(Step(seq=2))
        assert [m async for m in b] == [Step(seq=1), Step(seq=2)]
        with pytest.raises(StreamClosedError):
            await b.receive()


async def test_exception_in_body_is_a_broken_session_for_the_peer() -> None:
    left, right = trio.testing.memory_stream_pair()
    async with session_context(TrioByteStream(right), config=CONFIG) as b:
        with pytest.raises(KeyError):  # re-raised as itself, not as an ExceptionGroup
            async with session_context(TrioByteStream(left), config=CONFIG) as a:
                await a.send(Step(seq=1))
                raise KeyError("boom")
        assert await b.receive() == Step(seq=1)
        with pytest.raises(BrokenStreamError):
            await b.receive()


async def test_frozen_peer_is_declared_dead(autojump_clock: trio.testing.MockClock) -> None:
    left, right = trio.testing.memory_stream_pair()  # `right` never says anything
    async with session_context(TrioByteStream(left, remote_peer=PEER), config=CONFIG) as a:
        start = trio.current_time()
        with pytest.raises(PeerDeadError):
            await a.receive()
        assert CONFIG.dead_after <= trio.current_time() - start < CONFIG.dead_after + 0.1
        with pytest.raises(PeerDeadError):
            await a.send(Step(seq=1))
    await right.aclose()


async def test_idle_sessions_stay_alive_on_heartbeats(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with session_pair() as (a, b):
        await trio.sleep(60)
        await a.send(Step(seq=1))
        assert await b.receive() == Step(seq=1)
        assert a.statistics().pings_sent >= 60 / (CONFIG.dead_after / 4) - 2


async def test_a_stricter_peer_gets_pinged_often_enough(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A client declaring servers dead after 1 s, a server pinging every 5 s / 4 when idle:
    # the server learns the client's limit from its first ping and pings four times within it.
    strict, lax = SessionConfig(dead_after=1.0), SessionConfig(dead_after=5.0)
    left, right = trio.testing.memory_stream_pair()
    async with (
        session_context(TrioByteStream(left, remote_peer=PEER), config=strict) as a,
        session_context(TrioByteStream(right, remote_peer=PEER), config=lax) as b,
    ):
        await trio.sleep(30)
        await b.send(Step(seq=1))
        assert await a.receive() == Step(seq=1)  # not declared dead meanwhile
        assert b.statistics().pings_sent >= 30 / 0.25 - 2


async def test_slow_reader_stalls_the_writer_not_the_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    chunk = b"x" * 64 * 1024
    total = 64
    async with session_pair() as (a, b):

        async def writer() -> None:
            for i in range(total):
                await a.send(Step(seq=i, data=chunk))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.sleep(30)  # the reader pauses far longer than yamux's 5 s
            stats = b.statistics()
            assert stats.queued_messages * len(chunk) <= CONFIG.window_bytes + 2 * len(chunk)
            assert a.statistics().messages_sent < total  # the writer is waiting for credit
            assert a.statistics().error is None
            got = [await b.receive() for _ in range(total)]
        assert [m.seq for m in got] == list(range(total))  # type: ignore[attr-defined]


async def test_peer_sending_garbage_is_reported_and_named(caplog: pytest.LogCaptureFixture) -> None:
    left, right = trio.testing.memory_stream_pair()
    caplog.set_level(logging.WARNING, logger="p2p")
    async with session_context(TrioByteStream(left, remote_peer=PEER), config=CONFIG) as a:
        await right.send_all(Framer().send(Step(seq=7)) + b"\x00\x00\x00\x05\x00\x00\x00\x00junk!")
        assert await a.receive() == Step(seq=7)
        with pytest.raises(RemoteProtocolError, match="checksum"):
            await a.receive()
    assert str(PEER) in caplog.text
    await right.aclose()


async def test_receive_after_local_close() -> None:
    async with session_pair() as (a, _b):
        await a.aclose()
        with pytest.raises(StreamClosedError):
            await a.receive()
        with pytest.raises(StreamClosedError):
            await a.send(Step(seq=1))


class _HalfClosing(trio.abc.Stream):
    """Closing sends EOF and keeps reading, as a yamux stream's close does."""

    def __init__(self, send: trio.abc.SendStream, receive: trio.abc.ReceiveStream) -> None:
        self._send, self._receive = send, receive

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._send.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._send.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._receive.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._send.aclose()


async def test_messages_arriving_after_a_local_close_are_dropped() -> None:
    """A peer that sent its next message before our goodbye reached it: the message lands
    after our close, on a stream that still reads. It has no reader left here; it must not
    fail the session's reader (it did, with `ClosedResourceError`, in CI)."""
    a_to_b_send, a_to_b_recv = trio.testing.memory_stream_one_way_pair()
    b_to_a_send, b_to_a_recv = trio.testing.memory_stream_one_way_pair()
    a_end = TrioByteStream(trio.StapledStream(a_to_b_send, b_to_a_recv), remote_peer=PEER)
    b_end = TrioByteStream(_HalfClosing(b_to_a_send, a_to_b_recv), remote_peer=PEER)
    async with session_context(a_end, config=CONFIG) as a, \
            session_context(b_end, config=CONFIG) as b:
        await b.aclose()
        await a.send(Step(seq=1))  # written before a reads b's goodbye
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(StreamClosedError):
            await b.receive()
