"""How a forward spends the threads it is given: by its rows.

A forward over one row (a decode step of one sequence) is a string of matrix-vector products,
which numpy's OpenBLAS runs (`sharding/_model.py`), with small torch operations between them
that do not gain from OpenMP threads: with `GOMP_SPINCOUNT=1000` (`node` sets it) those threads
sleep between operations and each one wakes them again. A forward over several rows (a batch, a
prefill) is a set of matrix products in oneDNN or torch, which want torch's threads. So
`use_threads(n, rows=...)` gives torch one thread for one row and `n` otherwise.

Unless the products are small. Every torch operation of a forward over several rows is an
OpenMP parallel region, and a process that has slept since its last forward (a pipeline node
between requests, the engine between prompts) wakes its OpenMP workers again for each one;
with `GOMP_SPINCOUNT=1000` they also fall asleep between operations. When a block's products
are small that costs more than the second core gives. Measured on the development machine
(2 vCPUs), a forward after a 20 ms sleep, 1 against 2 threads, medians:

| forward | rows | rows x a block's multiply-adds | ms, 1 thread | ms, 2 threads |
|---|---|---|---|---|
| 2 embedded blocks | 16 / 128 / 256 | 12 / 94 / 189 M | 3.3 / 7.9 / 18.3 | 4.3 / 9.9 / 18.9 |
| the embedded model | 64 / 128 | 47 / 94 M | 12.2 / 20.9 | 15.9 / 24.6 |
| 4 blocks of 125M | 16 / 32 / 128 | 101 / 201 / 805 M | 16.5 / 25.1 / 95 | 17.9 / 23.5 / 57 |
| the 125M model | 8 / 16 / 32 | 50 / 101 / 201 M | 46 / 50 / 79 | 40 / 43 / 60 |

The whole 125M model gains from the second thread even at 8 rows: its head's 98 MB matrix
is streamed from memory, which two threads do faster, whatever the rows. So a forward runs
on one thread when rows times one block's multiply-adds is under `PARALLEL_MIN_MACS` and it
holds no head above `STREAMED_HEAD_MACS` (`use_threads(n, rows=..., macs=Span.row_macs())`).
This is the cold case, how a request's prefill runs; warm (back to back), the second thread
pays off from fewer rows.

numpy's OpenBLAS gets every core when its idle workers sleep within ~0.1 ms of a call, and one
otherwise (`sharding/_openblas.py`); the package sets that once, at import
(`package_blas_threads`). A product of one row streams its matrix from memory, and two cores
stream it faster than one (a 98 MB product: 2.7-2.9 ms against 3.9). It is set once because
OpenBLAS 0.3.31 ignores `openblas_set_num_threads` from any thread but the main one, and every
forward here runs in a worker thread; see `devnet/bench/NOTES.md`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from sharding._openblas import QUIET

_blas: Any = None  # threadpoolctl's controller of numpy's OpenBLAS, once looked up


def _openblas() -> Any:
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        controllers = ThreadpoolController().select(internal_api="openblas").lib_controllers
        _blas = controllers[0] if controllers else False
    return _blas


def set_blas_threads(threads: int) -> None:
    """OpenBLAS's threads for numpy's products, process-wide. Call it from the main thread:
    OpenBLAS ignores the call from any other."""
    blas = _openblas()
    if blas:
        blas.set_num_threads(threads)


def available_cores() -> int:
    """The cores this process may run on."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def package_blas_threads() -> int:
    """OpenBLAS's threads as the package sets them: every core if its pool is quiet, else 1."""
    return available_cores() if QUIET else 1


PARALLEL_MIN_MACS = 1 << 27
"""Rows times one block's multiply-adds under which a forward runs on one thread."""
STREAMED_HEAD_MACS = 1 << 22
"""A head matrix of more elements (16 MB in fp32) is streamed from memory: keep the threads."""


def threads_for(threads: int, *, rows: int, macs: tuple[int, int] | None = None) -> int:
    """torch's threads for a forward of `rows` rows: 1 for one row, or for small products
    (`macs`: one block's and the head's multiply-adds per row, `Span.row_macs`); else
    `threads` (at least 1). Without `macs` (a batch) only the row count decides."""
    if rows == 1:
        return 1
    if macs is not None:
        block, head = macs
        if rows * block < PARALLEL_MIN_MACS and head <= STREAMED_HEAD_MACS:
            return 1
    return max(1, threads)


def use_threads(threads: int, *, rows: int, macs: tuple[int, int] | None = None) -> None:
    """Set torch's threads for the next forward in this thread (`threads_for`)."""
    wanted = threads_for(threads, rows=rows, macs=macs)
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
