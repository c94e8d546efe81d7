"""numpy's OpenBLAS pool: how long its idle threads spin, and so how many it may have.

The one-row products of a decode step run on numpy's OpenBLAS (`sharding/_model.py`). They are
bound by memory bandwidth, and a second core's share of it makes them faster (a 98 MB product:
2.7-2.9 ms on two threads, 3.9 on one). But after every call OpenBLAS's idle workers spin for
`2**OPENBLAS_THREAD_TIMEOUT` cycles before they sleep, and the default (28) is about 0.1 s: a
pipeline node's workers then spin on the cores the next hop and torch's own threads need (with
torch on 2 threads beside them, a decode step of the 125M model took 108 ms instead of 20).
With a timeout of 18 (~0.1 ms) they sleep almost at once (measured: 0.9 ms of CPU in the
300 ms after a product, against 104 ms by default).

OpenBLAS reads the variable once, when it loads, and numpy loads it (torch imports numpy). So
this module runs `prepare()` when it is imported, which the `sharding` package does first of
all, before any torch import; if numpy was already loaded by then, only a timeout the user set
beforehand counts, and without one the pool keeps a single thread (`QUIET` is False). Nothing
here imports numpy or torch.
"""

from __future__ import annotations

import os
import sys

VARIABLE = "OPENBLAS_THREAD_TIMEOUT"
TIMEOUT = 18  # 2**18 cycles: ~0.1 ms at 2.5 GHz
MAX_QUIET_TIMEOUT = 20  # ~0.4 ms; beyond it a spinning pool takes cores from other processes


def quiet(value: str | None) -> bool:
    """Whether an `OPENBLAS_THREAD_TIMEOUT` setting makes idle workers sleep soon enough."""
    try:
        return value is not None and 0 < int(value) <= MAX_QUIET_TIMEOUT
    except ValueError:
        return False


def prepare(environ: dict[str, str] | os._Environ[str] = os.environ,
            loaded: bool | None = None) -> bool:
    """Set the short timeout unless the user chose one; whether the pool in force is quiet.

    `loaded` (default: whether numpy is imported yet) says whether OpenBLAS already read its
    settings, in which case setting the variable now would change nothing.
    """
    if loaded is None:
        loaded = "numpy" in sys.modules
    if not loaded:
        environ.setdefault(VARIABLE, str(TIMEOUT))
    return quiet(environ.get(VARIABLE))


QUIET = prepare()
