"""The `shardnet` command line: one subcommand per job.

`demo` runs the main job; `generate` streams a completion (`--local`: the whole model in this
process, the reference the network path must match).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from sharding import EMBEDDED_MODEL

if TYPE_CHECKING:
    from node._sampling import SamplingParams


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
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


def _generate(args: argparse.Namespace) -> int:
    import torch

    from node._generate import GenerationStats
    from node._sampling import SamplingParams
    from node._textgen import LocalModel

    torch.set_num_threads(args.threads)
    params = _params(args)
    if not isinstance(params, SamplingParams):  # pragma: no cover - _params builds one
        raise TypeError(params)
    if not args.local:
        print("shardnet generate: the network path needs --bootstrap (see `shardnet node run`);"
              " use --local to run the whole model here", file=sys.stderr)
        return 2
    model = LocalModel(args.model, device=args.device)
    stats = GenerationStats()

    async def run() -> None:
        async for piece in model.generate(args.prompt, params, stats):
            print(piece, end="", flush=True)

    trio.run(run)
    print(f"\n[local {model.checkpoint.model_id[:12]}: {stats.new_tokens} tokens, "
          f"first token {stats.first_token_s * 1000:.0f} ms, "
          f"{stats.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Generate from the embedded model through a chain of spans, quantized between them."""
    import torch

    from sharding import Checkpoint, Span, Tokenizer, decode, encode

    torch.set_num_threads(args.threads)
    ckpt = Checkpoint.open(args.model)
    n = ckpt.config.num_stages
    cuts = [0, n // 3, 2 * n // 3, n]
    bounds = list(zip(cuts, cuts[1:], strict=False))
    spans = [Span.load(ckpt, a, b) for a, b in bounds]
    tok = Tokenizer.from_folder(args.model)
    ids = tok.encode(args.prompt)
    caches = [s.new_cache(len(ids) + args.max_new_tokens) for s in spans]
    print(f"model {ckpt.model_id[:16]}  ({ckpt.config.family}, {ckpt.config.num_layers} blocks)")
    print("chain: " + " -> ".join(f"[{a},{b})" for a, b in bounds)
          + f"  codec {args.codec} between spans")
    print(args.prompt, end="", flush=True)
    out: list[int] = []
    started = time.perf_counter()
    first = 0.0
    x = torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(args.max_new_tokens):
            h: torch.Tensor = x
            for i, (span, cache) in enumerate(zip(spans, caches, strict=True)):
                h = span(h, cache, last_only=True)
                if i < len(spans) - 1:
                    h = decode(encode(h, args.codec))
            nxt = int(h[0, -1].argmax())
            if not first:
                first = time.perf_counter() - started
            if nxt == tok.token_id("<|endoftext|>"):
                break
            out.append(nxt)
            x = torch.tensor([[nxt]])
    elapsed = time.perf_counter() - started
    print(tok.decode(out))
    rate = (len(out) - 1) / (elapsed - first) if len(out) > 1 and elapsed > first else 0.0
    print(f"\n{len(out)} tokens, time to first token {first * 1000:.0f} ms, {rate:.1f} tokens/s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `shardnet` console script."""
    parser = argparse.ArgumentParser(prog="shardnet", description="Run LLMs across peers.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job: generate through a chain of spans")
    demo.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    demo.add_argument("--prompt", default="The list type")
    demo.add_argument("--max-new-tokens", type=int, default=120)
    demo.add_argument("--codec", default="int8-block", choices=["raw", "fp16", "int8-block"])
    demo.add_argument("--threads", type=int, default=2)
    demo.set_defaults(func=_demo)

    gen = sub.add_parser("generate", help="stream a completion for a prompt")
    _sampling_args(gen)
    gen.add_argument("--local", action="store_true", help="run the whole model in this process")
    gen.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    gen.add_argument("--device", default=None)
    gen.add_argument("--threads", type=int, default=2)
    gen.set_defaults(func=_generate)

    from devnet.cli import add_devnet_parser
    from node._node_cli import add_node_parser

    add_node_parser(sub)
    add_devnet_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
