"""`use_threads`: one torch thread for a one-row forward, all of them otherwise; and numpy's
OpenBLAS gives the same products on any number of threads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sharding import Checkpoint, Span, use_threads
from sharding._threads import set_blas_threads

Factory = Callable[..., tuple[Any, Path]]


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    set_blas_threads(1)  # the package's setting
    torch.set_num_threads(before)


def test_one_row_gets_one_torch_thread_and_several_rows_all() -> None:
    use_threads(2, rows=1)
    assert torch.get_num_threads() == 1
    use_threads(2, rows=8)
    assert torch.get_num_threads() == 2
    use_threads(0, rows=8)  # never fewer than one
    assert torch.get_num_threads() == 1


def test_a_decode_step_is_the_same_on_one_or_two_blas_threads(hf_checkpoint: Factory) -> None:
    _, folder = hf_checkpoint("llama3")
    ckpt = Checkpoint.open(folder)
    span = Span.load(ckpt, 0, ckpt.config.num_stages, pack=False)
    ids = torch.randint(0, ckpt.config.vocab_size, (1, 7),
                        generator=torch.Generator().manual_seed(3))
    outs = []
    for threads in (1, 2):  # set from this (the main) thread, where OpenBLAS heeds it
        cache = span.new_cache(16)
        with torch.inference_mode():
            use_threads(2, rows=7)  # the same prefill both times
            span(ids, cache)
            use_threads(2, rows=1)
            set_blas_threads(threads)
            outs.append(span(ids[:, :1], cache))
    assert torch.equal(outs[0], outs[1])
