"""`KVCache`: one session's keys and values for the blocks of one span.

Position contract (the one thing every caller must know):
- positions `[0, length)` are filled; a step of `T` tokens must start at `position == length`
  and end at or before `max_length`, and fills `[length, length + T)`;
- `rollback(p)` forgets `[p, length)` so a client can replay or branch from an earlier position
  (a replacement hop rebuilds its cache by replaying the client's kept inputs from 0);
- `length` only moves after a whole span forward succeeded, so a failed step leaves the cache
  exactly as it was.

The cache is allocated once at `max_length` when the session opens: a node budgets KV-cache
tokens per session up front, and a preallocated buffer turns every decode step into a slice
write with no reallocation.
"""

from __future__ import annotations

import torch

from sharding._errors import PositionError


class KVCache:
    """Keys and values of shape `(layers, 1, kv_heads, max_length, head_dim)`."""

    __slots__ = ("keys", "values", "length", "max_length")

    def __init__(
        self, *, num_layers: int, num_kv_heads: int, head_dim: int, max_length: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        if max_length <= 0:
            raise PositionError(f"max_length must be positive, got {max_length}")
        shape = (num_layers, 1, num_kv_heads, max_length, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_length = max_length

    @property
    def nbytes(self) -> int:
        """Bytes held by this cache."""
        return self.keys.nbytes + self.values.nbytes

    def check_step(self, position: int, num_tokens: int) -> None:
        """Raise `PositionError` unless a step of `num_tokens` at `position` keeps the contract."""
        if num_tokens <= 0:
            raise PositionError(f"a step needs at least one token, got {num_tokens}")
        if position != self.length:
            raise PositionError(
                f"step at position {position} but the cache holds {self.length} positions "
                "(steps must be contiguous; roll back explicitly to replay)"
            )
        if position + num_tokens > self.max_length:
            raise PositionError(
                f"step would reach position {position + num_tokens}, past max_length "
                f"{self.max_length}"
            )

    def rollback(self, position: int) -> None:
        """Forget every position at or after `position`."""
        if not 0 <= position <= self.length:
            raise PositionError(f"cannot roll back to {position}: cache holds {self.length}")
        self.length = position

    def write(
        self, layer: int, position: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` (1, kv_heads, T, head_dim) at `position`; return keys/values so far."""
        end = position + k.shape[2]
        self.keys[layer, :, :, position:end] = k
        self.values[layer, :, :, position:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
