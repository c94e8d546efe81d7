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
with `GOMP_SPINCOUNT=1000` they also fall asleep between operations. Below a few hundred
million multiply-adds that costs more than the second core gives. Measured on the
development machine (2 vCPUs), one span's forward after a 20 ms sleep, 1 against 2 threads:
2 blocks of the embedded model (1.5 M multiply-adds a row) 3.3 / 4.3 ms at 16 rows, 7.9 / 9.9
at 128, 18.3 / 18.9 at 256; 4 blocks of the 125M model (25 M a row) 16.5 / 17.9 ms at 16 rows,
25.1 / 23.5 at 32, 95 / 57 at 128. Warm (back to back) the second thread pays off sooner,
from ~90 M multiply-adds. `use_threads(n, rows=..., macs_per_row=...)` gives such a forward
one thread below `PARALLEL_MIN_MACS`: the cold case, since that is how a request's prefill
runs. On the 3-node devnet this took the embedded model's first token from 1.59-1.75x the
engine's to 1.38-1.49x (128-token prompt, nodes' prefill on 1 thread against 2).

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


PARALLEL_MIN_MACS = 1 << 28
"""A forward of fewer multiply-adds than this (rows times `Span.macs_per_row`) runs on one
thread: waking OpenMP's workers for each operation costs more than they give (see above)."""


def threads_for(threads: int, *, rows: int, macs_per_row: int | None = None) -> int:
    """torch's threads for a forward of `rows` rows: 1 for one row, or, given its size, for
    fewer than `PARALLEL_MIN_MACS` multiply-adds; else `threads` (at least 1)."""
    if rows == 1 or (macs_per_row is not None and rows * macs_per_row < PARALLEL_MIN_MACS):
        return 1
    return max(1, threads)


def use_threads(threads: int, *, rows: int, macs_per_row: int | None = None) -> None:
    """Set torch's threads for the next forward in this thread (`threads_for`)."""
    wanted = threads_for(threads, rows=rows, macs_per_row=macs_per_row)
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
