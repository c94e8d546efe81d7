"""`shardnet node run|bootstrap` (also `python -m node run|bootstrap`): the daemon's flags."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from node._errors import NodeError, sole_error
from node._worker import ServerLimits
from p2p import P2PError
from sharding import ShardingError

if TYPE_CHECKING:
    from node._daemon import NodeConfig

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i)?)?B?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4GB' (decimal) / '512MiB' (binary) / '1000000' (bytes) -> bytes."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GB or 512MiB)")
    number, unit, binary = match.groups()
    power = "KMGT".index(unit.upper()) + 1 if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def add_node_parser(sub: Any) -> None:
    """Add `node run` and `node bootstrap` under `sub`."""
    node = sub.add_parser("node", help="run a node daemon or a bootstrap peer")
    roles = node.add_subparsers(dest="role", required=True)
    for role in ("run", "bootstrap"):
        p = roles.add_parser(role, help="serve a span of a model" if role == "run"
                             else "a DHT/gossip peer that serves no model")
        p.add_argument("--config", type=Path, help="TOML file (keys = NodeConfig fields)")
        p.add_argument("--data-dir", type=Path, default=Path.home() / ".shardnet" / "node")
        p.add_argument("--listen", action="append", help="multiaddr (repeatable)")
        p.add_argument("--bootstrap", action="append", help="multiaddr /.../p2p/ID (repeatable)")
        p.add_argument("--no-mdns", action="store_true", help="no LAN discovery")
        p.add_argument("--log-level", default="INFO")
        p.add_argument("--link-delay-ms", type=non_negative,
                       help="WAN emulation: one-way delay added to every message sent (ms)")
        p.add_argument("--link-bandwidth-mbps", type=non_negative,
                       help="WAN emulation: send rate cap per link, megabits/s (0 = none)")
        if role == "run":
            p.add_argument("--model", type=Path, help="checkpoint folder (default: embedded)")
            p.add_argument("--span", help="'auto' (default) or a:b")
            p.add_argument("--memory-budget", type=parse_size, help="e.g. 4GB")
            p.add_argument("--threads", type=positive_int,
                           help="torch threads for decode (default 1)")
            p.add_argument("--prefill-threads", type=positive_int,
                           help="torch threads for prefill chunks (default: every core)")
            p.add_argument("--packed-weights", choices=("auto", "on", "off"),
                           help="also hold the span's matrices in oneDNN's layout: much faster "
                                "batches and prefill for twice the weights' memory (default "
                                "auto: when the memory budget has room)")
            p.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA if present)")
            p.add_argument("--max-sessions", type=positive_int)
            p.add_argument("--max-cache-tokens", type=positive_int)
            p.add_argument("--max-length", type=positive_int)
            p.add_argument("--grace", type=float, help="seconds open sessions may finish")
            p.add_argument("--rebalance-interval", type=non_negative,
                           help="seconds between checks whether an auto span should move "
                                "(default 30; 0 = never move)")
        p.set_defaults(func=_run)


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (thread counts, token counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text!r}")
    return value


def non_negative(text: str) -> float:
    """An argparse type: a finite number >= 0 (also used by `devnet up`'s shaping flags)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """The `NodeConfig` that `node run|bootstrap` flags (and `--config`) describe.

    Raises:
        NodeError: unreadable or unknown TOML.
        ValueError: a value out of range.
    """
    from node._daemon import NodeConfig

    overrides: dict[str, Any] = {"data_dir": args.data_dir}
    if args.listen:
        overrides["listen"] = tuple(args.listen)
    if args.bootstrap:
        overrides["bootstrap"] = tuple(args.bootstrap)
    if args.no_mdns:
        overrides["mdns"] = False
    if args.link_delay_ms is not None:
        overrides["link_delay_s"] = args.link_delay_ms / 1000
    if args.link_bandwidth_mbps is not None:
        overrides["link_bandwidth_bps"] = args.link_bandwidth_mbps * 1e6 / 8  # bits -> bytes
    if args.role == "run":
        flags = {"model": "model", "span": "span", "memory_budget": "memory_budget_bytes",
                 "threads": "threads", "prefill_threads": "prefill_threads",
                 "packed_weights": "packed_weights",
                 "device": "device", "grace": "grace_s",
                 "rebalance_interval": "rebalance_interval_s"}
        for flag, key in flags.items():
            if getattr(args, flag) is not None:
                overrides[key] = getattr(args, flag)
    config = (NodeConfig.from_toml(args.config, **overrides) if args.config
              else NodeConfig(**overrides))
    if args.role == "run":
        limits = {k: getattr(args, k) for k in ("max_sessions", "max_cache_tokens",
                                                "max_length") if getattr(args, k)}
        if limits:
            config = replace(config, limits=ServerLimits(**{**asdict(config.limits),
                                                            **limits}))
    return config


# What a daemon may fail with on bad flags, config or environment: reported in a line.
_EXPECTED = (NodeError, ShardingError, P2PError, ValueError, OSError)


def _run(args: argparse.Namespace) -> int:
    from node._daemon import run_node

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("libp2p", "multiaddr", "async_service"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        config = config_from_args(args)
        role = "node" if args.role == "run" else "bootstrap"
        trio.run(lambda: run_node(config, role=role))
    except (*_EXPECTED, ExceptionGroup) as exc:
        cause = sole_error(exc)
        if not isinstance(cause, _EXPECTED):
            raise
        print(f"shardnet node: {cause}", file=sys.stderr)
        return 1
    return 0
