"""Benchmark: a 3-node pipeline on loopback vs the single-process engine vs `transformers`.

Run: `python -m devnet.bench.pipeline` (a few minutes on 2 cores).

For the ~125M random Llama (hidden 768, 12 layers, GQA 12/4, vocab 32000) and for the embedded
model: three node processes on loopback, one per span, and one client that runs the embedding
and head itself. Measured in this one run, fp32 on the CPU, best of `--repeats`:

- decode tokens/s (greedy, `--new-tokens` tokens after the first),
- time to first token for a `--prompt`-token prompt, and prefill tokens/s (prompt / TTFT),

for the pipeline (push with the `int8-block` and `raw` codecs, and client-driven), the
single-process engine, and `transformers` `generate`; each ratio to the engine both as the
ratio of the bests and as the median of the per-round ratios (`paired`). Nodes decode with one
torch thread each (`--node-threads`): a decode step streams weights, which one thread does at
nearly the machine's memory bandwidth; they prefill with every core, their OpenMP workers
sleeping soon after a forward ends (`GOMP_SPINCOUNT=1000`, set by `node`), so the next hop gets
the cores.

Then, on the 125M model (`--sections`):

- `wan`: push vs client-driven per-token latency and time to first token with a one-way delay
  of 0, 10 and 50 ms on every message every process sends (the link shaper, `--link-delay-ms`
  on the nodes and `ClientConfig.link_delay_s` on the client);
- `clients`: aggregate decode tokens/s of 1, 4 and 8 concurrent clients, beside the compute
  ceiling of this CPU: the single-process engine's batched decode of that many sequences over
  its decode of one (what batching could give at best here);
- `failover`: a 4-node devnet with a spare for the middle span; the middle hop is killed
  (SIGKILL) mid-generation; the stall is the longest gap between two tokens minus the median
  gap, and the output must equal the undisturbed one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import torch
import trio

from devnet import Devnet
from devnet._commands import CommandBuilder, node_command
from devnet._status import Role
from devnet.bench._common import check_cores, pin_this_process, pinned, random_hf_checkpoint, table
from node._client import Client, ClientConfig
from node._generate import GenerationStats, generate_ids
from node._local import LocalStages
from node._sampling import Sampler, SamplingParams
from sharding import EMBEDDED_MODEL, Checkpoint, Span, use_threads


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
                     out: list[int] | None = None, *, threads: int) -> GenerationStats:
    stages = LocalStages(span, max_length=len(ids) + new_tokens, threads=threads)
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


async def client_runs(client: Client, ids: list[int], n: int,
                      repeats: int) -> tuple[list[GenerationStats], list[int]]:
    """`repeats` timed generations after one that warms the route up."""
    client.eos_id = None  # fixed-length generations for a fair comparison
    runs = []
    tokens: list[int] = []
    for _ in range(repeats + 1):
        tokens = [t async for t in client.generate_ids(ids, max_new_tokens=n)]
        runs.append(client.last.stats)
    return runs[1:], tokens


def best(stats: Sequence[GenerationStats]) -> tuple[float, float]:
    return (min(s.first_token_s for s in stats), max(s.decode_tokens_per_s for s in stats))


async def measure(name: str, folder: Path, args: argparse.Namespace) -> list[list[object]]:
    """One model's rows. Every path runs once per round, rounds interleaved while the devnet
    is up, best of `repeats` rounds each: on a shared machine a noisy minute then hits every
    path alike instead of flattering one of them. Beside the ratio of the bests, each row
    gives the median over rounds of the ratio within a round (`paired`), which a single
    lucky or unlucky run moves less."""
    import transformers

    ids = prompt_ids(folder, args.prompt)
    n = args.new_tokens
    ckpt = Checkpoint.open(folder)
    span = Span.load(ckpt, 0, ckpt.config.num_stages, dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference: list[int] = []
    await engine_run(span, ids, n, reference, threads=args.threads)  # warm-up, reference
    modes = (("int8-block", "on"), ("raw", "on"), ("int8-block", "off"))
    engine: list[GenerationStats] = []
    hf_runs: list[tuple[float, float]] = []
    runs: dict[tuple[str, str], list[GenerationStats]] = {m: [] for m in modes}
    tokens: dict[tuple[str, str], list[int]] = {}
    routes: dict[tuple[str, str], str] = {}
    spans = even_spans(ckpt.config.num_stages)
    with tempfile.TemporaryDirectory(prefix="shardnet-bench-") as root:
        async with devnet(3, root, folder, spans, args) as net, AsyncExitStack() as stack:
            clients = {}
            for codec, push in modes:
                config = ClientConfig(bootstrap=net.bootstrap_addrs, codec=codec, push=push)
                client = await stack.enter_async_context(Client(model=folder, config=config))
                await client_runs(client, ids, n, 0)  # warms the route up
                clients[(codec, push)] = client
            order = list(clients.items())
            for r in range(args.repeats):
                engine.append(await engine_run(span, ids, n, threads=args.threads))
                torch.set_num_threads(args.threads)  # the engine's decode left torch on one
                hf_runs.append(transformers_run(hf, ids, n))
                # Rotated each round: the slot right after the single-process runs was slower
                # (a cold node after seconds of idling), whichever mode sat in it.
                for key, client in order[r % len(order):] + order[:r % len(order)]:
                    tokens[key] = [t async for t in client.generate_ids(ids, max_new_tokens=n)]
                    runs[key].append(client.last.stats)
                    routes[key] = client.last.describe_route()
    e_ttft, e_dec = best(engine)
    t_ttft, t_dec = min(r[0] for r in hf_runs), max(r[1] for r in hf_runs)
    per_round = [(s.first_token_s, s.decode_tokens_per_s) for s in engine]

    def paired(rounds: Sequence[tuple[float, float]]) -> tuple[float, float]:
        """Median over rounds of (decode ratio, TTFT ratio) against that round's engine run."""
        return (statistics.median(d / e[1] for (_, d), e in zip(rounds, per_round, strict=True)),
                statistics.median(t / e[0] for (t, _), e in zip(rounds, per_round, strict=True)))

    measured = [("transformers", t_dec, t_ttft, paired(hf_runs), "", ""),
                ("engine (1 process)", e_dec, e_ttft, (1.0, 1.0), "", "")]
    for codec, push in modes:
        p_ttft, p_dec = best(runs[(codec, push)])
        how = "push" if push == "on" else "client-driven"
        rounds = [(s.first_token_s, s.decode_tokens_per_s) for s in runs[(codec, push)]]
        measured.append((f"pipeline 3 nodes, {how}, {codec}", p_dec, p_ttft, paired(rounds),
                         agreement(tokens[(codec, push)], reference), routes[(codec, push)]))
    return [[name, path, dec, dec / e_dec, pair[0], ttft * 1e3, ttft / e_ttft, pair[1],
             args.prompt / ttft, agree, route]
            for path, dec, ttft, pair, agree, route in measured]


