"""Real libp2p hosts on loopback: exchange, refusals, private swarms, dead peers."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.pubsub.pb import rpc_pb2
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from multiaddr import Multiaddr

from p2p import (
    BrokenStreamError,
    Credit,
    DialError,
    FramedStream,
    Framer,
    Host,
    HostConfig,
    Identity,
    Message,
    PeerDeadError,
    Ping,
    RemoteProtocolError,
    RemoteRpcError,
    RpcRefusal,
    RpcSpec,
    RpcTimeoutError,
    SessionConfig,
    SessionStream,
    message,
    open_host,
    parse_peer_addr,
)
from p2p._pubsub import GossipConfig, SafePubsub, make_gossipsub

REPO = Path(__file__).resolve().parents[2]
PEER_SCRIPT = Path(__file__).with_name("p2p_peer_proc.py")

LOCAL = HostConfig(
    listen_addrs=("/ip4/127.0.0.1/tcp/0",),
    enable_mdns=False,
    enable_dht=False,
    enable_pubsub=False,
    dial_timeout=5.0,
)


@message("test.Tick", 1)  # same definition as in p2p_peer_proc.py
@dataclass(frozen=True, slots=True)
class Tick(Message):
    seq: int
    data: bytes = b""


@message("test.Query", 1)
@dataclass(frozen=True, slots=True)
class Query(Message):
    text: str


@message("test.Answer", 1)
@dataclass(frozen=True, slots=True)
class Answer(Message):
    text: str
    asker: str


ECHO = RpcSpec("/test/upper/1", Query, Answer, timeout=2.0)


async def upper(peer: object, request: Query) -> Answer:
    if request.text == "refuse":
        raise RpcRefusal("no-thanks", "refused on request")
    if request.text == "hang":
        await trio.sleep_forever()
    return Answer(text=request.text.upper(), asker=str(peer))


async def echo(session: SessionStream) -> None:
    async for msg in session:
        await session.send(msg)


@asynccontextmanager
async def two_hosts(
    config: HostConfig = LOCAL, config_b: HostConfig | None = None
) -> AsyncIterator[tuple[Host, Host]]:
    async with (
        open_host(Identity.generate(), config) as a,
        open_host(Identity.generate(), config_b or config) as b,
    ):
        yield a, b


async def test_two_hosts_exchange_framed_messages() -> None:
    async with two_hosts() as (a, b):
        b.set_session_handler("/test/echo/1", echo)
        b.set_rpc_handler(ECHO, upper)
        with trio.fail_after(10):
            assert await a.connect(b.listen_addrs()[0]) == b.peer_id
            assert a.connected_peers() == [b.peer_id]
            async with a.open_session(b.peer_id, "/test/echo/1") as session:
                assert session.peer == b.peer_id
                for i in range(20):
                    await session.send(Tick(seq=i, data=os.urandom(i * 100)))
                got = [await session.receive() for _ in range(20)]
                assert [t.seq for t in got] == list(range(20))  # type: ignore[attr-defined]
                big = Tick(seq=-1, data=os.urandom(3 * 1024 * 1024))  # > yamux window
                await session.send(big)
                assert await session.receive() == big
            answer = await a.request(b.peer_id, ECHO, Query(text="hi"))
            assert answer == Answer(text="HI", asker=str(a.peer_id))
            with pytest.raises(RemoteRpcError) as refused:
                await a.request(b.peer_id, ECHO, Query(text="refuse"))
            assert refused.value.code == "no-thanks"
        with trio.fail_after(5), pytest.raises(RpcTimeoutError):
            await a.request(b.peer_id, ECHO, Query(text="hang"))
        with trio.fail_after(5), pytest.raises(DialError):
            await a.open_stream(b.peer_id, "/test/unknown/1")


async def test_a_lazily_opened_session_to_a_protocol_nobody_serves_fails_on_receive() -> None:
    # open_session proposes its protocol and sends at once (p2p/_select.py): the refusal
    # comes back as the session's first receive, and the connection serves the next session.
    async with two_hosts() as (a, b):
        b.set_session_handler("/test/echo/1", echo)
        with trio.fail_after(10):
            await a.connect(b.listen_addrs()[0])
            async with a.open_session(b.peer_id, "/test/unknown/1") as session:
                await session.send(Tick(seq=1, data=b"x"))  # pipelined behind the proposal
                with pytest.raises(RemoteProtocolError, match="does not speak"):
                    await session.receive()
            async with a.open_session(b.peer_id, "/test/echo/1") as session:
                await session.send(Tick(seq=2, data=b"y"))
                assert await session.receive() == Tick(seq=2, data=b"y")


async def test_bad_frames_are_contained_to_their_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="p2p")
    errors: list[BaseException] = []
    violated = trio.Event()

    async def guarded(session: SessionStream) -> None:
        try:
            await echo(session)
        except RemoteProtocolError as exc:
            errors.append(exc)
            violated.set()
            raise

    async with two_hosts() as (a, b):
        b.set_session_handler("/test/echo/1", guarded)
        b.set_rpc_handler(ECHO, upper)
        with trio.fail_after(10):
            await a.connect(b.listen_addrs()[0])
            async with a.open_session(b.peer_id, "/test/echo/1") as healthy:
                raw = await a.open_stream(b.peer_id, "/test/echo/1")
                await raw.send_all(Framer().send(Tick(seq=1)))
                await raw.send_all(b"\x7f\xff\xff\xff" + b"\x00" * 4)  # a 2 GiB frame
                await violated.wait()
                # The server reset the stream (py-libp2p shows a remote reset as a
                # reset or as a plain EOF, and may drop data buffered before it).
                framed = FramedStream(raw)
                with contextlib.suppress(BrokenStreamError):
                    while (msg := await framed.receive()) is not None:
                        assert isinstance(msg, Credit | Ping) or msg == Tick(seq=1)
                # the connection's other streams and the host keep working
                await healthy.send(Tick(seq=2))
                assert await healthy.receive() == Tick(seq=2)
                raw_rpc = await a.open_stream(b.peer_id, ECHO.protocol)
                await raw_rpc.send_all(b"not a frame at all")
                await raw_rpc.send_eof()
                assert await a.request(b.peer_id, ECHO, Query(text="ok")) == Answer(
                    text="OK", asker=str(a.peer_id)
                )
    assert "exceeds" in str(errors[0])
    assert str(a.peer_id) in caplog.text


async def test_garbage_gossip_costs_the_sender_its_stream_not_the_host(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # py-libp2p's pubsub let a protobuf DecodeError end the connection's task group, and with
    # it the whole host: one hostile frame on /meshsub killed a node.
    config = dataclasses.replace(LOCAL, enable_pubsub=True)
    async with two_hosts(config) as (a, b):
        b.set_rpc_handler(ECHO, upper)
        with trio.fail_after(10):
            await a.connect(b.listen_addrs()[0])
            raw = await a.open_stream(b.peer_id, "/meshsub/1.1.0")
            await raw.send_all(b"\x10" + b"\xff" * 16)  # a varint length, then no protobuf
            with contextlib.suppress(BrokenStreamError):
                while await raw.receive_some(1024):
                    pass  # until b resets the stream
            assert await a.request(b.peer_id, ECHO, Query(text="alive")) == Answer(
                text="ALIVE", asker=str(a.peer_id))
    assert "undecodable RPC" in caplog.text


class _ClosedNurseryManager:
    """A pubsub service's manager whose task nursery has closed while it still reports
    itself running: cancelled (stopping), or not (a real failure)."""

    is_running = True

    def __init__(self, *, cancelled: bool) -> None:
        self.is_cancelled = cancelled

    def run_task(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("Nursery is closed to new arrivals")


class _OneRpcStream:
    """A /meshsub stream that delivers one varint-prefixed RPC, then waits."""

    def __init__(self, rpc: bytes, peer: ID) -> None:
        self._buffer = bytes([len(rpc)]) + rpc
        self.muxed_conn = dataclasses.make_dataclass("Conn", ["peer_id"])(peer)
        self.was_reset = False

    async def read(self, n: int = -1) -> bytes:
        if not self._buffer:
            await trio.sleep_forever()
        chunk, self._buffer = self._buffer[:n], self._buffer[n:]
        return chunk

    async def reset(self) -> None:
        self.was_reset = True


async def test_a_subscription_arriving_while_pubsub_stops_closes_its_stream_only() -> None:
    # The connection's reader outlives the pubsub service; a subscription arriving in the
    # moment its task nursery has closed made run_task raise, and took the host down with it.
    rpc = rpc_pb2.RPC(subscriptions=[rpc_pb2.RPC.SubOpts(subscribe=True, topicid="t")])

    def pubsub(*, cancelled: bool) -> SafePubsub:
        ps = SafePubsub(new_host(key_pair=create_new_key_pair()),
                        make_gossipsub(GossipConfig()))
        ps._manager = _ClosedNurseryManager(cancelled=cancelled)  # type: ignore[assignment]
        return ps

    stopping = pubsub(cancelled=True)
    peer = ID.from_pubkey(create_new_key_pair().public_key)
    stream = _OneRpcStream(rpc.SerializeToString(), peer)
    with trio.fail_after(10):
        await stopping.continuously_read_stream(stream)  # type: ignore[arg-type]
    assert stream.was_reset
    assert stopping.peer_topics["t"] == {peer}

    running = pubsub(cancelled=False)  # a running service's failure is not hidden
    with trio.fail_after(10), pytest.raises(RuntimeError, match="closed to new arrivals"):
        await running.continuously_read_stream(
            _OneRpcStream(rpc.SerializeToString(), peer))  # type: ignore[arg-type]


async def test_plaintext_only_dialer_is_refused() -> None:
    async with open_host(Identity.generate(), LOCAL) as host:
        key_pair = create_new_key_pair()
        plain = new_host(
            key_pair=key_pair,
            sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)},
        )
        _, transport = parse_peer_addr(host.listen_addrs()[0])
        async with plain.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            with trio.fail_after(10), pytest.raises(SwarmException):
                await plain.connect(PeerInfo(ID(host.peer_id.raw), [Multiaddr(transport)]))
        assert host.connected_peers() == []


async def test_allowlist_and_psk_make_private_swarms() -> None:
    insider, outsider = Identity.generate(), Identity.generate()
    private = replace(LOCAL, allowed_peers=frozenset({insider.peer_id}))
    async with (
        open_host(Identity.generate(), private) as guarded,
        open_host(insider, LOCAL) as ok,
        open_host(outsider, LOCAL) as bad,
    ):
        with trio.fail_after(10):
            await ok.connect(guarded.listen_addrs()[0])
            with pytest.raises(DialError):
                await bad.connect(guarded.listen_addrs()[0])
            with pytest.raises(DialError):  # the allowlist holds for outbound dials too
                await guarded.connect(bad.listen_addrs()[0])
        assert guarded.connected_peers() == [insider.peer_id]

    fast_fail = replace(LOCAL, dial_timeout=1.0)
    key = replace(fast_fail, psk=b"k" * 32)
    async with two_hosts(key) as (a, b), open_host(Identity.generate(), fast_fail) as stranger:
        with trio.fail_after(10):
            await a.connect(b.listen_addrs()[0])
            with pytest.raises(DialError):
                await stranger.connect(b.listen_addrs()[0])
        assert b.connected_peers() == [a.peer_id]


async def test_a_wrong_pre_shared_key_fails_fast_and_says_so() -> None:
    slow = replace(LOCAL, dial_timeout=30.0)  # a hang would show as 30 s, not a failure
    async with (
        open_host(Identity.generate(), replace(slow, psk=b"k" * 32)) as guarded,
        open_host(Identity.generate(), replace(slow, psk=b"q" * 32)) as wrong,
        open_host(Identity.generate(), slow) as keyless,
        open_host(Identity.generate(), replace(slow, psk=b"k" * 32)) as right,
    ):
        with trio.fail_after(5):
            with pytest.raises(DialError, match="pre-shared key mismatch"):
                await wrong.connect(guarded.listen_addrs()[0])
            with pytest.raises(DialError):  # the guarded side hangs up on it at once
                await keyless.connect(guarded.listen_addrs()[0])
            assert await right.connect(guarded.listen_addrs()[0]) == guarded.peer_id
            # Sessions work through the pnet layer (Noise over an encrypted raw conn).
            guarded.set_session_handler("/test/echo/1", echo)
            async with right.open_session(guarded.peer_id, "/test/echo/1") as session:
                big = Tick(seq=2, data=os.urandom(300_000))
                for msg in (Tick(seq=1), big):
                    await session.send(msg)
                    assert await session.receive() == msg
        assert guarded.connected_peers() == [right.peer_id]


async def read_line(stream: trio.abc.ReceiveStream) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = await stream.receive_some(256)
        if not chunk:
            raise RuntimeError(f"peer process exited early: {buf!r}")
        buf += chunk
    return buf.decode().strip()


async def test_killed_and_frozen_peers_are_broken_not_closed() -> None:
    """kill -9 mid-stream -> BrokenStreamError; SIGSTOP -> PeerDeadError within 1 s."""
    dead_after = 1.0
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        await trio.lowlevel.open_process(
            [sys.executable, str(PEER_SCRIPT), str(dead_after)],
            stdout=subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    try:
        async with open_host(Identity.generate(), LOCAL) as host:
            with trio.fail_after(30):
                addrs = [await read_line(p.stdout) for p in procs if p.stdout is not None]
                victim, sleeper = [await host.connect(a) for a in addrs]
            config = SessionConfig(dead_after=dead_after)
            async with (
                host.open_session(victim, "/test/ticks/1", config=config) as ticks,
                host.open_session(sleeper, "/test/echo/1", config=config) as frozen,
            ):
                with trio.fail_after(10):
                    for _ in range(5):
                        await ticks.receive()  # mid-stream
                    await frozen.send(Tick(seq=1))
                    assert await frozen.receive() == Tick(seq=1)

                    procs[0].send_signal(signal.SIGKILL)
                    with pytest.raises(BrokenStreamError) as broken:
                        while True:
                            await ticks.receive()
                    assert not isinstance(broken.value, PeerDeadError)

                    procs[1].send_signal(signal.SIGSTOP)
                    start = trio.current_time()
                    with pytest.raises(PeerDeadError):
                        await frozen.receive()
                    elapsed = trio.current_time() - start
                    assert dead_after * 0.9 <= elapsed < dead_after + 1.0
                    with pytest.raises(PeerDeadError):  # the failure sticks
                        await frozen.send(Tick(seq=2))
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()


async def test_a_host_leaves_its_peers_at_once_and_dials_nobody_on_the_way_out() -> None:
    # py-libp2p sleeps 0.1 s in every connection's close and, below its minimum of
    # connections, dials known peers again: a client with eight peers took 0.8 s to leave,
    # most of it redialing the peers it had just said goodbye to.
    events: list[tuple[str, object]] = []
    async with (
        open_host(Identity.generate(), LOCAL) as b,
        open_host(Identity.generate(), LOCAL) as c,
        open_host(Identity.generate(), LOCAL) as d,
        open_host(Identity.generate(), LOCAL) as known,
    ):
        peers = [b, c, d]
        async with open_host(Identity.generate(), LOCAL) as a:
            for p in peers:
                await a.connect(p.listen_addrs()[0])
            # A peer `a` knows of (from the DHT, say) but is not connected to.
            peer, transport = parse_peer_addr(known.listen_addrs()[0])
            a.libp2p.get_peerstore().add_addrs(ID(peer.to_bytes()), [Multiaddr(transport)],
                                               3600)
            swarm = a.libp2p.get_network()
            dial, disconnect = swarm.dial_peer, a.libp2p.disconnect

            async def counting_dial(peer_id: ID) -> Any:
                events.append(("dial", peer_id))
                return await dial(peer_id)

            async def recorded_disconnect(peer_id: ID) -> None:
                events.append(("start", peer_id))
                await disconnect(peer_id)
                events.append(("end", peer_id))

            swarm.dial_peer = counting_dial  # type: ignore[method-assign]
            a.libp2p.disconnect = recorded_disconnect  # type: ignore[method-assign]
        kinds = [kind for kind, _ in events]
        assert "dial" not in kinds
        assert not known.connected_peers()
        # Every close had started before the first one ended: they ran side by side.
        assert kinds.count("start") == 3
        assert kinds.index("end") > max(i for i, k in enumerate(kinds) if k == "start")
        with trio.fail_after(5):
            while any(p.connected_peers() for p in peers):  # noqa: ASYNC110 - polling peers
                await trio.sleep(0.01)


async def test_a_peer_back_on_its_address_can_be_dialed_at_once() -> None:
    # py-libp2p refuses for 60 s to dial a peer whose addresses all failed once, without
    # trying. A node restarted in seconds (same identity, same port) was then unreachable
    # for a minute to every peer that had tried it meanwhile: the churn soak's clients gave
    # up when both servers of a stage were in that state. Our dials are deliberate, with
    # their own backoff (the client's bans), so they try.
    identity = Identity.generate()
    with socket.socket() as probe:  # a port nobody listens on, until the peer comes back
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    transport = f"/ip4/127.0.0.1/tcp/{port}"
    async with open_host(Identity.generate(), LOCAL) as a:
        with pytest.raises(DialError):
            await a.connect_peer(identity.peer_id, [transport])  # the peer is down
        async with open_host(identity, replace(LOCAL, listen_addrs=(transport,))) as b:
            await a.connect_peer(b.peer_id, [transport])
            assert a.is_connected(b.peer_id)


async def test_a_host_that_stopped_no_longer_listens() -> None:
    # py-libp2p left every stopped host's port open and accepting, for the life of the
    # process: a socket per client that came and went.
    async with open_host(Identity.generate(), LOCAL) as host:
        _, transport = parse_peer_addr(host.listen_addrs()[0])
    port = int(transport.rsplit("/", 1)[1])
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))


async def test_a_host_stopping_can_still_be_asked_its_addresses() -> None:
    # A peer's identify request asks for our addresses at any moment, stopping included:
    # a listening socket closed but still listed made that raise EBADF and fail the host.
    asked = 0

    async def ask(host: Host) -> None:
        nonlocal asked
        while True:
            host.listen_addrs()
            asked += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        async with open_host(Identity.generate(), LOCAL) as host:
            nursery.start_soon(ask, host)
        nursery.cancel_scope.cancel()
    assert asked > 1
