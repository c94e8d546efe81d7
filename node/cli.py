"""The `shardnet` command line: one subcommand per job.

`demo` runs the main job (a 3-node devnet, one prompt through it); `generate` streams a
completion through the swarm (`--local`: the whole model in this process, the reference the
network path must match); `node` runs the daemon; `devnet` runs and disturbs a local network.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from node._errors import sole_error
from sharding import EMBEDDED_MODEL

if TYPE_CHECKING:
    from node._sampling import SamplingParams


def _sampling_args(p: argparse.ArgumentParser) -> None:
    from node._node_cli import positive_int

    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _params(args: argparse.Namespace) -> SamplingParams:
    from node._sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, max_new_tokens=args.max_new_tokens,
                          stop=tuple(args.stop))


def _bootstrap_addrs(args: argparse.Namespace) -> tuple[str, ...]:
    """--bootstrap flags, else the bootstrap of the devnet in --devnet DIR (if one runs)."""
    if args.bootstrap:
        return tuple(args.bootstrap)
    from devnet import read_topology

    topology = read_topology(args.devnet)
    return topology.bootstrap.addrs if topology is not None else ()


def _generate(args: argparse.Namespace) -> int:
    import torch

    from node._generate import GenerationStats
    from node._textgen import LocalModel

    try:
        params = _params(args)
    except ValueError as exc:  # the sampling flags, checked together by SamplingParams
        print(f"shardnet generate: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if args.local:
        model = LocalModel(args.model, device=args.device, threads=args.threads)
        stats = GenerationStats()

        async def run_local() -> None:
            async for piece in model.generate(args.prompt, params, stats):
                print(piece, end="", flush=True)

        trio.run(run_local)
        print(f"\n[local {model.checkpoint.model_id[:12]}: {stats.new_tokens} tokens, "
              f"first token {stats.first_token_s * 1000:.0f} ms, "
              f"{stats.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)
        return 0
    bootstrap = _bootstrap_addrs(args)
    if not bootstrap:
        print("shardnet generate: no --bootstrap given and no devnet running in "
              f"{args.devnet} (start one with `shardnet devnet up`, or use --local)",
              file=sys.stderr)
        return 2
    return trio.run(_generate_network, args, bootstrap, params)


async def _generate_network(args: argparse.Namespace, bootstrap: tuple[str, ...],
                            params: SamplingParams) -> int:
    from node._client import Client, ClientConfig
    from node._errors import GenerationError

    config = ClientConfig(bootstrap=bootstrap, codec=args.codec,
                          route_timeout_s=args.route_timeout)
    try:
        async with Client(model=args.model, config=config) as client:
            async for piece in client.generate(
                    args.prompt, max_new_tokens=params.max_new_tokens,
                    temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                    seed=params.seed, stop=params.stop):
                print(piece, end="", flush=True)
            info = client.last
    except GenerationError as exc:
        print(f"\nshardnet generate: {exc}", file=sys.stderr)
        return 1
    s = info.stats
    print(f"\n[route {info.describe_route()}; {s.new_tokens} tokens, first token "
          f"{s.first_token_s * 1000:.0f} ms, {s.decode_tokens_per_s:.1f} tokens/s]",
          file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The main job: a 3-node devnet on loopback, one prompt through it, then shut down."""
    return trio.run(_demo_async, args)


