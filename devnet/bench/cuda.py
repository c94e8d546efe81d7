"""Benchmark: the engine on a CUDA GPU — parity with the CPU and `transformers`, and bf16 speed.

Run: `python -m devnet.bench.cuda` on a machine with a CUDA GPU (about 2 minutes on an H100).
Nothing else in the project needs a GPU; this is the check that the code CUDA users get (a
node picks CUDA when it has one, `sharding/_span.py`) computes what the CPU computes and is
not slower than `transformers` there.

Prints:
1. parity, fp32 with TF32 off: greedy tokens of the engine on the GPU against the engine on
   the CPU and against `transformers` on the GPU, the largest logit difference after a
   prefill, and a three-span chain on the GPU with the `raw` and `int8-block` codecs between
   spans (the wire path: encode on the GPU's output, decode on the CPU, back to the GPU)
   against the whole model;
2. bf16 speed on the GPU against `transformers` in the same run, interleaved: decode tokens/s
   for one sequence and for a batch of 8 (the engine's `forward_batch`, what a node's batcher
   runs), prefill tokens/s, and how many greedy tokens agree (bf16 rounding may part them).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from devnet.bench._common import REF_125M, best_of, random_hf_checkpoint, table
from sharding import EMBEDDED_MODEL, Checkpoint, Span, decode, encode

# TinyLlama's shape (~1.1B parameters): big enough that a decode step is not all launches.
REF_1B = dict(
    model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
    max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5,
)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.inference_mode()
def engine_greedy(span: Span, ids: torch.Tensor, new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the prefill's last logits (on the CPU, fp32)."""
    cache = span.new_cache(ids.shape[1] + new_tokens)
    logits = span(ids, cache, last_only=True)
    first = logits[0, -1].float().cpu()
    out: list[int] = []
    while True:
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt))
        if len(out) == new_tokens:
            return out, first
        logits = span(nxt, cache, last_only=True)


@torch.inference_mode()
def chain_greedy(spans: list[Span], ids: torch.Tensor, new_tokens: int, codec: str) -> list[int]:
    """Greedy tokens through `spans` one after another, each boundary through `codec`."""
    caches = [s.new_cache(ids.shape[1] + new_tokens) for s in spans]
    x: torch.Tensor = ids
    out: list[int] = []
    while True:
        for i, (span, cache) in enumerate(zip(spans, caches, strict=True)):
            x = span(x, cache, last_only=True)
            if i + 1 < len(spans):
                x = decode(encode(x, codec))
        nxt = x[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt))
        if len(out) == new_tokens:
            return out
        x = nxt.cpu()


@torch.inference_mode()
def engine_batch_decode(span: Span, ids: torch.Tensor, steps: int) -> None:
    """`steps` greedy decode steps of a batch (one cache per row), as a node's batcher runs."""
    caches = [span.new_cache(ids.shape[1] + steps) for _ in range(ids.shape[0])]
    logits = torch.cat([span(ids[b:b + 1], caches[b], last_only=True)
                        for b in range(ids.shape[0])])
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        logits = span.forward_batch(nxt, caches, last_only=True)
    _sync()


def hf_model(folder: Path, dtype: torch.dtype, device: str) -> Any:
    import transformers

    model: Any = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device).eval()


@torch.inference_mode()
def hf_greedy(hf: Any, ids: torch.Tensor, new_tokens: int) -> list[int]:
    ids = ids.to(hf.device)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return [int(t) for t in out[0, ids.shape[1]:]]


def agreement(a: list[int], b: list[int]) -> str:
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    return f"{same}/{len(a)}" if same == len(a) else f"first {same}/{len(a)}"


def parity(name: str, folder: Path, new_tokens: int, device: str) -> list[list[object]]:
    ckpt = Checkpoint.open(folder)
    n = ckpt.config.num_stages
    ids = torch.randint(0, ckpt.config.vocab_size, (1, 24),
                        generator=torch.Generator().manual_seed(0))
    gpu = Span.load(ckpt, 0, n, device=device, dtype=torch.float32)
    cpu = Span.load(ckpt, 0, n, device="cpu", dtype=torch.float32)
    ours, first = engine_greedy(gpu, ids, new_tokens)
    ref, ref_first = engine_greedy(cpu, ids, new_tokens)
    theirs = hf_greedy(hf_model(folder, torch.float32, device), ids, new_tokens)
    a, b = n // 3, 2 * n // 3
    spans = [Span.load(ckpt, lo, hi, device=device, dtype=torch.float32)
             for lo, hi in ((0, a), (a, b), (b, n))]
    rows: list[list[object]] = [
        [name, "engine GPU vs engine CPU", agreement(ours, ref),
         f"{(first - ref_first).abs().max().item():.2e}"],
        [name, "engine GPU vs transformers GPU", agreement(ours, theirs), ""],
    ]
    for codec in ("raw", "int8-block"):
        rows.append([name, f"3 spans on GPU, {codec}, vs whole",
                     agreement(chain_greedy(spans, ids, new_tokens, codec), ours), ""])
    return rows


