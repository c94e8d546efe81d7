"""The `shardnet` command line: one subcommand per job (`demo` for now; more as they land)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sharding import EMBEDDED_MODEL


def _demo(args: argparse.Namespace) -> int:
    """Generate from the embedded model through a chain of spans, quantized between them."""
    import torch

    from sharding import Checkpoint, Span, Tokenizer, decode, encode

    torch.set_num_threads(args.threads)
    ckpt = Checkpoint.open(args.model)
    n = ckpt.config.num_stages
    cuts = [0, n // 3, 2 * n // 3, n]
    bounds = list(zip(cuts, cuts[1:], strict=False))
    spans = [Span.load(ckpt, a, b, dtype=torch.float32) for a, b in bounds]
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
    demo = sub.add_parser("demo", help="generate from the embedded model through a span chain")
    demo.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    demo.add_argument("--prompt", default="The list type")
    demo.add_argument("--max-new-tokens", type=int, default=120)
    demo.add_argument("--codec", default="int8-block", choices=["raw", "fp16", "int8-block"])
    demo.add_argument("--threads", type=int, default=2)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
