"""Train the embedded default model: a small byte-level Llama, with this engine's own code.

The data ships with every CPython: the reference manual's topics (`pydoc_data.topics`) and the
docstrings of the standard library's modules, classes and functions. Documents are split into
train and held-out sets by a hash of their name (about 1 in 20 held out), so the held-out bits
per byte measure text the model never saw. Every random choice is seeded and the number of
steps is fixed, so a re-run gives a model of the same quality (bit-identical on the same
machine and thread count); the wall time depends on the machine (~30 minutes on 2 cores).

Run: `python -m sharding.embedded.train` (writes `model/` and `train.log` beside this file).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

from sharding._config import ModelConfig
from sharding._export import save_checkpoint
from sharding._span import Span

HERE = Path(__file__).resolve().parent
EOT = 256  # end-of-text token id; ids 0..255 are the bytes themselves
CONFIG = ModelConfig(
    family="llama", vocab_size=264, hidden_size=256, intermediate_size=704, num_layers=6,
    num_heads=8, num_kv_heads=4, head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=1024, tie_word_embeddings=True, dtype="bfloat16",
)


def corpus() -> list[tuple[str, str]]:
    """(name, text) documents in a fixed order: manual topics, then stdlib docstrings."""
    import pydoc_data.topics as topics

    docs = [(f"topic:{k}", v) for k, v in sorted(topics.topics.items())]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    name = getattr(node, "name", "<module>")
                    docs.append((f"{rel}:{name}:{node.lineno if hasattr(node, 'lineno') else 0}",
                                 doc))
    return docs


def split(docs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte ids with an end-of-text token after each document: (train, held-out)."""
    parts: dict[bool, list[int]] = {False: [], True: []}
    for name, text in docs:
        held = zlib.crc32(name.encode()) % 20 == 0
        parts[held].extend(text.encode("utf-8"))
        parts[held].append(EOT)
    return (torch.tensor(parts[False], dtype=torch.int64),
            torch.tensor(parts[True], dtype=torch.int64))


def tokenizer_json() -> dict[str, object]:
    """A `tokenizers` byte-level tokenizer whose ids are the byte values themselves."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    # GPT-2's byte -> printable-character table, in byte order, so token id == byte value.
    table = _bytes_to_unicode()
    if sorted(table.values()) != sorted(alphabet):
        raise RuntimeError("tokenizers' ByteLevel alphabet changed; cannot build the tokenizer")
    vocab = {table[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    out: dict[str, object] = json.loads(tok.to_str())
    return out


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def init_weights(config: ModelConfig, g: torch.Generator) -> dict[int, dict[str, torch.Tensor]]:
    """GPT-2 style initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2L)."""
    C, I, D = config.hidden_size, config.intermediate_size, config.head_dim
    H, K, L = config.num_heads, config.num_kv_heads, config.num_layers

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    resid = 0.02 / math.sqrt(2 * L)
    weights: dict[int, dict[str, torch.Tensor]] = {0: {"embed": normal(config.vocab_size, C)}}
    for s in range(1, L + 1):
        weights[s] = {
            "attn_norm": torch.ones(C), "mlp_norm": torch.ones(C),
            "wq": normal(H * D, C), "wk": normal(K * D, C), "wv": normal(K * D, C),
            "wo": normal(C, H * D, std=resid), "w_gate": normal(I, C), "w_up": normal(I, C),
            "w_down": normal(C, I, std=resid),
        }
    weights[L + 1] = {"norm": torch.ones(C), "lm_head": weights[0]["embed"]}
    return weights


@torch.no_grad()
def bits_per_byte(model: Span, data: torch.Tensor, context: int, limit: int | None = None) -> float:
    """Mean next-token loss in bits over the byte tokens of `data`, in windows of `context`."""
    model.eval()
    total, count = 0.0, 0
    n = (len(data) - 1) // context
    windows = range(n if limit is None else min(n, limit))
    for start in range(0, len(windows), 16):
        idx = torch.tensor(windows[start : start + 16]) * context
        x = torch.stack([data[i : i + context] for i in idx])
        y = torch.stack([data[i + 1 : i + context + 1] for i in idx])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                               reduction="none")
        keep = y.reshape(-1) < 256  # score bytes, not the end-of-text markers
        total += float(loss[keep].sum())
        count += int(keep.sum())
    model.train()
    return total / max(count, 1) / math.log(2)


@torch.no_grad()
def greedy(model: Span, prompt: str, n: int) -> str:
    model.eval()
    ids = list(prompt.encode())
    cache = model.new_cache(len(ids) + n)
    logits = model(torch.tensor([ids]), cache, last_only=True)
    out: list[int] = []
    for _ in range(n):
        nxt = int(logits[0, -1].argmax())
        if nxt == EOT:
            break
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), cache, last_only=True)
    model.train()
    return bytes(b for b in out if b < 256).decode("utf-8", errors="replace")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "model")
    p.add_argument("--log", type=Path, default=HERE / "train.log")
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    log_file = args.log.open("w", encoding="utf-8")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    train, held = split(corpus())
    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, threads {args.threads}")
    log(f"data: {len(train):,} train bytes, {len(held):,} held-out bytes")
    g = torch.Generator().manual_seed(args.seed)
    model = Span(CONFIG, 0, CONFIG.num_stages, init_weights(CONFIG, g), share_tied=True).train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters, config {json.dumps(CONFIG.to_dict())}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        lr = args.lr * (step / warmup if step <= warmup else
                        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) /
                                                         (args.steps - warmup))))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(train) - args.context - 1, (args.batch,), generator=g)
        x = torch.stack([train[i : i + args.context] for i in idx])
        y = torch.stack([train[i + 1 : i + args.context + 1] for i in idx])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, CONFIG.vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  ({loss.item() / math.log(2):.3f} bits)"
                f"  lr {lr:.2e}  {time.time() - t0:7.1f}s")
        if step % 400 == 0 and step < args.steps:
            log(f"  held-out (first 64 windows): {bits_per_byte(model, held, args.context, 64):.3f}"
                " bits/byte")

    log(f"trained {args.steps} steps in {time.time() - t0:.0f}s")
    bpb = bits_per_byte(model, held, args.context)
    log(f"held-out bits per byte: {bpb:.4f} (uniform bytes: 8.0)")
    log(f'greedy continuation of "The list type": {greedy(model, "The list type", 160)!r}')

    save_checkpoint(args.out, CONFIG, model.stage_weights(), dtype=torch.bfloat16,
                    bos_token_id=None, eos_token_id=EOT)
    (args.out / "tokenizer.json").write_text(json.dumps(tokenizer_json(), ensure_ascii=False))
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    log(f"saved {args.out.name}/ ({size / 1e6:.1f} MB of safetensors)")
    log_file.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
