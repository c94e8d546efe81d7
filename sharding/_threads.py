"""How a forward spends the threads it is given: by its rows.

A forward over one row (a decode step of one sequence) is a string of matrix-vector products,
which numpy's OpenBLAS runs (`sharding/_model.py`), with small torch operations between them
that do not gain from OpenMP threads: with `GOMP_SPINCOUNT=1000` (`node` sets it) those threads
sleep between operations and each one wakes them again. A forward over several rows (a batch, a
prefill) is a set of matrix products in oneDNN or torch, which want torch's threads. So
`use_threads(n, rows=...)` gives torch one thread for one row and `n` otherwise.

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


def use_threads(threads: int, *, rows: int) -> None:
    """torch's threads for the next forward in this thread: 1 for one row, else `threads`."""
    wanted = 1 if rows == 1 else max(1, threads)
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