def devnet(count: int, root: str, folder: Path, spans: list[str], args: argparse.Namespace,
           *extra: str) -> Devnet:
    """The benchmark's devnet: `count` nodes serving `spans`, each on cores of its own when
    `--cores-per-process` asks for it."""
    prefill = ["--prefill-threads", str(args.node_prefill_threads)] \
        if args.node_prefill_threads else []
    builder = pinned_nodes(args.cores_per_process) if args.cores_per_process else None
    return Devnet(count, root=Path(root), model=folder, spans=spans, node_command=builder,
                  extra_args=["--threads", str(args.node_threads), *prefill, *extra])


def pinned_nodes(cores_per_process: int) -> CommandBuilder:
    """Starts node i under `taskset` on cores of its own (`cores_of(k, i + 1)`), as if each
    were a machine: its threads follow its affinity (`sharding.available_cores`). The
    bootstrap, which only gossips, gets the machine's last core."""
    last = (os.cpu_count() or 1) - 1

    def build(*, role: Role, data_dir: Path, listen: str, bootstrap: Sequence[str],
              model: Path | None, span: str, extra_args: Sequence[str]) -> list[str]:
        argv = node_command(role=role, data_dir=data_dir, listen=listen, bootstrap=bootstrap,
                            model=model, span=span, extra_args=extra_args)
        if role == "bootstrap":
            return ["taskset", "-c", str(last), *argv]
        return pinned(cores_per_process, 1 + int(data_dir.name.rsplit("-", 1)[1]), argv)

    return build


def wan_links(args: argparse.Namespace) -> list[tuple[int, float]]:
    """(one-way delay ms, Mbit/s or 0 for no cap) of each link the WAN section emulates: the
    `--delays` uncapped, then the longest with `--wan-mbps`, where a prompt's bytes count."""
    links = [(delay, 0.0) for delay in args.delays]
    if args.wan_mbps > 0 and args.delays:
        links.append((max(args.delays), args.wan_mbps))
    return links


