"""Model families: one declarative weight-name table each, chosen from a registry.

A family says how to read its `config.json` and where each of our logical weights lives in its
checkpoint. Our logical names are the same for every family (`wq`, `w_gate`, ...); the engine
fuses them into the shapes it computes with. Adding a family is adding a table here, never an
if/elif in the model code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sharding._config import ModelConfig, _get, parse_common
from sharding._errors import ConfigError

# Llama, Mistral and Qwen2 checkpoints share Hugging Face's Llama naming.
_EMBED = {"embed": "model.embed_tokens.weight"}
_BLOCK = {
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight",
    "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight",
    "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "w_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "w_up": "model.layers.{i}.mlp.up_proj.weight",
    "w_down": "model.layers.{i}.mlp.down_proj.weight",
}
_QKV_BIAS = {
    "bq": "model.layers.{i}.self_attn.q_proj.bias",
    "bk": "model.layers.{i}.self_attn.k_proj.bias",
    "bv": "model.layers.{i}.self_attn.v_proj.bias",
}
_O_BIAS = {"bo": "model.layers.{i}.self_attn.o_proj.bias"}
_HEAD = {"norm": "model.norm.weight", "lm_head": "lm_head.weight"}


@dataclass(frozen=True, slots=True)
class Family:
    """How one family names its weights and spells its config."""

    name: str
    model_types: tuple[str, ...]
    embed: Mapping[str, str]
    block: Mapping[str, str]
    qkv_bias: Mapping[str, str]
    o_bias: Mapping[str, str]
    head: Mapping[str, str]
    parse_config: Callable[[Mapping[str, Any]], ModelConfig]

    def stage_names(self, config: ModelConfig, stage: int) -> dict[str, str]:
        """Our logical weight name -> checkpoint tensor name, for one stage."""
        if not 0 <= stage < config.num_stages:
            raise ConfigError(f"stage {stage} is outside 0..{config.num_stages - 1}")
        if stage == 0:
            return dict(self.embed)
        if stage == config.head_stage:
            names = dict(self.head)
            if config.tie_word_embeddings:
                names["lm_head"] = self.embed["embed"]
            return names
        table = dict(self.block)
        if config.qkv_bias:
            table.update(self.qkv_bias)
        if config.o_bias:
            table.update(self.o_bias)
        return {ours: theirs.format(i=stage - 1) for ours, theirs in table.items()}


def _llama(raw: Mapping[str, Any]) -> ModelConfig:
    bias = _get(raw, "attention_bias", bool, False)
    return parse_common(raw, family="llama", qkv_bias=bias, o_bias=bias, sliding_window=None)


def _mistral(raw: Mapping[str, Any]) -> ModelConfig:
    window = _get(raw, "sliding_window", int, None)
    return parse_common(raw, family="mistral", qkv_bias=False, o_bias=False,
                        sliding_window=window)


def _qwen2(raw: Mapping[str, Any]) -> ModelConfig:
    if _get(raw, "use_sliding_window", bool, False):
        raise ConfigError("qwen2 with use_sliding_window=true is not supported")
    return parse_common(raw, family="qwen2", qkv_bias=True, o_bias=False, sliding_window=None)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("llama", ("llama",), _EMBED, _BLOCK, _QKV_BIAS, _O_BIAS, _HEAD, _llama),
        Family("mistral", ("mistral",), _EMBED, _BLOCK, {}, {}, _HEAD, _mistral),
        Family("qwen2", ("qwen2",), _EMBED, _BLOCK, _QKV_BIAS, {}, _HEAD, _qwen2),
    )
}
_BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}


def family_for(raw: Mapping[str, Any]) -> Family:
    """The family a `config.json` belongs to, by its `model_type`."""
    model_type = raw.get("model_type")
    family = _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise ConfigError(
            f"unknown model family {model_type!r} (supported: {', '.join(sorted(_BY_MODEL_TYPE))})"
        )
    return family
