"""How a forward spends the cores it is given: torch's threads or OpenBLAS's, by its rows.

A forward over one row (a decode step of one sequence) is a string of matrix-vector products,
which numpy's OpenBLAS runs (`sharding/_model.py`) and which are bound by memory bandwidth: a
second core adds its bandwidth (a 100 MB product took 3.7-4.4 ms on two OpenBLAS threads, 4.8-5.9
on one). The small torch operations between them do not gain from OpenMP threads that must be
woken for each of them. A forward over several rows (a batch, a prefill) is a set of matrix
products in oneDNN or torch, which want torch's threads and no BLAS. So, with `threads` cores:

- one row: torch 1 thread, OpenBLAS `threads`;
- several rows: torch `threads`, OpenBLAS 1.

Measured on the 2-core dev machine, the whole 125M engine decoding one sequence: 25.8 ms per
token this way against 31.3 with torch on 2 threads and OpenBLAS on 1 (medians of 6 rounds).
Results do not change: OpenBLAS splits a product's outputs among its threads, so each output
is summed the same way on any number of them.

OpenBLAS's idle workers spin for a while after each call before they sleep (2^28 cycles by
default, a tenth of a second, on cores a pipeline's next hop may need); the package sets
`OPENBLAS_THREAD_TIMEOUT` (read once, when numpy loads OpenBLAS) to 2^18 cycles unless the
environment says otherwise.
"""

from __future__ import annotations

import os
from typing import Any

import torch

_blas: Any = None  # threadpoolctl's controller of numpy's OpenBLAS, once looked up
_blas_threads = 0  # what it was last set to (0: never)


def _openblas() -> Any:
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        controllers = ThreadpoolController().select(internal_api="openblas").lib_controllers
        _blas = controllers[0] if controllers else False
    return _blas


def set_blas_threads(threads: int) -> None:
    """OpenBLAS's threads for numpy's products (process-wide; set only when it changes)."""
    global _blas_threads
    if threads == _blas_threads:
        return
    blas = _openblas()
    if blas:
        blas.set_num_threads(threads)
    _blas_threads = threads


def available_cores() -> int:
    """The cores this process may run on."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def use_threads(threads: int, *, rows: int) -> None:
    """Spend `threads` cores on the next forward, one over `rows` rows (see the module doc)."""
    threads = max(1, threads)
    torch_threads, blas_threads = (1, threads) if rows == 1 else (threads, 1)
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    set_blas_threads(blas_threads)
