"""A node holding a quarter of a model must not pay for the whole model in memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from sharding import ModelConfig, save_checkpoint

_MEASURE = r"""
import sys, torch
from sharding import Span

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise SystemExit("no " + field)

folder, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = rss("VmRSS:")
span = Span.load(folder, start, end, device="cpu")
print(rss("VmHWM:") - base)
"""


def _peak_load_bytes(folder: Path, start: int, end: int) -> int:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(folder), str(start), str(end)],
                         check=True, capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1])


def test_a_quarter_of_the_stages_costs_at_most_a_third_of_the_peak(tmp_path: Path) -> None:
    config = ModelConfig(family="llama", vocab_size=8000, hidden_size=384,
                         intermediate_size=1024, num_layers=14, num_heads=6, num_kv_heads=6,
                         head_dim=64)
    g = torch.Generator().manual_seed(0)
    C, I = config.hidden_size, config.intermediate_size

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    weights = {0: {"embed": rand(8000, C)}, 15: {"norm": torch.ones(C), "lm_head": rand(8000, C)}}
    for s in range(1, 15):
        weights[s] = {"attn_norm": torch.ones(C), "mlp_norm": torch.ones(C), "wq": rand(C, C),
                      "wk": rand(C, C), "wv": rand(C, C), "wo": rand(C, C), "w_gate": rand(I, C),
                      "w_up": rand(I, C), "w_down": rand(C, I)}
    save_checkpoint(tmp_path, config, weights)
    del weights
    full = _peak_load_bytes(tmp_path, 0, 16)
    quarter = _peak_load_bytes(tmp_path, 6, 10)  # 4 of 16 stages
    weight_bytes = (tmp_path / "model.safetensors").stat().st_size
    assert full >= 0.9 * weight_bytes  # the measurement sees the weights at all
    assert quarter <= full / 3, (quarter, full)
