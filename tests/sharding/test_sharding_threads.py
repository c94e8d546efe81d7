"""`use_threads`: one torch thread for a one-row forward, all of them otherwise; numpy's
OpenBLAS gives the same products on any number of threads, and gets every core only when its
idle workers sleep soon (`sharding/_openblas.py`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sharding import Checkpoint, Span, use_threads
from sharding._openblas import TIMEOUT, VARIABLE, prepare, quiet
from sharding._threads import (
    PARALLEL_MIN_MACS,
    STREAMED_HEAD_MACS,
    package_blas_threads,
    set_blas_threads,
    threads_for,
)

Factory = Callable[..., tuple[Any, Path]]


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    set_blas_threads(package_blas_threads())  # the package's setting
    torch.set_num_threads(before)


def test_one_row_gets_one_torch_thread_and_several_rows_all() -> None:
    use_threads(2, rows=1)
    assert torch.get_num_threads() == 1
    use_threads(2, rows=8)
    assert torch.get_num_threads() == 2
    use_threads(0, rows=8)  # never fewer than one
    assert torch.get_num_threads() == 1


def test_a_small_forward_gets_one_thread_and_a_large_one_all() -> None:
    # Waking OpenMP's workers for every operation of a small cold forward costs more than
    # the second core gives; a big head is streamed from memory, which threads speed up
    # (measurements in sharding/_threads.py).
    embedded, m125 = (737_280, 0), (6_291_456, 0)  # one block's, no head
    assert threads_for(2, rows=128, macs=embedded) == 1
    assert threads_for(2, rows=16, macs=m125) == 1
    assert threads_for(2, rows=32, macs=m125) == 2
    assert threads_for(2, rows=8, macs=(6_291_456, 32000 * 768)) == 2  # the 125M head
    assert threads_for(2, rows=PARALLEL_MIN_MACS, macs=(1, 0)) == 2  # the bound itself
    assert threads_for(2, rows=PARALLEL_MIN_MACS - 1, macs=(1, 0)) == 1
    assert threads_for(2, rows=2, macs=(0, STREAMED_HEAD_MACS)) == 1
    assert threads_for(2, rows=2, macs=(0, STREAMED_HEAD_MACS + 1)) == 2
    assert threads_for(2, rows=8) == 2  # size unknown (a batch): as before
    assert threads_for(2, rows=1, macs=(10**9, 10**9)) == 1  # one row: numpy's threads
    use_threads(2, rows=128, macs=embedded)
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_a_spans_multiply_adds_per_row_are_its_matrices_elements(
        hf_checkpoint: Factory, family: str) -> None:
    _, folder = hf_checkpoint(family)
    ckpt = Checkpoint.open(folder)
    cfg = ckpt.config
    span = Span.load(ckpt, 0, cfg.num_stages, pack=False)

    def matrices(stage: int) -> int:  # every matrix a row is multiplied by in that stage
        weights = ckpt.load_stage(stage, dtype=torch.float32, device=torch.device("cpu"))
        return sum(w.numel() for name, w in weights.items()
                   if w.dim() == 2 and name != "embed")

    head = cfg.vocab_size * cfg.hidden_size  # its own matrix, or the embedding's, tied
    assert span.row_macs() == (matrices(1), head)
    assert span.row_macs((1, 3)) == (matrices(2), 0)
    assert span.row_macs((0, 1)) == (0, 0)  # the embedding is a lookup
    assert span.row_macs((cfg.head_stage, cfg.num_stages)) == (0, head)


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


def test_the_short_idle_timeout_is_set_only_where_openblas_will_read_it() -> None:
    env: dict[str, str] = {}
    assert prepare(env, loaded=False) and env == {VARIABLE: str(TIMEOUT)}
    env = {VARIABLE: "28"}  # the user's own choice stays, and a 0.1 s spin is not quiet
    assert not prepare(env, loaded=False) and env == {VARIABLE: "28"}
    env = {}
    assert not prepare(env, loaded=True) and env == {}  # too late: OpenBLAS has read it
    assert prepare({VARIABLE: "16"}, loaded=True)  # set before numpy loaded, by the user
    assert not quiet("soon") and not quiet("0") and not quiet(None)


@pytest.mark.parametrize(("first", "expect_pool"), [("", True), ("import numpy; ", False)])
def test_importing_node_gives_openblas_every_core_only_with_the_short_timeout(
        first: str, expect_pool: bool) -> None:
    code = (f"{first}import os, node\n"
            "from sharding._threads import _openblas, available_cores\n"
            "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'), _openblas().num_threads,"
            " available_cores())")
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    timeout, threads, cores = out[0], int(out[1]), int(out[2])
    if expect_pool:
        assert timeout == str(TIMEOUT) and threads == cores
    else:
        assert timeout == "None" and threads == 1
