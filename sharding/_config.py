"""`ModelConfig`: everything the engine needs to know about a Llama-style decoder.

Theory of operation: a Hugging Face `config.json` is a loose bag of keys whose spelling differs
between families and between `transformers` releases (`rope_scaling` + `rope_theta` before 5.0,
`rope_parameters` after). `ModelConfig.from_hf` reads that bag once, through the family registry,
into one frozen, validated value; nothing downstream ever looks at the raw dict again. Every check
happens here, before any weight is read, so a bad checkpoint fails fast and names the key at fault.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sharding._errors import ConfigError

# The weight dtypes a checkpoint may hold, by their `config.json` / safetensors spelling.
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Frequency scaling applied to RoPE's inverse frequencies.

    `kind` is "linear" (positions divided by `factor`) or "llama3" (the piecewise rule that
    Llama 3.1 introduced: long wavelengths scaled by `factor`, short ones untouched, a smooth
    blend in between).
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A Llama-family decoder's shape; stages are 0 (embedding), 1..L (blocks), L+1 (head)."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive, got {self.sliding_window!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unsupported dtype {self.dtype!r} (supported: {', '.join(DTYPES)})")

    @property
    def num_stages(self) -> int:
        """Stages in the model: the embedding, every block, and the head."""
        return self.num_layers + 2

    @property
    def head_stage(self) -> int:
        """Index of the final-norm + LM-head stage."""
        return self.num_layers + 1

    @property
    def qkv_size(self) -> int:
        """Output width of the fused query/key/value projection."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def block_macs(self) -> int:
        """Multiply-adds one row costs in one block's matrices (attention scores aside)."""
        h = self.hidden_size
        return h * self.qkv_size + self.num_heads * self.head_dim * h \
            + 3 * h * self.intermediate_size

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-ready dict: the canonical form hashed into `model_id`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """Read a Hugging Face `config.json` dict, dispatching on its `model_type`."""
        from sharding._families import family_for  # the registry imports this module

        return family_for(raw).parse_config(raw)


def _get(
    raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    """One typed key from a `config.json`, with a clear error naming it."""
    if key not in raw or raw[key] is None:
        if default is ...:
            raise ConfigError(f"config.json lacks required key {key!r}")
        return default
    value = raw[key]
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"config.json key {key!r} must be {kind}, got a boolean")
    if not isinstance(value, kind):
        raise ConfigError(f"config.json key {key!r} has type {type(value).__name__}")
    return value


def _rope(raw: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """RoPE theta and scaling from either spelling (`rope_parameters`, or the older pair)."""
    params = raw.get("rope_parameters")
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
        if "rope_theta" in raw:
            params["rope_theta"] = raw["rope_theta"]
    if not isinstance(params, Mapping):
        raise ConfigError("config.json rope parameters must be an object")
    theta = float(_get(params, "rope_theta", (int, float), 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind not in ("linear", "llama3"):
        raise ConfigError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")
    factor = float(_get(params, "factor", (int, float)))
    if not (factor > 0 and math.isfinite(factor)):
        raise ConfigError(f"rope scaling factor must be positive, got {factor!r}")
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=factor)
    return theta, RopeScaling(
        kind="llama3",
        factor=factor,
        low_freq_factor=float(_get(params, "low_freq_factor", (int, float))),
        high_freq_factor=float(_get(params, "high_freq_factor", (int, float))),
        original_max_position_embeddings=int(
            _get(params, "original_max_position_embeddings", int)
        ),
    )


def parse_common(
    raw: Mapping[str, Any], *, family: str, qkv_bias: bool, o_bias: bool,
    sliding_window: int | None,
) -> ModelConfig:
    """The keys every Llama-style family shares; families decide biases and windows."""
    if _get(raw, "hidden_act", str, "silu") != "silu":
        raise ConfigError(f"unsupported hidden_act {raw['hidden_act']!r} (only silu)")
    if _get(raw, "mlp_bias", bool, False):
        raise ConfigError("mlp_bias=true is not supported")
    hidden = _get(raw, "hidden_size", int)
    heads = _get(raw, "num_attention_heads", int)
    if heads <= 0 or hidden % heads and "head_dim" not in raw:
        raise ConfigError(f"hidden_size {hidden} is not divisible by {heads} heads")
    theta, scaling = _rope(raw)
    dtype = raw.get("dtype", raw.get("torch_dtype")) or "float32"
    return ModelConfig(
        family=family,
        vocab_size=_get(raw, "vocab_size", int),
        hidden_size=hidden,
        intermediate_size=_get(raw, "intermediate_size", int),
        num_layers=_get(raw, "num_hidden_layers", int),
        num_heads=heads,
        num_kv_heads=_get(raw, "num_key_value_heads", int, heads),
        head_dim=_get(raw, "head_dim", int, hidden // heads if heads else 0),
        rms_norm_eps=float(_get(raw, "rms_norm_eps", (int, float), 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=_get(raw, "max_position_embeddings", int, 2048),
        tie_word_embeddings=_get(raw, "tie_word_embeddings", bool, False),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        sliding_window=sliding_window,
        dtype=str(dtype),
    )
