"""Benchmark: the per-token floor of any pipeline built from trio processes on this machine.

Run: `python -m devnet.bench.floor` (about 2 minutes on 2 cores).

A pipeline token crosses its hops one after another, so whatever a hop spends besides its
compute adds up on every token. How much of that is shardnet's own code (libp2p, Noise,
yamux, framing, validation, codecs, batching) and how much is the bare architecture every
Python node shares? This measures the bare part: `--hops` processes in a ring over loopback
TCP with the client, each hop receiving a small message, running a memory-bound matrix-vector
product of `--hop-mb` MB (the shape of a decode step: one row against streamed weights) in a
worker thread behind a `CapacityLimiter` exactly as a node does, and forwarding the message.
No encryption, no muxer, no framing beyond a fixed size, no torch.

It prints the ring's time per token next to the same products run back to back in one thread
(what a single-process engine does), and the same ring with the product on the event loop
(no thread hand-off, which a node must not do), so the two costs can be told apart:

    overhead = ring per token - the same compute back to back

That overhead is the floor under `devnet.bench.pipeline`'s gap to the single-process engine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import numpy as np
import trio

from devnet.bench._common import table

MESSAGE_BYTES = 1024  # about one int8-block hidden state of a 768-wide model


def _weights(megabytes: int) -> tuple[np.ndarray, np.ndarray]:
    from threadpoolctl import threadpool_limits  # one BLAS thread, as a node runs

    threadpool_limits(1)
    rows = 768
    w = np.random.default_rng(0).random((rows, megabytes * (1 << 20) // (4 * rows)),
                                        dtype=np.float32)
    return w, np.ones(rows, dtype=np.float32)


async def _receive_exactly(stream: trio.SocketStream, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


async def serve_hop(next_port: int, megabytes: int, inline: bool) -> None:
    """One hop: print the listening port, then receive, compute, forward, until EOF."""
    w, x = _weights(megabytes)
    limiter = trio.CapacityLimiter(1)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    upstream = await listeners[0].accept()
    downstream = await trio.open_tcp_stream("127.0.0.1", next_port)
    async with upstream, downstream:
        while (message := await _receive_exactly(upstream, MESSAGE_BYTES)) is not None:
            if inline:
                x @ w
            else:
                await trio.to_thread.run_sync(lambda: x @ w, limiter=limiter)
            await downstream.send_all(message)


def _start_ring(hops: int, client_port: int, megabytes: int, inline: bool
                ) -> tuple[list[subprocess.Popen[str]], int]:
    """Start the hops last to first (each needs its successor's port); the first's port."""
    procs: list[subprocess.Popen[str]] = []
    port = client_port
    for _ in range(hops):
        proc = subprocess.Popen(
            [sys.executable, "-m", "devnet.bench.floor", "--serve-hop", str(port),
             "--hop-mb", str(megabytes)] + (["--inline"] if inline else []),
            stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline() if proc.stdout is not None else ""
        if not line.strip().isdigit():
            raise RuntimeError(f"a hop did not start (it printed {line!r})")
        port = int(line)
    return procs, port


async def ring_per_token(hops: int, megabytes: int, tokens: int, inline: bool) -> float:
    """Median seconds for a message to go around the ring once."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    procs, first = _start_ring(hops, listeners[0].socket.getsockname()[1], megabytes, inline)
    try:
        with trio.fail_after(120):
            downstream = await trio.open_tcp_stream("127.0.0.1", first)
            upstream = await listeners[0].accept()
        times = []
        async with downstream, upstream:
            for _ in range(tokens):
                started = time.perf_counter()
                await downstream.send_all(b"x" * MESSAGE_BYTES)
                if await _receive_exactly(upstream, MESSAGE_BYTES) is None:
                    raise RuntimeError("a hop closed the ring")
                times.append(time.perf_counter() - started)
        return statistics.median(times[tokens // 10:])
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for listener in listeners:
            await listener.aclose()


async def engine_per_token(hops: int, megabytes: int, tokens: int) -> float:
    """Median seconds for the same products back to back, one thread hand-off per token."""
    w, x = _weights(megabytes)
    limiter = trio.CapacityLimiter(1)

    def token() -> None:
        for _ in range(hops):
            x @ w

    times = []
    for _ in range(tokens):
        started = time.perf_counter()
        await trio.to_thread.run_sync(token, limiter=limiter)
        times.append(time.perf_counter() - started)
    return statistics.median(times[tokens // 10:])


async def run(args: argparse.Namespace) -> None:
    paths: dict[str, Callable[[], Awaitable[float]]] = {
        "engine-like: back to back, one thread": lambda: engine_per_token(
            args.hops, args.hop_mb, args.tokens),
        "ring, compute in a worker thread (as a node)": lambda: ring_per_token(
            args.hops, args.hop_mb, args.tokens, inline=False),
        "ring, compute on the event loop": lambda: ring_per_token(
            args.hops, args.hop_mb, args.tokens, inline=True),
    }
    results: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):  # interleaved rounds: a noisy minute hits every path
        for name, measure in paths.items():
            results[name].append(await measure())
    engine = min(results["engine-like: back to back, one thread"])
    rows = []
    for name, values in results.items():
        best = min(values)
        rows.append([name, f"{best * 1e3:.2f}", f"{(best - engine) * 1e3:.2f}",
                     f"{engine / best:.3f}", " ".join(f"{v * 1e3:.1f}" for v in values)])
    print(f"{args.hops} hops on loopback TCP, {args.hop_mb} MB matrix-vector product per hop, "
          f"{MESSAGE_BYTES}-byte messages; best of {args.repeats} interleaved rounds "
          f"(median over {args.tokens} tokens each)")
    print(table(["path", "ms per token", "overhead ms", "vs engine", "rounds (ms)"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hops", type=int, default=3)
    parser.add_argument("--hop-mb", type=int, default=100,
                        help="weights streamed per hop and token (a 125M node: ~100 MB fp32)")
    parser.add_argument("--tokens", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serve-hop", type=int, metavar="NEXT_PORT", help=argparse.SUPPRESS)
    parser.add_argument("--inline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_hop is not None:
        trio.run(serve_hop, args.serve_hop, args.hop_mb, args.inline)
    else:
        trio.run(run, args)


if __name__ == "__main__":
    main()
