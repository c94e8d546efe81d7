"""The sharding package's errors: one root, named by what went wrong."""

from __future__ import annotations


class ShardingError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(ShardingError):
    """A `config.json` that this engine cannot run (unknown family, bad values)."""


class DeviceError(ShardingError):
    """A device this machine does not have, or a name torch does not know."""


class CheckpointError(ShardingError):
    """A checkpoint folder whose tensors do not match its config (missing, wrong shape/dtype)."""


class SpanError(ShardingError):
    """A span outside the model, or an input that does not fit the span it is given to."""


class PositionError(ShardingError):
    """A step whose position breaks the KV cache's contract (gap, past `max_length`)."""


class CodecError(ShardingError):
    """Activations that cannot be encoded or decoded (non-finite values, bad payload)."""
