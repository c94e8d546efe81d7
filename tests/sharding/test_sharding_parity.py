"""The engine against `transformers`, the reference implementation, on tiny random checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from sharding import Checkpoint, Span

FAMILIES = ["llama3", "llama2", "mistral", "qwen2"]
PROMPT, DECODE = 9, 16


def _tokens(vocab: int, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_and_cached_decode_match_transformers(
    name: str, hf_checkpoint: Callable[..., tuple[Any, Path]]
) -> None:
    model, folder = hf_checkpoint(name)
    ckpt = Checkpoint.open(folder)
    ids = _tokens(ckpt.config.vocab_size, PROMPT + DECODE)
    with torch.no_grad():
        expected = model(ids).logits  # (1, T, V), uncached, the whole sequence at once
    span = Span.load(ckpt, 0, ckpt.config.num_stages, device="cpu")
    cache = span.new_cache(64)
    with torch.no_grad():
        got = [span(ids[:, :PROMPT], cache)]
        for t in range(PROMPT, PROMPT + DECODE):
            got.append(span(ids[:, t : t + 1], cache))
    ours = torch.cat(got, dim=1)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= 1e-4
    assert cache.length == PROMPT + DECODE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_are_as_accurate_as_transformers(
    dtype: torch.dtype, hf_checkpoint: Callable[..., tuple[Any, Path]]
) -> None:
    model, folder = hf_checkpoint("llama3", dtype=dtype)
    span = Span.load(folder, 0, 5, device="cpu", dtype=dtype)
    assert span.dtype == dtype
    exact = Span.load(folder, 0, 5, device="cpu", dtype=torch.float32)  # same weights, fp32
    ids = _tokens(101, 12)
    with torch.no_grad():
        reference = exact(ids)
        theirs = (model(ids).logits.float() - reference).abs().max().item()
        ours = (span(ids).float() - reference).abs().max().item()
    # Half precision rounds differently in every kernel; ours must be no less accurate.
    assert ours <= 2 * theirs + 1e-3
