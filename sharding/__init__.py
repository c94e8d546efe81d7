"""sharding: a Llama-family engine that runs any contiguous span of a checkpoint's stages."""

from sharding._checkpoint import Checkpoint, TensorInfo
from sharding._codecs import BLOCK, CODECS, Encoded, decode, encode, error_bound, payload_size
from sharding._config import ModelConfig, RopeScaling
from sharding._errors import (
    CheckpointError,
    CodecError,
    ConfigError,
    PositionError,
    ShardingError,
    SpanError,
)
from sharding._export import hf_config, save_checkpoint
from sharding._families import FAMILIES, Family
from sharding._kvcache import KVCache
from sharding._span import Span, compute_dtype, pick_device, torch_dtype
from sharding._threads import available_cores, set_blas_threads, use_threads
from sharding._tokenizer import Tokenizer
from sharding.embedded import EMBEDDED_MODEL

# numpy's OpenBLAS runs the one-row products on one thread: its default pool (one thread per
# core) spins waiting for work after every call, on the cores torch's own threads and the other
# processes of a pipeline need (with torch on 2 threads beside it, a decode step of the 125M
# model took 108 ms instead of 20). Batches and prefill get their threads from torch.
set_blas_threads(1)

__all__ = [
    "BLOCK",
    "CODECS",
    "EMBEDDED_MODEL",
    "FAMILIES",
    "Checkpoint",
    "CheckpointError",
    "CodecError",
    "ConfigError",
    "Encoded",
    "Family",
    "KVCache",
    "ModelConfig",
    "PositionError",
    "RopeScaling",
    "ShardingError",
    "Span",
    "SpanError",
    "TensorInfo",
    "Tokenizer",
    "available_cores",
    "compute_dtype",
    "decode",
    "encode",
    "error_bound",
    "hf_config",
    "pick_device",
    "payload_size",
    "save_checkpoint",
    "torch_dtype",
    "use_threads",
]
