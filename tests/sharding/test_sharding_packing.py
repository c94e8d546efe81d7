"""Packed copies of the weights (oneDNN's layout, `Span.pack`): same results, same export."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from sharding import Checkpoint, Span
from sharding._model import can_pack

Factory = Callable[..., tuple[Any, Path]]

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.float32),
                                reason="this torch has no oneDNN linear kernels")


def _ids(vocab: int, n: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_a_packed_span_computes_what_a_dense_one_does(name: str,
                                                      hf_checkpoint: Factory) -> None:
    _, folder = hf_checkpoint(name)
    ckpt = Checkpoint.open(folder)
    n = ckpt.config.num_stages
    dense = Span.load(ckpt, 0, n, pack=False)
    packed = Span.load(ckpt, 0, n)
    assert packed.packed and not dense.packed
    ids = _ids(ckpt.config.vocab_size, 9, seed=1)
    with torch.inference_mode():
        a, b = dense(ids), packed(ids)
    assert torch.allclose(a, b, rtol=0, atol=1e-5)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_packing_keeps_the_checkpoint_weights(hf_checkpoint: Factory) -> None:
    """`stage_weights()` of a packed span gives back exactly the checkpoint's tensors."""
    _, folder = hf_checkpoint("qwen2")  # qkv biases and an untied head
    ckpt = Checkpoint.open(folder)
    n = ckpt.config.num_stages
    dense = Span.load(ckpt, 0, n, pack=False).stage_weights()
    packed = Span.load(ckpt, 0, n).stage_weights()
    assert dense.keys() == packed.keys()
    for stage, tensors in dense.items():
        assert tensors.keys() == packed[stage].keys()
        for name, t in tensors.items():
            assert torch.equal(t, packed[stage][name]), (stage, name)


def test_a_batched_decode_step_gives_each_row_what_it_gets_alone(
        hf_checkpoint: Factory) -> None:
    """Batches run on the packed copy, single rows on the dense matrices (numpy's gemv): the
    kernels differ in the last bits only."""
    _, folder = hf_checkpoint("llama3")
    ckpt = Checkpoint.open(folder)
    span = Span.load(ckpt, 0, ckpt.config.num_stages)
    prompts = [_ids(ckpt.config.vocab_size, k, seed=k) for k in (3, 7, 5, 2)]
    alone_caches = [span.new_cache(32) for _ in prompts]
    batch_caches = [span.new_cache(32) for _ in prompts]
    nxt = torch.tensor([[1], [2], [3], [4]])
    with torch.inference_mode():
        for p, c1, c2 in zip(prompts, alone_caches, batch_caches, strict=True):
            span(p, c1)
            span(p, c2)
        batched = span.forward_batch(nxt, batch_caches)
        alone = torch.cat([span(nxt[b : b + 1], c) for b, c in enumerate(alone_caches)])
    assert torch.allclose(batched, alone, rtol=0, atol=1e-5)
    assert torch.equal(batched.argmax(-1), alone.argmax(-1))


def test_one_row_runs_on_numpy_and_matches_torch(hf_checkpoint: Factory) -> None:
    from sharding._model import project

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    x = torch.randn(1, 1, 64, generator=g)
    with torch.inference_mode():
        y = project(x, w)
    assert y.shape == (1, 1, 96)
    assert torch.allclose(y, x @ w, rtol=0, atol=1e-5)
    b = torch.randn(96, generator=g)
    assert torch.allclose(project(x, w, b), x @ w + b, rtol=0, atol=1e-5)
    # autograd keeps torch's kernel (training goes through the same function)
    wg = w.clone().requires_grad_(True)
    project(x, wg).sum().backward()
    assert wg.grad is not None


def test_a_training_span_is_never_packed(hf_checkpoint: Factory) -> None:
    _, folder = hf_checkpoint("llama3")
    ckpt = Checkpoint.open(folder)
    n = ckpt.config.num_stages
    weights = {s: ckpt.load_stage(s, dtype=torch.float32, device=torch.device("cpu"))
               for s in range(n)}
    span = Span(ckpt.config, 0, n, weights, share_tied=True)
    assert not span.packed
    assert all(p.requires_grad for p in span.blocks.parameters() if p.is_floating_point())
