"""A peer in its own process, for the kill -9 and SIGSTOP tests.

Usage: python p2p_peer_proc.py DEAD_AFTER
Prints its multiaddr on stdout, then serves:
  /test/ticks/1 -- a session that streams Tick messages until the process dies;
  /test/echo/1  -- a session that echoes every message.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import trio

from p2p import HostConfig, Identity, Message, SessionConfig, SessionStream, message, open_host


@message("test.Tick", 1)
@dataclass(frozen=True, slots=True)
class Tick(Message):
    seq: int
    data: bytes = b""


async def ticks(session: SessionStream) -> None:
    seq = 0
    while True:
        await session.send(Tick(seq=seq, data=b"t" * 1000))
        seq += 1
        await trio.sleep(0.001)


async def echo(session: SessionStream) -> None:
    async for msg in session:
        await session.send(msg)


async def main(dead_after: float) -> None:
    config = HostConfig(
        listen_addrs=("/ip4/127.0.0.1/tcp/0",),
        enable_mdns=False,
        enable_dht=False,
        enable_pubsub=False,
    )
    session_config = SessionConfig(dead_after=dead_after)
    async with open_host(Identity.generate(), config) as host:
        host.set_session_handler("/test/ticks/1", ticks, config=session_config)
        host.set_session_handler("/test/echo/1", echo, config=session_config)
        print(host.listen_addrs()[0], flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, float(sys.argv[1]))
