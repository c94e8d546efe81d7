"""Benchmark: the p2p stack (TCP + Noise + Yamux + framing + sessions) vs plain trio TCP.

Run: ``python -m devnet.bench.transport`` (about a minute on 2 cores).

Prints one table, every number measured in this run, in three columns: this package's
session streams, a raw libp2p stream on the same host (py-libp2p's own floor, without
framing, heartbeats or credits), and a plain trio TCP socket:

1. dial time (connect + Noise + Yamux handshakes) vs a plain TCP connect;
2. 64-byte round trip on a long-lived session stream (median, p99) vs the same echo on a
   plain TCP socket;
3. bulk throughput, 64 MiB in 1 MiB messages on a session stream vs plain TCP;
4. announce-to-seen latency (p50, p95) on a 20-host gossip overlay (one bootstrap and 19
   serving nodes) running in *this* process.

The echo/sink server runs in a subprocess (``--serve``), so client and server each get a
core, as two real peers would. The overlay cannot: its 20 hosts share one core, i.e. about
20 times the load a real node carries, so its latencies are an upper bound.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import trio

from p2p import (
    ANNOUNCE_TOPIC,
    AnnouncementFields,
    AnnouncementState,
    Announcer,
    Host,
    HostConfig,
    Identity,
    Libp2pByteStream,
    Message,
    PeerId,
    SessionConfig,
    SessionStream,
    SwarmView,
    message,
    open_host,
)

if TYPE_CHECKING:
    from trio_typing import TaskStatus

ECHO = "/bench/echo/1"
SINK = "/bench/sink/1"
RAW_ECHO = "/bench/raw-echo/1"
RAW_SINK = "/bench/raw-sink/1"
MiB = 1 << 20
BULK_BYTES = 64 * MiB
CHUNK = 1 * MiB
RTT_ROUNDS = 2000
DIALS = 30
OVERLAY_HOSTS = 20
OVERLAY_UPDATES = 40

LOCAL = HostConfig(
    listen_addrs=("/ip4/127.0.0.1/tcp/0",),
    enable_mdns=False,
    enable_dht=False,
    enable_pubsub=False,
)
SESSION = SessionConfig(window_bytes=8 * MiB)


@message("bench.Blob", 1)
@dataclass(frozen=True, slots=True)
class Blob(Message):
    data: bytes


@message("bench.Done", 1)
@dataclass(frozen=True, slots=True)
class Done(Message):
    received: int


# --- server (subprocess) ------------------------------------------------------------


async def _echo(session: SessionStream) -> None:
    async for msg in session:
        await session.send(msg)


async def _sink(session: SessionStream) -> None:
    received = 0
    async for msg in session:
        if isinstance(msg, Blob):
            received += len(msg.data)
            if received >= BULK_BYTES:
                await session.send(Done(received=received))
                received = 0


async def _raw_echo(stream: Libp2pByteStream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)


async def _raw_sink(stream: Libp2pByteStream) -> None:
    received = 0
    while data := await stream.receive_some(1 << 18):
        received += len(data)
        if received >= BULK_BYTES:
            await stream.send_all(b"k")
            received = 0


async def _tcp_echo(stream: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def _tcp_sink(stream: trio.SocketStream) -> None:
    received = 0
    try:
        while data := await stream.receive_some(1 << 18):
            received += len(data)
            if received >= BULK_BYTES:
                await stream.send_all(b"k")
                received = 0
    except trio.BrokenResourceError:
        pass


async def serve() -> None:
    """Echo and sink over sessions and over plain TCP; print the addresses, run forever."""
    async with open_host(Identity.generate(), LOCAL) as host, trio.open_nursery() as nursery:
        host.set_session_handler(ECHO, _echo, config=SESSION)
        host.set_session_handler(SINK, _sink, config=SESSION)
        host.set_stream_handler(RAW_ECHO, _raw_echo)
        host.set_stream_handler(RAW_SINK, _raw_sink)
        echo_l = (await nursery.start(partial(trio.serve_tcp, _tcp_echo, 0, host="127.0.0.1")))[0]
        sink_l = (await nursery.start(partial(trio.serve_tcp, _tcp_sink, 0, host="127.0.0.1")))[0]
        ports = (echo_l.socket.getsockname()[1], sink_l.socket.getsockname()[1])
        print(host.listen_addrs()[0], *ports, flush=True)
        await trio.sleep_forever()


# --- client measurements ----------------------------------------------------------------


def _pct(xs: Sequence[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _dial_times(host: Host, addr: str) -> list[float]:
    peer = None
    times = []
    for _ in range(DIALS):
        if peer is not None:
            await host.disconnect(peer)
            await trio.sleep(0.02)  # let the old connection finish closing on both ends
        start = time.perf_counter()
        peer = await host.connect(addr)
        times.append(time.perf_counter() - start)
    return times


async def _tcp_dial_times(port: int) -> list[float]:
    times = []
    for _ in range(DIALS):
        start = time.perf_counter()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        times.append(time.perf_counter() - start)
        await stream.aclose()
    return times


async def _session_rtts(host: Host, addr: str) -> list[float]:
    peer = await host.connect(addr)
    payload = Blob(data=b"x" * 64)
    rtts = []
    async with host.open_session(peer, ECHO, config=SESSION) as session:
        for i in range(RTT_ROUNDS + 200):
            start = time.perf_counter()
            await session.send(payload)
            await session.receive()
            if i >= 200:  # warm-up
                rtts.append(time.perf_counter() - start)
    return rtts


async def _raw_rtts(host: Host, addr: str) -> list[float]:
    peer = await host.connect(addr)
    stream = await host.open_stream(peer, RAW_ECHO)
    rtts = []
    for i in range(RTT_ROUNDS + 200):
        start = time.perf_counter()
        await stream.send_all(b"x" * 64)
        got = 0
        while got < 64:
            got += len(await stream.receive_some(64 - got))
        if i >= 200:
            rtts.append(time.perf_counter() - start)
    await stream.aclose()
    return rtts


async def _raw_bulk(host: Host, addr: str) -> float:
    peer = await host.connect(addr)
    stream = await host.open_stream(peer, RAW_SINK)
    chunk = os.urandom(CHUNK)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(BULK_BYTES // CHUNK):
            await stream.send_all(chunk)
        await stream.receive_some(1)
        best = max(best, BULK_BYTES / (time.perf_counter() - start))
    await stream.aclose()
    return best


async def _tcp_rtts(port: int) -> list[float]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    rtts = []
    async with stream:
        for i in range(RTT_ROUNDS + 200):
            start = time.perf_counter()
            await stream.send_all(b"x" * 64)
            got = 0
            while got < 64:
                got += len(await stream.receive_some(64 - got))
            if i >= 200:
                rtts.append(time.perf_counter() - start)
    return rtts


async def _session_bulk(host: Host, addr: str) -> float:
    peer = await host.connect(addr)
    chunk = Blob(data=os.urandom(CHUNK))
    async with host.open_session(peer, SINK, config=SESSION) as session:
        best = 0.0
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(BULK_BYTES // CHUNK):
                await session.send(chunk)
            done = await session.receive()
            if not (isinstance(done, Done) and done.received == BULK_BYTES):
                raise RuntimeError(f"sink answered {done!r}")
            best = max(best, BULK_BYTES / (time.perf_counter() - start))
    return best


async def _tcp_bulk(port: int) -> float:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    chunk = os.urandom(CHUNK)
    best = 0.0
    async with stream:
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(BULK_BYTES // CHUNK):
                await stream.send_all(chunk)
            await stream.receive_some(1)
            best = max(best, BULK_BYTES / (time.perf_counter() - start))
    return best


# --- the 20-host overlay ---------------------------------------------------------------


@dataclass
class _OverlayNode:
    host: Host
    view: SwarmView
    announcer: Announcer | None
    stop: trio.Event


async def _overlay_node(
    bootstrap: tuple[str, ...], serving: bool, *, task_status: TaskStatus[_OverlayNode]
) -> None:
    identity = Identity.generate()
    config = HostConfig(
        listen_addrs=("/ip4/127.0.0.1/tcp/0",),
        bootstrap=bootstrap,
        enable_mdns=False,
        enable_dht=False,
        bootstrap_retry=0.2,
    )
    model = "bench-model"
    async with (
        open_host(identity, config) as host,
        SwarmView.watch(host, model if serving else None) as view,
    ):
        announcer = (
            Announcer(host, identity, model_id=model, version="bench", ttl_s=120.0)
            if serving
            else None
        )
        node = _OverlayNode(host, view, announcer, trio.Event())
        task_status.started(node)
        await node.stop.wait()


async def _announce_latencies() -> list[float]:
    latencies: list[float] = []
    async with trio.open_nursery() as nursery:
        boot: _OverlayNode = await nursery.start(_overlay_node, (), False)
        nodes = [boot]
        for _ in range(OVERLAY_HOSTS - 1):
            nodes.append(await nursery.start(_overlay_node, (boot.host.listen_addrs()[0],), True))
        with trio.fail_after(60):
            for n in nodes:
                await n.host.wait_bootstrapped()
            while not all(  # noqa: ASYNC110 - polling a condition across 20 hosts
                n.host.pubsub is not None and len(n.host.pubsub.mesh_peers(ANNOUNCE_TOPIC)) >= 3
                for n in nodes
            ):
                await trio.sleep(0.1)
        servers = nodes[1:]
        for k in range(len(servers) + OVERLAY_UPDATES):
            node = servers[k % len(servers)]
            assert node.announcer is not None
            fields = AnnouncementFields(
                start=0,
                end=1,
                state=AnnouncementState.ONLINE,
                addrs=node.host.listen_addrs(),
                load=(k % 10) / 10,
            )
            await node.announcer.publish(fields)
            record = node.announcer.last
            assert record is not None
            signed_at = record.expires_at - node.announcer.ttl_s
            others = [n for n in nodes if n is not node]
            with trio.move_on_after(10):
                while not all(_holds(n, record.peer_id, record.seq) for n in others):  # noqa: ASYNC110
                    await trio.sleep(0.01)
            if k >= len(servers):  # joins are the warm-up; measure updates
                for n in others:
                    accepted = n.view.accepted_at(record.peer_id)
                    if _holds(n, record.peer_id, record.seq) and accepted is not None:
                        latencies.append(accepted - signed_at)
                    else:
                        latencies.append(float("inf"))
            await trio.sleep(0.3)
        for n in nodes:
            n.stop.set()
    return latencies


def _holds(node: _OverlayNode, peer: PeerId, seq: int) -> bool:
    record = node.view.records.get(peer)
    return record is not None and record.seq >= seq


# --- report ------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


async def _client() -> None:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "devnet.bench.transport", "--serve"],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(60):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1024)
                if not chunk:
                    raise RuntimeError("benchmark server exited")
                line += chunk
        addr, echo_port, sink_port = line.decode().split()
        async with open_host(Identity.generate(), LOCAL) as host:
            dial = await _dial_times(host, addr)
            tcp_dial = await _tcp_dial_times(int(echo_port))
            rtt = await _session_rtts(host, addr)
            raw_rtt = await _raw_rtts(host, addr)
            tcp_rtt = await _tcp_rtts(int(echo_port))
            bulk = await _session_bulk(host, addr)
            raw_bulk = await _raw_bulk(host, addr)
            tcp_bulk = await _tcp_bulk(int(sink_port))
    finally:
        proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
    announce = await _announce_latencies()

    def ok(good: bool) -> str:
        return "yes" if good else "NO"

    p50, p95 = _pct(announce, 0.5), _pct(announce, 0.95)
    med = statistics.median
    rows = [
        [
            "dial (median)",
            _ms(med(dial)),
            _ms(med(dial)),
            _ms(med(tcp_dial)),
            "<= 50 ms",
            ok(med(dial) <= 0.050),
        ],
        [
            "64 B round trip (median)",
            _ms(med(rtt)),
            _ms(med(raw_rtt)),
            _ms(med(tcp_rtt)),
            "<= 0.7 ms",
            ok(med(rtt) <= 0.0007),
        ],
        [
            "64 B round trip (p99)",
            _ms(_pct(rtt, 0.99)),
            _ms(_pct(raw_rtt, 0.99)),
            _ms(_pct(tcp_rtt, 0.99)),
            "",
            "",
        ],
        [
            "bulk 64 MiB in 1 MiB writes",
            f"{bulk / 1e6:.0f} MB/s",
            f"{raw_bulk / 1e6:.0f} MB/s",
            f"{tcp_bulk / 1e6:.0f} MB/s",
            ">= 200 MB/s",
            ok(bulk >= 200e6),
        ],
        [f"announce-to-seen p50 ({OVERLAY_HOSTS} hosts, 1 process)", _ms(p50), "-", "-", "", ""],
        [
            f"announce-to-seen p95 ({OVERLAY_HOSTS} hosts, 1 process)",
            _ms(p95),
            "-",
            "-",
            "<= 2 s",
            ok(p95 <= 2.0),
        ],
    ]
    headers = ["metric", "p2p session", "raw libp2p stream", "plain trio TCP", "goal", "met"]
    print(_table(headers, rows))
    print(
        f"({DIALS} dials, {RTT_ROUNDS} round trips, best of 3 bulk runs, "
        f"{len(announce)} announcement deliveries; server in a subprocess)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--serve", action="store_true", help="run the echo/sink server")
    args = parser.parse_args()
    # py-libp2p logs every dial still in flight when the 20 hosts stop; keep the table clean.
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    trio.run(serve if args.serve else _client)


if __name__ == "__main__":
    main()
