"""The numpy path for one decode row (`sharding/_row.py`) against the torch modules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from sharding import Checkpoint, Span
from sharding._row import applies

Factory = Callable[..., tuple[Any, Path]]


@pytest.mark.parametrize("name", ["llama3", "llama2", "mistral", "qwen2"])
def test_a_decode_row_in_numpy_equals_the_torch_modules(name: str,
                                                        hf_checkpoint: Factory) -> None:
    # A 2-row batch runs the torch modules; its first row continues the same cache as the lone
    # row, past the mistral checkpoint's sliding window (7), so both paths see the same keys.
    _, folder = hf_checkpoint(name)
    ckpt = Checkpoint.open(folder)
    span = Span.load(ckpt, 0, ckpt.config.num_stages, pack=False)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, ckpt.config.vocab_size, (1, 12), generator=g)
    row, batched, other = span.new_cache(32), span.new_cache(32), span.new_cache(32)
    with torch.inference_mode():
        span(ids, row)
        span(ids, batched)
        span(ids, other)
        for t in range(6):
            step = torch.randint(0, ckpt.config.vocab_size, (1, 1), generator=g)
            alone = span(step, row)
            pair = span.forward_batch(torch.cat([step, step]), [batched, other])
            assert torch.allclose(alone, pair[:1], atol=1e-5, rtol=1e-5), t
    n = row.length
    assert n == batched.length == 18
    assert torch.allclose(row.keys[..., :n, :], batched.keys[..., :n, :], atol=1e-5)
    assert torch.allclose(row.values[..., :n, :], batched.values[..., :n, :], atol=1e-5)


def test_only_one_cached_float32_row_without_gradients_takes_it(hf_checkpoint: Factory) -> None:
    _, folder = hf_checkpoint("llama3")
    ckpt = Checkpoint.open(folder)
    span = Span.load(ckpt, 0, ckpt.config.num_stages, pack=False)
    block = span.blocks[0]
    C = ckpt.config.hidden_size
    cache = span.new_cache(8)
    one = torch.zeros(1, 1, C)
    assert applies(one, [cache], block)
    assert not applies(one, None, block)  # no cache: a whole sequence
    assert not applies(torch.zeros(1, 2, C), [cache], block)  # prefill
    assert not applies(torch.zeros(2, 1, C), [cache, span.new_cache(8)], block)  # a batch
    assert not applies(one.to(torch.bfloat16), [cache], block)
    with torch.enable_grad():
        assert not applies(one.requires_grad_(), [cache], block)
