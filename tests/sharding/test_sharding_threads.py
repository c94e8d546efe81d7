"""`use_threads`: one-row forwards on OpenBLAS's threads, others on torch's; same results."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from threadpoolctl import ThreadpoolController

from sharding import Checkpoint, Span, use_threads

Factory = Callable[..., tuple[Any, Path]]


def _blas_threads() -> int:
    controllers = ThreadpoolController().select(internal_api="openblas").lib_controllers
    if not controllers:
        pytest.skip("numpy here does not use OpenBLAS")
    return int(controllers[0].num_threads)


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    use_threads(1, rows=1)  # the package's default: one OpenBLAS thread
    torch.set_num_threads(before)


def test_one_row_gets_the_blas_threads_and_several_rows_torch_ones() -> None:
    use_threads(2, rows=1)
    assert (torch.get_num_threads(), _blas_threads()) == (1, 2)
    use_threads(2, rows=8)
    assert (torch.get_num_threads(), _blas_threads()) == (2, 1)
    use_threads(0, rows=1)  # never fewer than one
    assert (torch.get_num_threads(), _blas_threads()) == (1, 1)


def test_a_decode_step_is_the_same_on_one_or_two_blas_threads(hf_checkpoint: Factory) -> None:
    _, folder = hf_checkpoint("llama3")
    ckpt = Checkpoint.open(folder)
    span = Span.load(ckpt, 0, ckpt.config.num_stages, pack=False)
    ids = torch.randint(0, ckpt.config.vocab_size, (1, 7),
                        generator=torch.Generator().manual_seed(3))
    outs = []
    for threads in (1, 2):
        cache = span.new_cache(16)
        with torch.inference_mode():
            use_threads(2, rows=7)  # the same prefill both times
            span(ids, cache)
            use_threads(threads, rows=1)
            outs.append(span(ids[:, :1], cache))
    assert torch.equal(outs[0], outs[1])
