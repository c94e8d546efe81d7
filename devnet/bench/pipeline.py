"""Benchmark: a 3-node pipeline on loopback vs the single-process engine vs `transformers`.

Run: `python -m devnet.bench.pipeline` (a few minutes on 2 cores).

For the ~125M random Llama (hidden 768, 12 layers, GQA 12/4, vocab 32000) and for the embedded
model: three node processes on loopback, one per span, and one client that runs the embedding
and head itself. Measured in this one run, fp32 on the CPU, best of `--repeats`:

- decode tokens/s (greedy, `--new-tokens` tokens after the first),
- time to first token for a `--prompt`-token prompt, and prefill tokens/s (prompt / TTFT),

for the pipeline (with the `int8-block` and `raw` codecs), the single-process engine, and
`transformers` `generate`. Nodes get 2 torch threads each: a pipeline runs one stage at a time,
so each node may use the whole machine while it computes, like the single-process engine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import trio

from devnet import Devnet
from devnet.bench._common import random_hf_checkpoint, table
from node._client import Client, ClientConfig
from node._generate import GenerationStats, generate_ids
from node._local import LocalStages
from node._sampling import Sampler, SamplingParams
from sharding import EMBEDDED_MODEL, Checkpoint, Span


def even_spans(num_stages: int, parts: int = 3) -> list[str]:
    """`parts` contiguous spans covering the blocks about equally (ends ride along)."""
    blocks = num_stages - 2
    cuts = [0] + [1 + blocks * i // parts for i in range(1, parts)] + [num_stages]
    return [f"{a}:{b}" for a, b in zip(cuts, cuts[1:], strict=False)]


def with_tokenizer(folder: Path) -> Path:
    """Random checkpoints have no tokenizer; the client only needs one to exist."""
    if not (folder / "tokenizer.json").is_file():
        from sharding.embedded.train import tokenizer_json

        (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json()))
    return folder


def prompt_ids(folder: Path, n: int) -> list[int]:
    vocab = Checkpoint.open(folder).config.vocab_size
    g = torch.Generator().manual_seed(0)
    return [int(t) for t in torch.randint(0, min(vocab, 256), (n,), generator=g)]


async def engine_run(span: Span, ids: list[int], new_tokens: int,
                     out: list[int] | None = None) -> GenerationStats:
    stages = LocalStages(span, max_length=len(ids) + new_tokens)
    stats = GenerationStats()
    sampler = Sampler(SamplingParams(temperature=0, max_new_tokens=new_tokens))
    async for token in generate_ids(stages.forward, ids, sampler, eos_id=None, stats=stats):
        if out is not None:
            out.append(token)
    return stats


def agreement(a: Sequence[int], b: Sequence[int]) -> str:
    """Tokens equal to the engine's greedy tokens, up to the first divergence and overall."""
    prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                  min(len(a), len(b)))
    same = sum(x == y for x, y in zip(a, b, strict=False))
    return f"{prefix}/{len(b)} then {same}/{len(b)}"


def transformers_run(model: object, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of `generate`, greedy."""
    x = torch.tensor([ids])

    def gen(n: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,  # type: ignore[attr-defined]
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - started

    ttft = gen(1)
    total = gen(new_tokens)
    return ttft, (new_tokens - 1) / max(total - ttft, 1e-9)


def best(stats: Sequence[GenerationStats]) -> tuple[float, float]:
    return (min(s.first_token_s for s in stats), max(s.decode_tokens_per_s for s in stats))


async def measure(name: str, folder: Path, args: argparse.Namespace) -> list[list[object]]:
    import transformers

    ids = prompt_ids(folder, args.prompt)
    n = args.new_tokens
    ckpt = Checkpoint.open(folder)
    span = Span.load(ckpt, 0, ckpt.config.num_stages, dtype=torch.float32)
    reference: list[int] = []
    engine = [await engine_run(span, ids, n, reference if not r else None)
              for r in range(args.repeats)]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf_runs = [transformers_run(hf, ids, n) for _ in range(args.repeats)]
    del hf, span
    e_ttft, e_dec = best(engine)
    t_ttft, t_dec = min(r[0] for r in hf_runs), max(r[1] for r in hf_runs)
    rows: list[list[object]] = [
        [name, "transformers", t_dec, t_dec / e_dec, t_ttft * 1e3, t_ttft / e_ttft,
         args.prompt / t_ttft, "", ""],
        [name, "engine (1 process)", e_dec, 1.0, e_ttft * 1e3, 1.0, args.prompt / e_ttft, "",
         ""],
    ]
    spans = even_spans(ckpt.config.num_stages)
    with tempfile.TemporaryDirectory(prefix="shardnet-bench-") as root:
        async with Devnet(3, root=Path(root), model=folder, spans=spans,
                          extra_args=["--threads", str(args.node_threads),
                                      "--prefill-threads", str(args.node_prefill_threads)]) as net:
            for codec in ("int8-block", "raw"):
                config = ClientConfig(bootstrap=net.bootstrap_addrs, codec=codec)
                async with Client(model=folder, config=config) as client:
                    client.eos_id = None  # fixed-length generations for a fair comparison
                    runs = []
                    tokens: list[int] = []
                    for _ in range(args.repeats + 1):  # the first run warms the route up
                        tokens = [t async for t in client.generate_ids(ids, max_new_tokens=n)]
                        runs.append(client.last.stats)
                    route = client.last.describe_route()
                p_ttft, p_dec = best(runs[1:])
                rows.append([name, f"pipeline 3 nodes, {codec}", p_dec, p_dec / e_dec,
                             p_ttft * 1e3, p_ttft / e_ttft, args.prompt / p_ttft,
                             agreement(tokens, reference), route])
    return rows


async def main_async(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    rows: list[list[object]] = []
    if "random" in args.models:
        folder = with_tokenizer(random_hf_checkpoint(args.cache / "llama-125m"))
        rows += await measure("llama-125m (random)", folder, args)
    if "embedded" in args.models:
        rows += await measure("embedded", EMBEDDED_MODEL, args)
    print(f"prompt {args.prompt} tokens, {args.new_tokens} new tokens, greedy, fp32, CPU, "
          f"{args.threads} threads in the client / single process, {args.node_threads} per "
          f"node, best of {args.repeats}")
    print(table(["model", "path", "decode tok/s", "vs engine", "TTFT ms", "vs engine",
                 "prefill tok/s", "greedy = engine", "route"], rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="client and single-process threads")
    p.add_argument("--node-threads", type=int, default=1)
    p.add_argument("--node-prefill-threads", type=int, default=1)
    p.add_argument("--models", default="random,embedded")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "shardnet-bench")
    args = p.parse_args(argv)
    trio.run(main_async, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