async def wan(folder: Path, args: argparse.Namespace) -> list[list[object]]:
    """Push vs client-driven per-token latency, and time to first token, over emulated links
    (a route's open costs no round trip of its own: its first step follows `OpenSession` on
    every stream, so TTFT is about one pass of legs plus compute, plus the bytes of the
    prompt's activations where the link's bandwidth is capped)."""
    ids = prompt_ids(folder, args.wan_prompt)
    n = args.wan_tokens
    spans = even_spans(Checkpoint.open(folder).config.num_stages)
    rows: list[list[object]] = []
    for delay_ms, mbps in wan_links(args):
        per_token: dict[str, float] = {}
        ttft: dict[str, float] = {}
        shaping = ["--link-delay-ms", str(delay_ms)]
        if mbps:
            shaping += ["--link-bandwidth-mbps", f"{mbps:g}"]
        with tempfile.TemporaryDirectory(prefix="shardnet-bench-") as root:
            async with devnet(3, root, folder, spans, args, *shaping) as net:
                for push in ("on", "off"):
                    config = ClientConfig(bootstrap=net.bootstrap_addrs, codec="int8-block",
                                          push=push, link_delay_s=delay_ms / 1e3,
                                          link_bandwidth_bps=mbps * 1e6 / 8)
                    async with Client(model=folder, config=config) as client:
                        runs, _ = await client_runs(client, ids, n, args.wan_repeats)
                    ttft[push], rate = best(runs)
                    per_token[push] = 1.0 / rate
        rows.append([delay_ms, f"{mbps:g}" if mbps else "-", per_token["off"] * 1e3,
                     per_token["on"] * 1e3, per_token["on"] / per_token["off"],
                     ttft["off"] * 1e3, ttft["on"] * 1e3])
    return rows


async def clients(folder: Path, args: argparse.Namespace) -> list[list[object]]:
    """Aggregate decode tokens/s of concurrent clients, beside this CPU's batching ceiling."""
    ckpt = Checkpoint.open(folder)
    n = args.new_tokens
    span = Span.load(ckpt, 0, ckpt.config.num_stages, dtype=torch.float32)
    single = await engine_batch(span, 1, n, args.threads)
    spans = even_spans(ckpt.config.num_stages)
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="shardnet-bench-") as root:
        async with devnet(3, root, folder, spans, args) as net:
            config = ClientConfig(bootstrap=net.bootstrap_addrs, codec="int8-block", push="on")
            async with Client(model=folder, config=config) as client:
                client.eos_id = None
                await client_runs(client, prompt_ids(folder, 16), 4, 0)  # warm the route up
                one = 0.0
                for count in args.clients:
                    rate = await concurrent_rate(client, folder, count, n)
                    one = one or rate
                    ceiling = await engine_batch(span, count, n, args.threads) / single
                    rows.append([count, rate, rate / one, ceiling])
    return rows


async def concurrent_rate(client: Client, folder: Path, count: int, n: int) -> float:
    """Tokens/s of `count` concurrent generations with different prompts (after the first
    token of each, which is prefill)."""
    done: list[tuple[float, float]] = []

    async def one(seed: int) -> None:
        ids = prompt_ids(folder, 16 + seed)
        first = 0.0
        k = 0
        async for _ in client.generate_ids(ids, max_new_tokens=n):
            k += 1
            if k == 1:
                first = time.perf_counter()
        done.append((first, time.perf_counter()))

    async with trio.open_nursery() as nursery:
        for seed in range(count):
            nursery.start_soon(one, seed)
    start = max(f for f, _ in done)  # every client is decoding from here on
    end = min(e for _, e in done)
    tokens = sum((end - start) / ((e - f) / (n - 1)) for f, e in done)
    return tokens / max(end - start, 1e-9)


async def engine_batch(span: Span, count: int, n: int, threads: int) -> float:
    """Single-process decode tokens/s of `count` sequences batched in one forward."""
    def run() -> float:
        use_threads(threads, rows=count)
        caches = [span.new_cache(16 + n) for _ in range(count)]
        x = torch.randint(0, 256, (count, 16))
        with torch.inference_mode():
            for b, cache in enumerate(caches):
                span(x[b:b + 1], cache, last_only=True)
            ids = torch.zeros(count, 1, dtype=torch.long)
            started = time.perf_counter()
            for _ in range(n):
                ids = span.forward_batch(ids, caches, last_only=True).argmax(-1)
        return count * n / (time.perf_counter() - started)

    return max([await trio.to_thread.run_sync(run) for _ in range(2)])


