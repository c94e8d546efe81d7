"""Shared pieces of the benchmarks: the reference random model, timing, and table printing."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# The ~125M-parameter Llama the issues benchmark on: hidden 768, 12 layers, GQA 12/4.
REF_125M = dict(
    model_type="llama", hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
    num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
    max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5,
)


def random_hf_checkpoint(folder: Path, spec: dict[str, Any] = REF_125M, seed: int = 0, *,
                         dtype: torch.dtype = torch.float32, device: str = "cpu") -> Path:
    """Write a random `transformers` checkpoint once; reuse it when it exists.

    `device` only says where the random weights are drawn (a GPU draws a 1B model in a
    moment); the checkpoint on disk is the same layout either way.
    """
    if (folder / "config.json").is_file():
        return folder
    import transformers

    spec = dict(spec)
    config = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    return folder


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest wall time of `repeats` calls: the least disturbed by a noisy machine."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, right-aligned numbers, for terminals and closing notes alike."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if n and i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def cores_of(cores_per_process: int, index: int) -> list[int]:
    """The cores of process `index` when each process of a benchmark gets cores of its own,
    as if each were a machine: 0 is the benchmark itself (the client, the single-process
    engine), 1, 2, ... its nodes or hops in order."""
    k = cores_per_process
    return list(range(k * index, k * (index + 1)))


def check_cores(cores_per_process: int, processes: int, *, spare: int = 0) -> None:
    """Exit with a clear message unless the machine has cores for `processes` processes of
    `cores_per_process` each, plus `spare`."""
    needed = cores_per_process * processes + spare
    have = os.cpu_count() or 1
    if cores_per_process < 1 or have < needed:
        raise SystemExit(f"--cores-per-process {cores_per_process} needs {needed} cores "
                         f"({processes} processes{f' and {spare} spare' if spare else ''}); "
                         f"this machine has {have}")


def pinned(cores_per_process: int, index: int, argv: Sequence[str]) -> list[str]:
    """`argv` started on the cores of process `index` (`cores_of`): thread pools size
    themselves from the affinity they start with."""
    cores = ",".join(map(str, cores_of(cores_per_process, index)))
    return ["taskset", "-c", cores, *argv]


def pin_this_process(cores_per_process: int, env: dict[str, str] | None = None) -> None:
    """Re-execute this benchmark on its own cores (`cores_of(k, 0)`) unless it runs there
    already: numpy's and torch's thread pools read the affinity when they load."""
    mine = set(cores_of(cores_per_process, 0))
    if os.sched_getaffinity(0) != mine or env is not None:
        os.sched_setaffinity(0, mine)
        argv = [sys.executable, *sys.orig_argv[1:]]
        os.execve(sys.executable, argv, env if env is not None else dict(os.environ))
