"""NoiseSession and FastYamux over an in-memory pipe (a fake cipher, no sockets)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamReset
from noise.exceptions import NoiseInvalidMessage  # type: ignore[import-untyped]

from p2p._secure_session import MAX_PLAINTEXT, NoiseSession
from p2p._shaper import LinkSchedule, ShapedWriter
from p2p._yamux import FastYamux, FastYamuxStream

TAG = b"T" * 16


class FakeNoise:
    """Stands in for a Noise cipher state: appends / checks a 16-byte tag."""

    def __init__(self) -> None:
        self.messages = 0

    def encrypt(self, data: bytes) -> bytes:
        assert isinstance(data, bytes) and len(data) <= MAX_PLAINTEXT
        self.messages += 1
        return data + TAG

    def decrypt(self, data: bytes) -> bytes:
        if not data.endswith(TAG):
            raise NoiseInvalidMessage("Failed authentication of message")
        return data[:-16]


class Raw:
    """The raw-connection interface over one end of a memory stream."""

    def __init__(self, stream: trio.testing.MemorySendStream | trio.abc.Stream) -> None:
        self.stream = stream
        self.writes = 0

    async def read(self, n: int) -> bytes:
        return await self.stream.receive_some(n)  # type: ignore[union-attr]

    async def write(self, data: bytes) -> None:
        self.writes += 1
        await self.stream.send_all(data)

    async def close(self) -> None:
        await self.stream.aclose()


class FakeNoiseConn:
    """What NoiseSession expects as ``conn``: a cipher state and a raw read-writer."""

    def __init__(self, raw: Raw) -> None:
        self.noise_state = FakeNoise()
        self.read_writer = type("RW", (), {"read_write_closer": raw})()
        self.raw = raw

    async def close(self) -> None:
        await self.raw.close()


def _peer() -> ID:
    return ID.from_pubkey(create_new_key_pair().public_key)


def session(stream: trio.abc.Stream, *, initiator: bool) -> NoiseSession:
    key = create_new_key_pair()
    return NoiseSession(
        local_peer=_peer(),
        local_private_key=key.private_key,
        remote_peer=_peer(),
        remote_permanent_pubkey=key.public_key,
        is_initiator=initiator,
        conn=FakeNoiseConn(Raw(stream)),
    )


def session_pair() -> tuple[NoiseSession, NoiseSession]:
    left, right = trio.testing.memory_stream_pair()
    return session(left, initiator=True), session(right, initiator=False)


# --- NoiseSession ------------------------------------------------------------------------


async def test_reads_are_exact_across_message_boundaries() -> None:
    a, b = session_pair()
    await a.write(b"hello ")
    await a.write(b"world")
    big = bytes(range(256)) * 1000  # 256,000 bytes: four Noise messages, one send
    await a.write(big)
    assert a.conn.noise_state.messages == 2 + 4  # type: ignore[attr-defined]
    assert await b.read(3) == b"hel"
    assert await b.read(8) == b"lo world"
    assert await b.read(len(big)) == big
    await a.write(b"rest")
    assert await b.read(None) == b"rest"
    assert await b.read(0) == b""


async def test_eof_between_and_inside_messages() -> None:
    a, b = session_pair()
    await a.write(b"last")
    await a.close()
    assert await b.read(10) == b"last"  # fewer than asked: EOF
    with pytest.raises(IncompleteReadError) as clean:
        await b.read(1)
    assert clean.value.is_clean_close

    left, right = trio.testing.memory_stream_pair()
    reader = session(right, initiator=False)
    await left.send_all(b"\x00\x20" + b"x" * 10)  # announces 32 bytes, sends 10
    await left.aclose()
    with pytest.raises(IncompleteReadError) as cut:
        await reader.read(4)
    assert not cut.value.is_clean_close


async def test_a_message_that_fails_to_decrypt_breaks_the_connection() -> None:
    left, right = trio.testing.memory_stream_pair()
    reader = session(right, initiator=False)
    await left.send_all(b"\x00\x05" + b"forged"[:5])
    with pytest.raises(ConnectionClosedError):
        await reader.read(1)


# --- FastYamux ---------------------------------------------------------------------------


@asynccontextmanager
async def muxer_pair() -> AsyncIterator[tuple[FastYamux, FastYamux]]:
    a, b = session_pair()
    client = FastYamux(a, _peer(), is_initiator=True)
    server = FastYamux(b, _peer(), is_initiator=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.start)
        nursery.start_soon(server.start)
        await client.event_started.wait()
        await server.event_started.wait()
        yield client, server
        await client.close()
        await server.close()
        nursery.cancel_scope.cancel()


async def read_exactly(stream: FastYamuxStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        buf += await stream.read(n - len(buf))
    return bytes(buf)


async def test_small_messages_need_no_window_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    updates: list[int] = []
    original = FastYamuxStream.send_window_update

    async def counting(self: FastYamuxStream, increment: int, skip_lock: bool = False) -> None:
        updates.append(increment)
        await original(self, increment, skip_lock)

    monkeypatch.setattr(FastYamuxStream, "send_window_update", counting)
    with trio.fail_after(10):
        async with muxer_pair() as (client, server):
            out = await client.open_stream()
            inbound = await server.accept_stream()
            assert isinstance(inbound, FastYamuxStream)
            for i in range(200):
                await out.write(i.to_bytes(64, "big"))
                assert await read_exactly(inbound, 64) == i.to_bytes(64, "big")
                await inbound.write(b"ok")
                assert await read_exactly(out, 2) == b"ok"
    # py-libp2p's own streams sent a window update every other read.
    assert updates == []


async def test_bulk_beyond_the_window_in_large_frames() -> None:
    payload = bytes(range(256)) * (12 * 1024)  # 3 MiB: twelve times the initial window
    with trio.fail_after(20):
        async with muxer_pair() as (client, server):
            out = await client.open_stream()
            inbound = await server.accept_stream()
            assert isinstance(inbound, FastYamuxStream)
            got = bytearray()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(out.write, payload)
                while len(got) < len(payload):
                    got += await inbound.read(1 << 20)
            assert got == payload
            # Frames of up to 256 KiB, each one write: py-libp2p's 64 KiB frames took
            # two writes each (a 64 KiB frame is just over one Noise message).
            writes = client.secured_conn.conn.raw.writes  # type: ignore[attr-defined]
            assert writes <= 2 + len(payload) // (128 * 1024)


async def test_concurrent_writes_on_one_stream_stay_whole() -> None:
    # Two tasks write messages larger than the send window on one stream (py-libp2p's pubsub
    # does this); each write must arrive contiguous, never cut by the other's frames.
    size = 300 * 1024
    messages = [bytes([i]) * size for i in range(1, 5)]
    with trio.fail_after(20):
        async with muxer_pair() as (client, server):
            out = await client.open_stream()
            inbound = await server.accept_stream()
            got = bytearray()
            async with trio.open_nursery() as nursery:
                for m in messages:
                    nursery.start_soon(out.write, m)
                while len(got) < size * len(messages):
                    await trio.sleep(0.001)  # a slow reader: writers wait for window
                    got += await inbound.read(64 * 1024)
    chunks = [bytes(got[i:i + size]) for i in range(0, len(got), size)]
    assert sorted(chunks) == sorted(messages)


async def test_fin_and_reset_reach_the_reader() -> None:
    with trio.fail_after(10):
        async with muxer_pair() as (client, server):
            first = await client.open_stream()
            inbound = await server.accept_stream()
            await first.write(b"bye")
            await first.close()
            assert await read_exactly(inbound, 3) == b"bye"  # type: ignore[arg-type]
            with pytest.raises(MuxedStreamEOF):
                await inbound.read(1)

            second = await client.open_stream()
            inbound = await server.accept_stream()
            await second.write(b"x")
            assert await read_exactly(inbound, 1) == b"x"  # type: ignore[arg-type]
            await second.reset()
            with pytest.raises(MuxedStreamReset):
                await inbound.read(1)


async def test_a_slow_shaped_link_does_not_time_out_the_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """At 20 kB/s half a window takes 6.5 s to arrive: beyond the 5 s window limit."""
    payload = b"s" * (400 * 1024)
    async with muxer_pair() as (client, server), trio.open_nursery() as links:
        conn = client.secured_conn
        assert isinstance(conn, NoiseSession)
        conn.shaped = ShapedWriter(conn.write_now, LinkSchedule(0.05, bandwidth_bps=20_000))
        conn.shaped.start(links)
        out = await client.open_stream()
        inbound = await server.accept_stream()
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.write, payload)
            assert await read_exactly(inbound, len(payload)) == payload  # type: ignore[arg-type]
        assert trio.current_time() - start >= len(payload) / 20_000
        await conn.shaped.aclose()
