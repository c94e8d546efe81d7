"""Benchmark: the engine against `transformers` on one process, and the wire codec's cost.

Run: `python -m devnet.bench.engine` (about 3 minutes on 2 cores; fp32 on the CPU by default).

Prints:
1. greedy decode tokens/s and prefill tokens/s of this engine vs `transformers` `generate` /
   forward on the same random ~125M Llama (hidden 768, 12 layers, GQA 12/4, vocab 32000),
   measured in the same run, plus the memory-bandwidth floor: weight bytes read per decoded
   token / measured copy bandwidth (bytes copied per second), and the same against the pure
   read bandwidth;
2. on the embedded model, what `int8-block` (and `fp16`) cost when applied at two stage
   boundaries: mean next-token KL divergence against `raw` and top-1 agreement under teacher
   forcing over 256 positions of held-out text.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from devnet.bench._common import best_of, random_hf_checkpoint, table
from sharding import EMBEDDED_MODEL, Checkpoint, Span, decode, encode, use_threads


def copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes copied per second by a large tensor copy (memcpy's convention: N bytes / t).

    STREAM counts the read and the write (2N / t); a decode step only reads its weights, so
    the floor below uses N / t and also shows the pure read rate for comparison.
    """
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return nbytes / best_of(lambda: dst.copy_(src), repeats)


def read_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes read per second by a streaming reduction over a large tensor."""
    src = torch.ones(nbytes // 4)
    return nbytes / best_of(lambda: src.sum(), repeats)


def decode_weight_bytes(span: Span) -> int:
    """Bytes of weights one decode step reads: every block, the head, one embedding row."""
    total = sum(p.numel() * p.element_size() for p in span.blocks.parameters())
    if span.head is not None:
        total += sum(p.numel() * p.element_size() for p in span.head.parameters())
    if span.embedding is not None:
        total += span.embedding.embed.shape[1] * span.embedding.embed.element_size()
    return total


@torch.inference_mode()
def ours_generate(span: Span, ids: torch.Tensor, new_tokens: int, threads: int) -> list[int]:
    cache = span.new_cache(ids.shape[1] + new_tokens)
    use_threads(threads, rows=ids.shape[1])
    logits = span(ids, cache, last_only=True)
    use_threads(threads, rows=1)
    out = []
    for _ in range(new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt))
        if len(out) == new_tokens:
            break
        logits = span(nxt, cache, last_only=True)
    return out


def engine_vs_transformers(folder: Path, prompt_len: int, new_tokens: int,
                           repeats: int, threads: int) -> list[list[object]]:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ckpt = Checkpoint.open(folder)
    span = Span.load(ckpt, 0, ckpt.config.num_stages, device="cpu")
    ids = torch.randint(0, ckpt.config.vocab_size, (1, prompt_len),
                        generator=torch.Generator().manual_seed(0))
    long_ids = torch.randint(0, ckpt.config.vocab_size, (1, 512),
                             generator=torch.Generator().manual_seed(1))

    def hf_gen(n: int) -> list[int]:
        torch.set_num_threads(threads)  # our decode leaves torch on one (`use_threads`)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)
        return [int(t) for t in out[0, prompt_len:]]

    agree = hf_gen(new_tokens) == ours_generate(span, ids, new_tokens, threads)
    rows: list[list[object]] = []

    def hf_prefill() -> None:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            hf(long_ids, use_cache=True, logits_to_keep=1)

    def our_prefill() -> None:
        use_threads(threads, rows=long_ids.shape[1])
        with torch.inference_mode():
            span(long_ids, span.new_cache(512), last_only=True)

    # Interleaved, so a burst of load on this shared machine hits both sides alike; the decode
    # rate comes from a long minus a one-token generation, so prefill cancels out.
    timings: dict[str, list[float]] = {k: [] for k in ("our", "hf", "our_pf", "hf_pf")}
    for _ in range(repeats):
        timings["our"].append((new_tokens - 1) / (
            best_of(lambda: ours_generate(span, ids, new_tokens, threads), 1)
            - best_of(lambda: ours_generate(span, ids, 1, threads), 1)))
        timings["hf"].append((new_tokens - 1) / (
            best_of(lambda: hf_gen(new_tokens), 1) - best_of(lambda: hf_gen(1), 1)))
        timings["our_pf"].append(512 / best_of(our_prefill, 1))
        timings["hf_pf"].append(512 / best_of(hf_prefill, 1))
    our_decode, hf_decode = max(timings["our"]), max(timings["hf"])
    our_pf, hf_pf = max(timings["our_pf"]), max(timings["hf_pf"])
    weight_bytes = decode_weight_bytes(span)
    copy_bw, read_bw = copy_bandwidth(), read_bandwidth()
    floor, read_floor = copy_bw / weight_bytes, read_bw / weight_bytes
    rows.append(["decode tokens/s", our_decode, hf_decode, our_decode / hf_decode])
    rows.append(["prefill tokens/s (512)", our_pf, hf_pf, our_pf / hf_pf])
    rows.append(["floor tokens/s (copy bw)", floor, "", ""])
    rows.append(["decode / floor (copy bw)", our_decode / floor, hf_decode / floor, ""])
    rows.append(["decode / floor (read bw)", our_decode / read_floor, hf_decode / read_floor,
                 ""])
    rows.append(["greedy tokens identical", str(agree), "", ""])
    print(f"weights read per decoded token: {weight_bytes / 1e6:.1f} MB; copy bandwidth "
          f"{copy_bw / 1e9:.2f} GB/s (bytes copied per s; STREAM's 2N/t would be "
          f"{2 * copy_bw / 1e9:.2f}), read bandwidth {read_bw / 1e9:.2f} GB/s")
    return rows


@torch.inference_mode()
def codec_cost(folder: Path, positions: int = 256) -> list[list[object]]:
    from sharding.embedded.train import corpus, split

    ckpt = Checkpoint.open(folder)
    n = ckpt.config.num_stages
    a, b = n // 3, 2 * n // 3
    spans = [Span.load(ckpt, 0, a), Span.load(ckpt, a, b), Span.load(ckpt, b, n)]
    _, held = split(corpus())
    ids = held[: positions][None]

    def run(codec: str | None) -> torch.Tensor:
        x: torch.Tensor = ids
        for i, span in enumerate(spans):
            x = span(x)
            if codec is not None and i < 2:
                x = decode(encode(x, codec))
        return x[0].float()

    raw = F.log_softmax(run("raw"), -1)
    rows: list[list[object]] = []
    for codec in ("fp16", "int8-block"):
        other = F.log_softmax(run(codec), -1)
        kl = (raw.exp() * (raw - other)).sum(-1).mean().item()
        agree = (raw.argmax(-1) == other.argmax(-1)).float().mean().item()
        rows.append([codec, f"[0,{a}) [{a},{b}) [{b},{n})", kl, f"{100 * agree:.1f}%"])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "shardnet-bench")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = random_hf_checkpoint(args.cache / "llama-125m")
    print(f"engine vs transformers: random Llama 125M, fp32, CPU, {args.threads} threads, "
          f"prompt {args.prompt}, {args.new_tokens} new tokens, best of {args.repeats}")
    print(table(["", "shardnet", "transformers", "ratio"],
                engine_vs_transformers(folder, args.prompt, args.new_tokens, args.repeats,
                                       args.threads)))
    print()
    print("activation codecs at two stage boundaries, embedded model, teacher forcing, "
          "256 held-out positions")
    print(table(["codec", "spans", "mean KL vs raw (nats)", "top-1 agreement"],
                codec_cost(EMBEDDED_MODEL)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
