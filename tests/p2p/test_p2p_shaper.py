"""WAN emulation: the link schedule as arithmetic, the pump on a mock clock, real hosts."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import pytest
import trio
import trio.testing

from p2p import Host, HostConfig, Identity, Message, SessionStream, message, open_host
from p2p._shaper import LinkSchedule, LinkShaper, ShapedWriter

# --- the schedule (pure) -----------------------------------------------------------------


def test_delay_only_pipelines_every_message() -> None:
    link = LinkSchedule(delay_s=0.02)
    assert [link.push(10.0, 64) for _ in range(5)] == [10.02] * 5
    assert link.push(10.5, 1 << 20) == pytest.approx(10.52)
    assert link.admit_at(10.5) == 10.5  # no bandwidth cap: never any back-pressure


def test_bandwidth_serializes_fifo_then_adds_the_delay_once() -> None:
    link = LinkSchedule(delay_s=0.1, bandwidth_bps=1000.0)
    due = [link.push(0.0, 100) for _ in range(3)]  # 0.1 s of serialization each
    assert due == pytest.approx([0.2, 0.3, 0.4])
    assert link.busy_until == pytest.approx(0.3)
    # A message queued after the link went idle starts at once.
    previous = link.push(5.0, 100)
    assert previous == pytest.approx(5.2)
    # Due times never go backwards, so writing in queue order keeps FIFO.
    assert link.push(5.0, 0) >= previous


def test_back_pressure_once_the_buffer_is_full() -> None:
    link = LinkSchedule(delay_s=1.0, bandwidth_bps=1000.0, buffer_bytes=300)
    for _ in range(3):
        assert link.admit_at(0.0) == 0.0
        link.push(0.0, 100)
    assert link.admit_at(0.0) == pytest.approx(0.0)  # exactly 300 bytes queued: still room
    link.push(0.0, 100)
    assert link.admit_at(0.0) == pytest.approx(0.1)  # wait until 300 bytes are left
    assert link.admit_at(0.25) == 0.25
    assert LinkSchedule(0.0).busy_until == -math.inf


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delay_s": -1.0},
        {"delay_s": 0.0, "bandwidth_bps": -1.0},
        {"delay_s": 0.0, "buffer_bytes": -1},
    ],
)
def test_schedule_rejects_negative_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LinkSchedule(**kwargs)  # type: ignore[arg-type]


def test_host_config_bounds() -> None:
    with pytest.raises(ValueError):
        HostConfig(link_delay_s=11.0)
    with pytest.raises(ValueError):
        HostConfig(link_bandwidth_bps=-1.0)
    assert not LinkShaper().enabled
    assert LinkShaper().link(_never_called) is None


async def _never_called(data: bytes) -> None:
    raise AssertionError("shaping is off")


# --- the pump (mock clock) ---------------------------------------------------------------


@asynccontextmanager
async def shaped(
    schedule: LinkSchedule, arrivals: list[tuple[float, bytes]]
) -> AsyncIterator[ShapedWriter]:
    async def write(data: bytes) -> None:
        if data == b"boom":
            raise trio.BrokenResourceError("connection lost")
        arrivals.append((trio.current_time(), data))

    async with trio.open_nursery() as nursery:
        writer = ShapedWriter(write, schedule, broken=(trio.BrokenResourceError,))
        writer.start(nursery)
        yield writer
        await writer.aclose()


async def test_sender_is_not_blocked_by_the_delay(autojump_clock: trio.testing.MockClock) -> None:
    arrivals: list[tuple[float, bytes]] = []
    async with shaped(LinkSchedule(delay_s=0.5), arrivals) as writer:
        start = trio.current_time()
        for i in range(10):
            await writer.send(bytes([i]))
        assert trio.current_time() == start  # queued, not sent
        await trio.sleep(0.49)
        assert arrivals == []
        await trio.sleep(0.02)
    assert [data for _, data in arrivals] == [bytes([i]) for i in range(10)]
    assert all(at == pytest.approx(start + 0.5) for at, _ in arrivals)


async def test_bandwidth_paces_and_pushes_back(autojump_clock: trio.testing.MockClock) -> None:
    arrivals: list[tuple[float, bytes]] = []
    link = LinkSchedule(delay_s=0.1, bandwidth_bps=1000.0, buffer_bytes=200)
    async with shaped(link, arrivals) as writer:
        start = trio.current_time()
        for _ in range(5):
            await writer.send(b"x" * 100)
        # Three messages fit the backlog at once; the 4th and 5th waited for room.
        assert trio.current_time() - start == pytest.approx(0.2)
    times = [at - start for at, _ in arrivals]
    assert times == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6])
    assert writer.bytes_sent == 500


async def test_close_flushes_queued_messages(autojump_clock: trio.testing.MockClock) -> None:
    arrivals: list[tuple[float, bytes]] = []
    async with trio.open_nursery() as nursery:

        async def write(data: bytes) -> None:
            arrivals.append((trio.current_time(), data))

        writer = ShapedWriter(write, LinkSchedule(delay_s=1.0))
        writer.start(nursery)
        await writer.send(b"last words")
        await writer.aclose()
        assert [d for _, d in arrivals] == [b"last words"]
        with pytest.raises(trio.BrokenResourceError):
            await writer.send(b"too late")
        await writer.aclose()  # idempotent


async def test_a_broken_link_fails_later_sends(autojump_clock: trio.testing.MockClock) -> None:
    arrivals: list[tuple[float, bytes]] = []
    async with shaped(LinkSchedule(delay_s=0.1), arrivals) as writer:
        await writer.send(b"boom")
        await trio.sleep(0.2)
        assert isinstance(writer.error, trio.BrokenResourceError)
        with pytest.raises(trio.BrokenResourceError):
            await writer.send(b"after")


async def test_shaper_without_a_nursery_refuses_links() -> None:
    shaper = LinkShaper(delay_s=0.01)
    with pytest.raises(trio.ClosedResourceError):
        shaper.link(_never_called)
    async with trio.open_nursery() as nursery:
        shaper.bind(nursery)
        writer = shaper.link(_never_called)
        assert writer is not None
        await writer.aclose()
    with pytest.raises(trio.ClosedResourceError):  # the nursery has closed
        shaper.link(_never_called)


# --- real hosts on loopback --------------------------------------------------------------

LOCAL = HostConfig(
    listen_addrs=("/ip4/127.0.0.1/tcp/0",),
    enable_mdns=False,
    enable_dht=False,
    enable_pubsub=False,
    dial_timeout=5.0,
)
ECHO = "/test/shaped-echo/1"
SINK = "/test/shaped-sink/1"


@message("test.ShapedBlob", 1)
@dataclass(frozen=True, slots=True)
class Blob(Message):
    seq: int
    data: bytes = b""


@asynccontextmanager
async def shaped_pair(config: HostConfig) -> AsyncIterator[tuple[Host, Host, list[float]]]:
    """Two shaped hosts, ``b`` serving an echo and a sink (which logs arrival times)."""
    arrivals: list[float] = []

    async def echo(session: SessionStream) -> None:
        async for msg in session:
            await session.send(msg)

    async def sink(session: SessionStream) -> None:
        received = 0
        async for msg in session:
            arrivals.append(trio.current_time())
            if isinstance(msg, Blob):
                received += len(msg.data)
                if msg.seq < 0:
                    await session.send(Blob(seq=received))

    async with (
        open_host(Identity.generate(), config) as a,
        open_host(Identity.generate(), config) as b,
    ):
        b.set_session_handler(ECHO, echo)
        b.set_session_handler(SINK, sink)
        with trio.fail_after(10):
            await a.connect(b.listen_addrs()[0])
        yield a, b, arrivals


async def test_round_trip_takes_both_delays() -> None:
    async with shaped_pair(replace(LOCAL, link_delay_s=0.02)) as (a, b, _):
        with trio.fail_after(10):
            async with a.open_session(b.peer_id, ECHO) as session:
                rtts = []
                for i in range(5):
                    start = trio.current_time()
                    await session.send(Blob(seq=i, data=b"x" * 64))
                    assert await session.receive() == Blob(seq=i, data=b"x" * 64)
                    rtts.append(trio.current_time() - start)
    assert min(rtts) >= 0.040
    assert min(rtts) < 0.060  # the best of five; a busy machine may stretch one


async def test_back_to_back_messages_are_pipelined_in_order() -> None:
    delay = 0.05
    async with shaped_pair(replace(LOCAL, link_delay_s=delay)) as (a, b, arrivals):
        with trio.fail_after(10):
            async with a.open_session(b.peer_id, SINK) as session:
                start = trio.current_time()
                for i in range(20):
                    await session.send(Blob(seq=i, data=b"y" * 1000))
                await session.send(Blob(seq=-1))
                sent = trio.current_time() - start
                reply = await session.receive()
    assert reply == Blob(seq=20_000)  # all of them, in order (the sink counts them)
    assert sent < delay  # the sender never waited for the delay
    assert len(arrivals) == 21
    assert all(at - start >= delay for at in arrivals)
    # Twenty messages, one delay: pipelined, not 20 x 50 ms.
    assert arrivals[-1] - start < 2 * delay


async def test_bandwidth_cap_bounds_a_bulk_transfer() -> None:
    total = 256 * 1024
    config = replace(LOCAL, link_bandwidth_bps=1_000_000.0)
    async with shaped_pair(config) as (a, b, _):
        with trio.fail_after(20):
            async with a.open_session(b.peer_id, SINK) as session:
                start = trio.current_time()
                for i in range(4):
                    await session.send(Blob(seq=i, data=b"z" * (total // 4)))
                await session.send(Blob(seq=-1))
                assert await session.receive() == Blob(seq=total)
                elapsed = trio.current_time() - start
    assert elapsed >= total / 1_000_000.0
    assert elapsed < 5.0


async def test_rpc_and_dials_are_shaped_too() -> None:
    delay = 0.02
    async with shaped_pair(replace(LOCAL, link_delay_s=delay)) as (a, b, _):
        with trio.fail_after(10):
            start = trio.current_time()
            stream = await a.open_stream(b.peer_id, ECHO)  # multistream-select: one round trip
            assert trio.current_time() - start >= 2 * delay
            await stream.reset()
