"""Weights on huge pages: same values, own memory, aligned where the platform supports it."""

from __future__ import annotations

import gc
import mmap

import pytest
import torch

from sharding import _pages
from sharding._model import transposed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_large_tensor_is_usable_and_starts_on_a_huge_page(dtype: torch.dtype) -> None:
    t = _pages.empty((1024, 1536), dtype)  # 3-6 MB
    assert t.shape == (1024, 1536) and t.dtype == dtype and t.is_contiguous()
    t.fill_(2)
    gc.collect()  # the mapping lives as long as the tensor, not as long as a local name
    assert float(t.float().sum()) == 2 * 1024 * 1536
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert t.data_ptr() % _pages.HUGE_PAGE == 0


def test_a_small_tensor_is_an_ordinary_one() -> None:
    t = _pages.empty((4, 4), torch.float32)
    assert t.shape == (4, 4) and t.is_contiguous()


def test_transposed_copies_exactly_into_fresh_memory() -> None:
    w = torch.randn(1200, 800)
    out = transposed(w)
    assert out.is_contiguous() and torch.equal(out, w.t())
    out.zero_()
    assert bool(w.abs().sum() > 0)  # a copy, not a view
    grad = torch.randn(300, 200, requires_grad=True)
    assert torch.equal(transposed(grad), grad.t())  # autograd inputs take the torch path
