"""Write a model as a Hugging Face checkpoint folder (`config.json` + `model.safetensors`).

Used by the embedded model's training script and by tests and benchmarks that need a real
checkpoint on disk; the output loads in `transformers` and in this engine alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sharding._config import ModelConfig
from sharding._families import FAMILIES


def hf_config(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """The `config.json` dict a Hugging Face loader expects for `config`."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope = {"rope_type": s.kind, "rope_theta": config.rope_theta, "factor": s.factor}
        if s.kind == "llama3":
            rope |= {"low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                     "original_max_position_embeddings": s.original_max_position_embeddings}
    out: dict[str, Any] = {
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM"}[config.family]],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "dtype": config.dtype,
    }
    if config.family == "llama":
        out["attention_bias"] = config.qkv_bias
    if config.family == "mistral":
        out["sliding_window"] = config.sliding_window
    return out | extra


def save_checkpoint(
    folder: str | os.PathLike[str], config: ModelConfig,
    stage_weights: dict[int, dict[str, torch.Tensor]], *, dtype: torch.dtype | None = None,
    **config_extra: Any,
) -> Path:
    """Save every stage's weights under the family's checkpoint names, plus `config.json`."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    family = FAMILIES[config.family]
    tensors: dict[str, torch.Tensor] = {}
    for stage, weights in sorted(stage_weights.items()):
        names = family.stage_names(config, stage)
        for ours, tensor in weights.items():
            if stage == config.head_stage and ours == "lm_head" and config.tie_word_embeddings:
                continue
            t = tensor.detach().cpu()
            tensors[names[ours]] = (t.to(dtype) if dtype is not None else t).contiguous().clone()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16",
                  torch.float16: "float16"}[dtype or next(iter(tensors.values())).dtype]
    cfg = hf_config(config, **config_extra) | {"dtype": dtype_name}
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path