async def failover(folder: Path, args: argparse.Namespace) -> list[list[object]]:
    """The stall a client sees when the middle hop is killed mid-generation."""
    ids = prompt_ids(folder, 16)
    n = args.new_tokens
    spans = even_spans(Checkpoint.open(folder).config.num_stages)
    spans.append(spans[1])  # a spare for the middle
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="shardnet-bench-") as root:
        async with devnet(4, root, folder, spans, args) as net:
            config = ClientConfig(bootstrap=net.bootstrap_addrs, codec="int8-block")
            async with Client(model=folder, config=config) as client:
                _, reference = await client_runs(client, ids, n, 1)
                for push in ("on", "off"):
                    client.config = dataclasses.replace(config, push=push)
                    times: list[float] = []
                    tokens: list[int] = []
                    async for token in client.generate_ids(ids, max_new_tokens=n):
                        tokens.append(token)
                        times.append(time.perf_counter())
                        route = client.last.route
                        if len(tokens) == n // 3 and route is not None:
                            victim = route.hops[len(route.hops) // 2].peer_id
                            handle = next(h for h in net.nodes if h.alive
                                          and h.peer_id == victim)
                            handle.kill()
                    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
                    stall = max(gaps) - statistics.median(gaps)
                    rows.append(["push" if push == "on" else "client-driven",
                                 client.last.failovers, stall * 1e3, tokens == reference])
                    await handle.restart()
                    _, swarm = client.running()
                    with trio.fail_after(60):  # the spare is back in the client's view
                        while len(swarm.snapshots()) < len(spans):
                            await swarm.wait_changed()
    return rows


async def main_async(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    rows: list[list[object]] = []
    random = with_tokenizer(random_hf_checkpoint(args.cache / "llama-125m"))
    if "random" in args.models:
        rows += await measure("llama-125m (random)", random, args)
    if "embedded" in args.models:
        rows += await measure("embedded", EMBEDDED_MODEL, args)
    print(f"prompt {args.prompt} tokens, {args.new_tokens} new tokens, greedy, fp32, CPU, "
          f"{args.threads} threads in the client / single process, {args.node_threads} per "
          f"node, best of {args.repeats}", flush=True)
    if rows:
        print(table(["model", "path", "decode tok/s", "vs engine", "paired", "TTFT ms",
                     "vs engine", "paired", "prefill tok/s", "greedy = engine", "route"], rows),
              flush=True)
        print("paired: the median over rounds of the ratio to the engine run of the same round",
              flush=True)
    if "wan" in args.sections:
        print(f"\nper-token latency, 3 hops, one-way delay and bandwidth cap per leg, "
              f"{args.wan_prompt}-token prompt, {args.wan_tokens} new tokens, best of "
              f"{args.wan_repeats} (llama-125m)", flush=True)
        print(table(["delay ms", "Mbit/s", "client-driven ms", "push ms",
                     "push / client-driven", "TTFT client-driven ms", "TTFT push ms"],
                    await wan(random, args)), flush=True)
    if "clients" in args.sections:
        print(f"\nconcurrent clients, aggregate decode tokens/s, {args.new_tokens} new tokens "
              "each (llama-125m)", flush=True)
        print(table(["clients", "tokens/s", "vs 1 client", "ceiling (engine batch / 1)"],
                    await clients(random, args)), flush=True)
    if "failover" in args.sections:
        print(f"\nmiddle hop killed (SIGKILL) after {args.new_tokens // 3} of "
              f"{args.new_tokens} tokens, spare present (llama-125m)", flush=True)
        print(table(["mode", "failovers", "stall ms", "output = undisturbed"],
                    await failover(random, args)), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="client and single-process threads")
    p.add_argument("--node-threads", type=int, default=1)
    p.add_argument("--node-prefill-threads", type=int, default=0,
                   help="0: the node's default (every core)")
    p.add_argument("--models", default="random,embedded",
                   help="models of the main table (random, embedded; empty for none)")
    p.add_argument("--sections", default="wan,clients,failover")
    p.add_argument("--delays", type=lambda v: [int(x) for x in v.split(",")],
                   default=[0, 10, 50], help="one-way delays per leg, ms")
    p.add_argument("--wan-mbps", type=float, default=20.0,
                   help="bandwidth cap of one more WAN row, at the longest delay (0: none)")
    p.add_argument("--wan-prompt", type=int, default=16, help="prompt tokens in the WAN rows")
    p.add_argument("--wan-tokens", type=int, default=16)
    p.add_argument("--wan-repeats", type=int, default=2)
    p.add_argument("--clients", type=lambda v: [int(x) for x in v.split(",")],
                   default=[1, 4, 8])
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "shardnet-bench")
    p.add_argument("--cores-per-process", type=int, default=0,
                   help="give this process (client, engine, transformers) and each node this "
                        "many cores of their own, as if each were a machine (needs 5k+1 "
                        "cores); 0: everything shares every core")
    args = p.parse_args(argv)
    if args.cores_per_process:
        # This process and the failover section's 4 nodes, and a core for the bootstrap.
        check_cores(args.cores_per_process, 5, spare=1)
        pin_this_process(args.cores_per_process)
    # The clients' hosts log py-libp2p's shutdown races (a dial finishing after the host
    # stopped) as warnings with tracebacks, as the CLI would without the same setting.
    for noisy in ("libp2p", "multiaddr", "async_service"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    trio.run(main_async, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
