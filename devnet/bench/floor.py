"""Benchmark: the per-token floor of any pipeline built from trio processes on this machine.

Run: `python -m devnet.bench.floor` (about 4 minutes on 2 cores).

A pipeline token crosses its hops one after another, so whatever a hop spends besides its
compute adds up on every token. How much of that is shardnet's own code (libp2p, Noise,
yamux, framing, validation, codecs, batching) and how much is the bare architecture every
Python node shares? This measures the bare part: `--hops` processes in a ring over loopback
TCP with the client, each hop receiving a small message, running a memory-bound matrix-vector
product of `--hop-mb` MB (the shape of a decode step: one row against streamed weights) in a
worker thread behind a `CapacityLimiter` exactly as a node does, and forwarding the message;
the client then runs a `--head-mb` product (the head it runs before sampling). No encryption,
no muxer, no framing beyond a fixed size, no torch. The defaults are the 125M model of
`devnet.bench.pipeline`: four blocks per hop (~100 MB), its head (98 MB), two BLAS threads
as its nodes and single-process engine use here.

It prints the ring's time per token next to the same products run back to back in one
process (what a single-process engine does), and the same ring with the product on the event
loop (no thread hand-off, which a node must not do), so the two costs can be told apart:

    overhead = ring per token - the same compute back to back

Two more rings run the same hops over shardnet's `p2p` layer instead of bare TCP, so the
stack's share is measured rather than guessed: one over raw libp2p streams (TCP, Noise,
yamux: what any py-libp2p node pays), one over `p2p` session streams (those plus our framing,
flow control and heartbeats: what a node's inference session rides on). The session ring is
the floor under `devnet.bench.pipeline`'s gap to the single-process engine; what the pipeline
pays beyond it is the node's and the client's own code (protocol messages, validation,
codecs, batching, sampling).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
import trio

from devnet.bench._common import check_cores, pin_this_process, pinned, table
from p2p import (
    HostConfig,
    Identity,
    Libp2pByteStream,
    Message,
    SessionConfig,
    SessionStream,
    message,
    open_host,
)

MESSAGE_BYTES = 1024  # about one int8-block hidden state of a 768-wide model
STACKS = ("tcp", "raw", "session")  # bare TCP; libp2p streams; p2p session streams
RAW_RING = "/bench/floor-raw/1"
SESSION_RING = "/bench/floor-session/1"
LOCAL = HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0",), enable_mdns=False,
                   enable_dht=False, enable_pubsub=False)
SESSION = SessionConfig()


@message("bench.FloorToken", 1)
@dataclass(frozen=True, slots=True)
class Token(Message):
    """The message a session ring passes around: MESSAGE_BYTES of payload."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Shape:
    """What every path computes per token.

    Attributes:
        hops: processes in the ring besides the client.
        hop_mb: weights each hop streams per token (its span's products).
        head_mb: weights the client streams per token after the ring (the head a shardnet
            client runs before it samples; 0 = none).
        threads: BLAS threads of every product.
        cores_per_process: cores of its own for the client and for each hop, as if each
            were a machine (0: every process shares every core).
    """

    hops: int = 3
    hop_mb: int = 100  # four blocks of the 125M model
    head_mb: int = 98  # its head
    threads: int = 2  # what its nodes and the single-process engine use here
    cores_per_process: int = 0


