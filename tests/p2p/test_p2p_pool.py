"""Kept session streams (`p2p.SessionPool`) between two real hosts on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from p2p import (
    Host,
    HostConfig,
    Identity,
    Message,
    SessionPool,
    SessionStream,
    StreamClosedError,
    message,
    open_host,
    open_session_pool,
)

PROTO = "/test/pool/1"


@message("test.PoolEcho", 1)
@dataclass(frozen=True, slots=True)
class Echo(Message):
    n: int


@dataclass
class Server:
    host: Host
    streams: int = 0  # streams accepted
    uses: int = 0  # messages answered, over all streams


@asynccontextmanager
async def _pair(idle_s: float = 10.0) -> AsyncIterator[tuple[Server, SessionPool]]:
    """A server answering every `Echo` on a stream (any number of them), and a client's pool."""
    cfg = HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0",), enable_mdns=False,
                     enable_dht=False, enable_pubsub=False)
    async with open_host(Identity.generate(), cfg) as server_host, \
            open_host(Identity.generate(), cfg) as client:
        server = Server(server_host)

        async def handler(session: SessionStream) -> None:
            server.streams += 1
            while True:
                try:
                    msg = await session.receive()
                except StreamClosedError:
                    return
                server.uses += 1
                await session.send(msg)

        server_host.set_session_handler(PROTO, handler)
        await client.connect_peer(server_host.peer_id, [
            a.rsplit("/p2p/", 1)[0] for a in server_host.listen_addrs()])
        async with open_session_pool(client, PROTO, idle_s=idle_s) as pool:
            yield server, pool


async def _use(pool: SessionPool, server: Server, n: int, *, reusable: bool = True) -> bool:
    async with pool.lease(server.host.peer_id) as lease:
        await lease.session.send(Echo(n))
        assert await lease.session.receive() == Echo(n)
        lease.reusable = reusable
        return lease.reused


async def test_a_stream_used_cleanly_is_kept_for_the_next_use() -> None:
    with trio.fail_after(20):
        async with _pair() as (server, pool):
            assert [await _use(pool, server, n) for n in range(3)] == [False, True, True]
            assert (pool.opened, pool.reused, server.streams, server.uses) == (1, 2, 1, 3)
            assert pool.idle_count(server.host.peer_id) == 1


async def test_a_stream_not_said_to_be_clean_is_closed_never_reused() -> None:
    with trio.fail_after(20):
        async with _pair() as (server, pool):
            assert not await _use(pool, server, 1, reusable=False)
            assert not await _use(pool, server, 2)
            assert (pool.opened, pool.reused, server.streams) == (2, 0, 2)


async def test_concurrent_leases_get_their_own_streams() -> None:
    with trio.fail_after(20):
        async with _pair() as (server, pool):
            async with trio.open_nursery() as nursery:
                for n in range(3):
                    nursery.start_soon(_use, pool, server, n)
            assert pool.opened == 3 and pool.idle_count() == 3
            await _use(pool, server, 9)
            assert pool.opened == 3 and pool.reused == 1


async def test_idle_streams_close_after_idle_s_and_a_closed_one_is_not_lent() -> None:
    with trio.fail_after(20):
        async with _pair(idle_s=0.2) as (server, pool):
            await _use(pool, server, 1)
            assert pool.idle_count() == 1
            while pool.idle_count():  # noqa: ASYNC110 - the keeper gives it up after idle_s
                await trio.sleep(0.02)
            assert not await _use(pool, server, 2)
            assert pool.opened == 2


async def test_a_stream_the_peer_ended_is_not_lent_again() -> None:
    with trio.fail_after(20):
        async with _pair() as (server, pool):

            async def one_use(session: SessionStream) -> None:  # answers once, then leaves
                server.streams += 1
                await session.send(await session.receive())

            server.host.set_session_handler(PROTO, one_use)
            await _use(pool, server, 1)
            with trio.fail_after(5):  # well before idle_s (10 s) would end it anyway
                while pool.idle_count():  # noqa: ASYNC110 - until the server's goodbye arrives
                    await trio.sleep(0.01)
            assert not await _use(pool, server, 2)
            assert (pool.opened, pool.reused, server.streams) == (2, 0, 2)
