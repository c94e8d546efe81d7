"""sharding: a Llama-family engine that runs any contiguous span of a checkpoint's stages."""

# First: OpenBLAS's idle timeout must be in the environment before torch loads numpy.
import sharding._openblas  # noqa: F401

# isort: split

from sharding._checkpoint import Checkpoint, TensorInfo
from sharding._codecs import (
    BLOCK,
    CODECS,
    Encoded,
    check_encoded,
    decode,
    encode,
    error_bound,
    payload_size,
)
from sharding._config import ModelConfig, RopeScaling
from sharding._errors import (
    CheckpointError,
    CodecError,
    ConfigError,
    DeviceError,
    PositionError,
    ShardingError,
    SpanError,
)
from sharding._export import hf_config, save_checkpoint
from sharding._families import FAMILIES, Family
from sharding._kvcache import KVCache
from sharding._span import Span, compute_dtype, pick_device, torch_dtype
from sharding._threads import available_cores, package_blas_threads, set_blas_threads, use_threads
from sharding._tokenizer import Tokenizer
from sharding.embedded import EMBEDDED_MODEL

# numpy's OpenBLAS runs the one-row products on every core when its idle workers sleep soon
# after each call, else on one (`sharding/_openblas.py`). Batches and prefill get their threads
# from torch.
set_blas_threads(package_blas_threads())

__all__ = [
    "BLOCK",
    "CODECS",
    "EMBEDDED_MODEL",
    "FAMILIES",
    "Checkpoint",
    "CheckpointError",
    "CodecError",
    "ConfigError",
    "DeviceError",
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
    "check_encoded",
    "decode",
    "encode",
    "error_bound",
    "hf_config",
    "pick_device",
    "package_blas_threads",
    "payload_size",
    "save_checkpoint",
    "torch_dtype",
    "use_threads",
]
