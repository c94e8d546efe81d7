"""Fixtures shared by every package's tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sharding import ModelConfig, save_checkpoint


def write_tiny_checkpoint(folder: Path, *, seed: int = 0, layers: int = 4) -> Path:
    """A small random byte-level Llama checkpoint with a real `tokenizer.json`."""
    from sharding.embedded.train import init_weights, tokenizer_json

    config = ModelConfig(family="llama", vocab_size=264, hidden_size=64, intermediate_size=128,
                         num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16,
                         max_position_embeddings=512, tie_word_embeddings=True)
    weights = init_weights(config, torch.Generator().manual_seed(seed))
    # Larger weights than a fresh init, so random models still make confident, varied choices.
    weights = {s: {k: v * 8 if v.dim() > 1 else v for k, v in w.items()}
               for s, w in weights.items()}
    weights[layers + 1]["lm_head"] = weights[0]["embed"]
    save_checkpoint(folder, config, weights, eos_token_id=256)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json()))
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block random checkpoint folder (6 stages), made once per test run."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-model"))