def _weights(megabytes: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)
    rows = 768
    w = np.random.default_rng(0).random((rows, max(1, megabytes * (1 << 20) // (4 * rows))),
                                        dtype=np.float32)
    return w, np.ones(rows, dtype=np.float32)


def _product(megabytes: int, threads: int, inline: bool = False
             ) -> Callable[[], Awaitable[None]]:
    """One product of `megabytes` of weights, in a worker thread as a node runs it."""
    w, x = _weights(megabytes, threads)
    limiter = trio.CapacityLimiter(1)

    async def compute() -> None:
        if megabytes <= 0:
            return
        if inline:
            x @ w
        else:
            await trio.to_thread.run_sync(lambda: x @ w, limiter=limiter)

    return compute


async def _receive_exactly(stream: trio.SocketStream | Libp2pByteStream, n: int
                           ) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


async def serve_hop(next_hop: str, shape: Shape, inline: bool, stack: str) -> None:
    """One hop: print the address to reach it, then receive, compute, forward, until killed."""
    compute = _product(shape.hop_mb, shape.threads, inline)
    if stack == "tcp":
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        print(listeners[0].socket.getsockname()[1], flush=True)
        upstream = await listeners[0].accept()
        downstream = await trio.open_tcp_stream("127.0.0.1", int(next_hop))
        async with upstream, downstream:
            while (msg := await _receive_exactly(upstream, MESSAGE_BYTES)) is not None:
                await compute()
                await downstream.send_all(msg)
        return
    async with open_host(Identity.generate(), LOCAL) as host:
        peer = await host.connect(next_hop)
        if stack == "raw":
            async def relay_raw(upstream: Libp2pByteStream) -> None:
                downstream = await host.open_stream(peer, RAW_RING)
                while (msg := await _receive_exactly(upstream, MESSAGE_BYTES)) is not None:
                    await compute()
                    await downstream.send_all(msg)
                await downstream.aclose()

            host.set_stream_handler(RAW_RING, relay_raw)
        else:
            async def relay_session(upstream: SessionStream) -> None:
                async with host.open_session(peer, SESSION_RING, config=SESSION) as downstream:
                    async for msg in upstream:
                        await compute()
                        await downstream.send(msg)

            host.set_session_handler(SESSION_RING, relay_session, config=SESSION)
        print(host.listen_addrs()[0], flush=True)
        await trio.sleep_forever()


def _start_ring(shape: Shape, back: str, inline: bool, stack: str
                ) -> tuple[list[subprocess.Popen[str]], str]:
    """Start the hops last to first (each needs its successor's address); the first's."""
    procs: list[subprocess.Popen[str]] = []
    address = back
    for index in range(shape.hops, 0, -1):
        argv = [sys.executable, "-m", "devnet.bench.floor", "--serve-hop", address,
                "--stack", stack, "--hop-mb", str(shape.hop_mb), "--threads",
                str(shape.threads), *(["--inline"] if inline else [])]
        if shape.cores_per_process:
            argv = pinned(shape.cores_per_process, index, argv)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline().strip() if proc.stdout is not None else ""
        if not line:
            raise RuntimeError(f"a hop did not start (exit status {proc.wait()})")
        address = line
    return procs, address


Send = Callable[[bytes], Awaitable[None]]
Receive = Callable[[], Awaitable["bytes | None"]]


@asynccontextmanager
async def _ring(shape: Shape, inline: bool, stack: str) -> AsyncIterator[tuple[Send, Receive]]:
    """A started ring: (send to the first hop, receive from the last)."""
    if stack == "tcp":
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        procs, first = _start_ring(shape, str(listeners[0].socket.getsockname()[1]), inline,
                                   stack)
        try:
            with trio.fail_after(120):
                downstream = await trio.open_tcp_stream("127.0.0.1", int(first))
                upstream = await listeners[0].accept()
            async with downstream, upstream:
                yield downstream.send_all, lambda: _receive_exactly(upstream, MESSAGE_BYTES)
        finally:
            _stop(procs)
            for listener in listeners:
                await listener.aclose()
        return
    async with open_host(Identity.generate(), LOCAL) as host, trio.open_nursery() as nursery:
        # The last hop's stream is handed over to this task, which reads it directly (as the
        # TCP ring's client does), rather than through another task.
        arrived, incoming = trio.open_memory_channel[SessionStream | Libp2pByteStream](1)
        finished = trio.Event()

        async def hand_over(stream: SessionStream | Libp2pByteStream) -> None:
            await arrived.send(stream)
            await finished.wait()

        if stack == "raw":
            host.set_stream_handler(RAW_RING, hand_over)
        else:
            host.set_session_handler(SESSION_RING, hand_over, config=SESSION)
        # Off the event loop: the last hop dials this host while the ring starts.
        procs, first = await trio.to_thread.run_sync(
            _start_ring, shape, str(host.listen_addrs()[0]), inline, stack)
        try:
            with trio.fail_after(120):
                peer = await host.connect(first)
            if stack == "raw":
                raw_down = await host.open_stream(peer, RAW_RING)
                await raw_down.send_all(b"x" * MESSAGE_BYTES)  # opens the ring's streams
                with trio.fail_after(120):
                    handed = await incoming.receive()
                if not isinstance(handed, Libp2pByteStream):
                    raise RuntimeError("the raw ring handed over a session")
                raw_up = handed
                await _receive_exactly(raw_up, MESSAGE_BYTES)
                yield raw_down.send_all, lambda: _receive_exactly(raw_up, MESSAGE_BYTES)
                await raw_down.aclose()
            else:
                async with host.open_session(peer, SESSION_RING, config=SESSION) as session:
                    await session.send(Token(b"x" * MESSAGE_BYTES))
                    with trio.fail_after(120):
                        handed = await incoming.receive()
                    if not isinstance(handed, SessionStream):
                        raise RuntimeError("the session ring handed over a raw stream")
                    ses_up = handed
                    await ses_up.receive()

                    async def send(data: bytes) -> None:
                        await session.send(Token(data))

                    async def receive() -> bytes | None:
                        msg = await ses_up.receive()
                        return msg.data if isinstance(msg, Token) else None

                    yield send, receive
        finally:
            finished.set()
            _stop(procs)
            nursery.cancel_scope.cancel()


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


async def ring_per_token(shape: Shape, tokens: int, inline: bool = False,
                         stack: str = "tcp") -> float:
    """Median seconds for a message to go around the ring once (and through the head)."""
    head = _product(shape.head_mb, shape.threads)
    async with _ring(shape, inline, stack) as (send, receive):
        times = []
        for _ in range(tokens):
            started = time.perf_counter()
            await send(b"x" * MESSAGE_BYTES)
            if await receive() is None:
                raise RuntimeError("a hop closed the ring")
            await head()
            times.append(time.perf_counter() - started)
    return statistics.median(times[tokens // 10:])


async def engine_per_token(shape: Shape, tokens: int) -> float:
    """Median seconds for the same products back to back, one thread hand-off per token."""
    w, x = _weights(shape.hop_mb, shape.threads)
    head_w, _ = _weights(shape.head_mb, shape.threads)
    limiter = trio.CapacityLimiter(1)

    def token() -> None:
        for _ in range(shape.hops):
            x @ w
        if shape.head_mb > 0:
            x @ head_w

    times = []
    for _ in range(tokens):
        started = time.perf_counter()
        await trio.to_thread.run_sync(token, limiter=limiter)
        times.append(time.perf_counter() - started)
    return statistics.median(times[tokens // 10:])


ENGINE = "engine-like: back to back in one process"


async def run(args: argparse.Namespace) -> None:
    shape = Shape(args.hops, args.hop_mb, args.head_mb, args.threads, args.cores_per_process)
    paths: dict[str, Callable[[], Awaitable[float]]] = {
        ENGINE: lambda: engine_per_token(shape, args.tokens),
        "ring, compute in a worker thread (as a node)": lambda: ring_per_token(
            shape, args.tokens),
        "ring, compute on the event loop": lambda: ring_per_token(
            shape, args.tokens, inline=True),
        "ring over libp2p streams (Noise, yamux), thread": lambda: ring_per_token(
            shape, args.tokens, stack="raw"),
        "ring over p2p session streams, thread": lambda: ring_per_token(
            shape, args.tokens, stack="session"),
    }
    results: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(args.repeats):  # interleaved rounds: a noisy minute hits every path
        for name, measure in paths.items():
            results[name].append(await measure())
        # As it goes, so a run cut short (a lent machine's time limit) still tells something.
        print(f"round {r + 1}: " + ", ".join(f"{v[-1] * 1e3:.1f}" for v in results.values())
              + " ms per token", flush=True)
    engine = min(results[ENGINE])
    rows = []
    for name, values in results.items():
        best = min(values)
        # Per round, against the engine's run of the same round: a lucky or unlucky minute
        # (on this shared machine the engine alone has varied by 40% between rounds) moves
        # it less than the ratio of the bests.
        paired = statistics.median(e / v for e, v in zip(results[ENGINE], values, strict=True))
        rows.append([name, f"{best * 1e3:.2f}", f"{(best - engine) * 1e3:.2f}",
                     f"{engine / best:.3f}", f"{paired:.3f}",
                     " ".join(f"{v * 1e3:.1f}" for v in values)])
    head = f", the client a {shape.head_mb} MB head" if shape.head_mb else ""
    if shape.cores_per_process:
        head += f", {shape.cores_per_process} cores of its own for each process"
    print(f"{shape.hops} hops on loopback, {shape.hop_mb} MB matrix-vector product per hop"
          f"{head}, {shape.threads} BLAS thread(s), {MESSAGE_BYTES}-byte messages; best of "
          f"{args.repeats} interleaved rounds (median over {args.tokens} tokens each)")
    print(table(["path", "ms per token", "overhead ms", "vs engine", "paired", "rounds (ms)"],
                rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Shape()
    parser.add_argument("--hops", type=int, default=default.hops)
    parser.add_argument("--hop-mb", type=int, default=default.hop_mb,
                        help="weights streamed per hop and token (a 125M node: ~100 MB fp32)")
    parser.add_argument("--head-mb", type=int, default=default.head_mb,
                        help="weights the client streams per token (the 125M head: 98 MB)")
    parser.add_argument("--threads", type=int, default=default.threads,
                        help="BLAS threads per product (a shardnet node and engine use 2 here)")
    parser.add_argument("--tokens", type=int, default=150)
    parser.add_argument("--cores-per-process", type=int, default=0,
                        help="cores of its own for the client and each hop, as if each were "
                             "a machine (needs (hops + 1) x k cores); 0: all share")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--serve-hop", metavar="NEXT", help=argparse.SUPPRESS)
    parser.add_argument("--stack", choices=STACKS, default="tcp", help=argparse.SUPPRESS)
    parser.add_argument("--inline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    env = None
    if args.threads > 1 and "OPENBLAS_THREAD_TIMEOUT" not in os.environ:
        # Idle OpenBLAS workers spin ~0.1 s by default, on the cores the other hops need;
        # shardnet sets 18 (sharding/_openblas.py, which would import torch here). OpenBLAS
        # reads it once, when numpy loads: start again with it.
        env = {**os.environ, "OPENBLAS_THREAD_TIMEOUT": "18"}
    if args.cores_per_process and args.serve_hop is None:
        check_cores(args.cores_per_process, args.hops + 1)
        pin_this_process(args.cores_per_process, env)
    elif env is not None:
        os.execve(sys.executable, [sys.executable, "-m", "devnet.bench.floor", *sys.argv[1:]],
                  env)
    if args.serve_hop is not None:
        shape = Shape(hop_mb=args.hop_mb, threads=args.threads)
        trio.run(serve_hop, args.serve_hop, shape, args.inline, args.stack)
    else:
        trio.run(run, args)


if __name__ == "__main__":
    main()
