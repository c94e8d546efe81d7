"""Fixtures for the engine's tests: tiny random checkpoints written by `transformers`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

TINY: dict[str, dict[str, Any]] = {
    # Llama 3 style: GQA, llama3 RoPE scaling, untied head.
    "llama3": dict(
        model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        rope_theta=500000.0,
    ),
    # Llama 2 style: full multi-head attention, tied embeddings, attention biases.
    "llama2": dict(
        model_type="llama", hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=97,
        max_position_embeddings=256, tie_word_embeddings=True, attention_bias=True,
    ),
    # Mistral: sliding window shorter than the test sequence.
    "mistral": dict(
        model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, vocab_size=103,
        max_position_embeddings=256, sliding_window=7, tie_word_embeddings=False,
    ),
    # Qwen2: q/k/v biases, tied embeddings, explicit head_dim.
    "qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
        max_position_embeddings=256, tie_word_embeddings=True,
    ),
}


def make_hf_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """A tiny random `transformers` model whose every parameter (norms too) is random."""
    import transformers

    spec = dict(TINY[name])
    model_type = spec.pop("model_type")
    config_cls = transformers.AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and p.numel() <= 128 else 0))
    return model.to(dtype).eval()


@pytest.fixture
def hf_checkpoint(tmp_path: Path) -> Callable[..., tuple[Any, Path]]:
    """Factory: save a tiny random HF model of a family; return (model, folder)."""

    def make(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Any, Path]:
        model = make_hf_model(name, dtype, seed)
        folder = tmp_path / f"{name}-{str(dtype).split('.')[-1]}-{seed}"
        model.save_pretrained(folder)
        return model, folder

    return make
