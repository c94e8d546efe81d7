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
from sharding._threads import package_blas_threads, set_blas_threads

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