async def _demo_async(args: argparse.Namespace) -> int:
    import tempfile

    from devnet import Devnet, DevnetError
    from node._client import Client, ClientConfig
    from node._errors import GenerationError
    from sharding import Checkpoint

    n = Checkpoint.open(args.model).config.num_stages
    cuts = [0, 1 + (n - 2) // 3, 1 + 2 * (n - 2) // 3, n]
    spans = [f"{a}:{b}" for a, b in zip(cuts, cuts[1:], strict=False)]
    print(f"starting a devnet: a bootstrap and 3 nodes serving {', '.join(spans)} of "
          f"{args.model.name} ...", flush=True)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="shardnet-demo-") as root:
            async with Devnet(3, root=Path(root), model=args.model, spans=spans) as net:
                print(f"devnet up in {time.perf_counter() - started:.1f} s:")
                for i, node in enumerate(net.nodes):
                    print(f"  node {i}: {node.peer_id[-12:]}  stages {spans[i]}  pid {node.pid}")
                config = ClientConfig(bootstrap=net.bootstrap_addrs, codec=args.codec)
                async with Client(model=args.model, config=config) as client:
                    print(f"\n{args.prompt}", end="", flush=True)
                    async for piece in client.generate(args.prompt,
                                                       max_new_tokens=args.max_new_tokens):
                        print(piece, end="", flush=True)
                    info = client.last
                s = info.stats
                print(f"\n\nroute: {info.describe_route()}  (codec {args.codec})")
                print(f"{s.prompt_tokens} prompt tokens, {s.new_tokens} new tokens; "
                      f"time to first token {s.first_token_s * 1000:.0f} ms; "
                      f"decode {s.decode_tokens_per_s:.1f} tokens/s")
                print("stopping the devnet ...", flush=True)
    except (DevnetError, GenerationError) as exc:
        print(f"shardnet demo: {exc}", file=sys.stderr)
        return 1
    print("done: every node drained and exited.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `shardnet` console script."""
    from node._node_cli import add_node_parser, non_negative, positive_int

    parser = argparse.ArgumentParser(prog="shardnet", description="Run LLMs across peers.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job: generate through a chain of spans")
    demo.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    demo.add_argument("--prompt", default="The list type")
    demo.add_argument("--max-new-tokens", type=positive_int, default=120)
    demo.add_argument("--codec", default="int8-block", choices=["raw", "fp16", "int8-block"])
    demo.set_defaults(func=_demo)

    gen = sub.add_parser("generate", help="stream a completion for a prompt")
    _sampling_args(gen)
    gen.add_argument("--local", action="store_true", help="run the whole model in this process")
    gen.add_argument("--bootstrap", action="append", help="bootstrap multiaddr (repeatable)")
    gen.add_argument("--devnet", type=Path, default=Path(tempfile.gettempdir())
                     / "shardnet-devnet", help="use this devnet's bootstrap when no --bootstrap")
    gen.add_argument("--codec", default="int8-block", choices=["raw", "fp16", "int8-block"])
    gen.add_argument("--route-timeout", type=non_negative, default=30.0,
                     help="seconds to wait for peers that serve every stage")
    gen.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    gen.add_argument("--device", default=None, help="with --local: cpu, cuda, cuda:1")
    gen.add_argument("--threads", type=positive_int, default=2)
    gen.set_defaults(func=_generate)

    from devnet.cli import add_devnet_parser

    add_node_parser(sub)
    add_devnet_parser(sub)
    args = parser.parse_args(argv)
    # py-libp2p logs routine DHT chatter as warnings and every failed dial as an error (a dead
    # bootstrap: a dozen lines a second); in a terminal they would land in the middle of the
    # streamed text. Our own problems are reported as one-line errors instead. (`node run`
    # keeps py-libp2p's errors in its log: `_node_cli`.)
    for noisy in ("libp2p", "multiaddr", "async_service"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    expected = _user_errors()
    caught: tuple[type[Exception], ...] = (*expected, ExceptionGroup)
    try:
        return int(args.func(args))
    except caught as exc:
        cause = sole_error(exc)
        if not isinstance(cause, expected):
            raise
        print(f"shardnet {args.command}: {cause}", file=sys.stderr)
        return 1


def _user_errors() -> tuple[type[Exception], ...]:
    """What a command may fail with on bad input or a broken network: a line, no traceback
    (a bad `--model` folder, an unknown device, a peer that cannot be dialled)."""
    from devnet import DevnetError
    from node._errors import NodeError
    from p2p import P2PError
    from sharding import ShardingError

    return (DevnetError, NodeError, P2PError, ShardingError)


if __name__ == "__main__":
    sys.exit(main())
