"""Between torch tensors (sharding's codecs) and wire tensors (p2p's bytes)."""

from __future__ import annotations

import torch

from p2p import Tensor
from sharding import Encoded, ShardingError, check_encoded, decode, encode


def hidden_to_wire(x: torch.Tensor, codec: str) -> Tensor:
    """Encode hidden states or logits with a sharding codec."""
    enc = encode(x, codec)
    return Tensor(dtype=enc.dtype, shape=enc.shape, codec=enc.codec, payload=enc.payload)


def ids_to_wire(ids: torch.Tensor) -> Tensor:
    """Token ids (1, T) as a raw int64 tensor."""
    data = ids.to(torch.int64).contiguous().cpu()
    return Tensor(dtype="int64", shape=tuple(data.shape), codec="raw",
                  payload=data.view(torch.uint8).numpy().tobytes())


def hidden_from_wire(t: Tensor, *, max_elements: int) -> torch.Tensor:
    """Decode a float tensor; raises `ShardingError` (a `CodecError`) on anything bad."""
    return decode(Encoded(codec=t.codec, dtype=t.dtype, shape=t.shape, payload=t.payload),
                  max_elements=max_elements)


def check_hidden_wire(t: Tensor, *, max_elements: int) -> None:
    """Every check `hidden_from_wire` makes, without decoding where the codec allows."""
    check_encoded(Encoded(codec=t.codec, dtype=t.dtype, shape=t.shape, payload=t.payload),
                  max_elements=max_elements)


def ids_from_wire(t: Tensor, *, vocab_size: int) -> torch.Tensor:
    """Decode token ids (1, T), checking dtype, codec and range."""
    if t.dtype != "int64" or t.codec != "raw" or len(t.shape) != 2:
        raise ShardingError(f"token ids must be a raw int64 (B, T) tensor, got {t.dtype} "
                            f"{t.codec} {list(t.shape)}")
    if len(t.payload) != 8 * t.shape[0] * t.shape[1]:
        raise ShardingError("token id payload does not match its shape")
    ids = torch.frombuffer(bytearray(t.payload), dtype=torch.int64).reshape(t.shape) \
        if t.payload else torch.empty(t.shape, dtype=torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ShardingError(f"token ids must be in [0, {vocab_size})")
    return ids