def speed(name: str, folder: Path, new_tokens: int, prefill: int, batch: int,
          repeats: int, device: str) -> list[list[object]]:
    ckpt = Checkpoint.open(folder)
    span = Span.load(ckpt, 0, ckpt.config.num_stages, device=device, dtype=torch.bfloat16)
    hf = hf_model(folder, torch.bfloat16, device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ckpt.config.vocab_size, (1, 16), generator=gen)
    many = torch.randint(0, ckpt.config.vocab_size, (batch, 16), generator=gen)
    long_ids = torch.randint(0, ckpt.config.vocab_size, (1, prefill), generator=gen)
    agree = agreement(engine_greedy(span, ids, new_tokens)[0], hf_greedy(hf, ids, new_tokens))

    @torch.inference_mode()
    def hf_batch() -> None:
        m = many.to(device)
        hf.generate(m, attention_mask=torch.ones_like(m), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        _sync()

    @torch.inference_mode()
    def our_prefill() -> None:
        span(long_ids, span.new_cache(prefill), last_only=True)
        _sync()

    @torch.inference_mode()
    def hf_prefill() -> None:
        hf(long_ids.to(device), use_cache=True, logits_to_keep=1)
        _sync()

    def rate(fn: Any, n: int) -> float:  # decode rate: a long minus a one-token run
        return (n - 1) / (best_of(lambda: fn(n), 1) - best_of(lambda: fn(1), 1))

    for _ in range(2):  # warm-up: kernels, allocator, cuBLAS handles
        engine_greedy(span, ids, 4)
        hf_greedy(hf, ids, 4)
        our_prefill()
        hf_prefill()
    t: dict[str, list[float]] = {k: [] for k in ("our", "hf", "our_b", "hf_b", "our_p", "hf_p")}
    for _ in range(repeats):  # interleaved, best of each
        t["our"].append(rate(lambda n: engine_greedy(span, ids, n), new_tokens))
        t["hf"].append(rate(lambda n: hf_greedy(hf, ids, n), new_tokens))
        t["our_b"].append(batch * new_tokens / best_of(
            lambda: engine_batch_decode(span, many, new_tokens), 1))
        t["hf_b"].append(batch * new_tokens / best_of(hf_batch, 1))
        t["our_p"].append(prefill / best_of(our_prefill, 1))
        t["hf_p"].append(prefill / best_of(hf_prefill, 1))
    best = {k: max(v) for k, v in t.items()}
    return [
        [name, "decode tokens/s, 1 sequence", best["our"], best["hf"], best["our"] / best["hf"]],
        [name, f"decode tokens/s, batch {batch} (incl. prefill)", best["our_b"], best["hf_b"],
         best["our_b"] / best["hf_b"]],
        [name, f"prefill tokens/s ({prefill})", best["our_p"], best["hf_p"],
         best["our_p"] / best["hf_p"]],
        [name, "greedy tokens agree (bf16)", agree, "", ""],
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-1b", action="store_true", help="leave out the ~1.1B model")
    p.add_argument("--prefill", type=int, default=1024)
    p.add_argument("--device", default="cuda",
                   help="cpu only checks this script (the parity rows then compare CPU to CPU)")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "shardnet-bench")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: this benchmark needs one")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # parity in true fp32
    torch.backends.cudnn.allow_tf32 = False
    where = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"{where}, torch {torch.__version__}")
    m125 = random_hf_checkpoint(args.cache / "llama-125m", REF_125M)
    models = [("embedded", EMBEDDED_MODEL), ("125M", m125)]
    print(f"\nparity, fp32 on the GPU (TF32 off), {args.new_tokens} greedy tokens")
    rows = [r for name, folder in models
            for r in parity(name, folder, args.new_tokens, args.device)]
    print(table(["model", "check", "greedy tokens equal", "max |logit diff|"], rows))
    if not args.skip_1b:
        models.append(("1.1B", random_hf_checkpoint(args.cache / "llama-1b-bf16", REF_1B,
                                                    dtype=torch.bfloat16, device=args.device)))
    print(f"\nspeed, bf16 on the GPU, {args.new_tokens} new tokens, best of {args.repeats}")
    rows = [r for name, folder in models[1:]
            for r in speed(name, folder, args.new_tokens, args.prefill, 8, args.repeats,
                           args.device)]
    print(table(["model", "", "shardnet", "transformers", "ratio"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
