"""`Span`: a contiguous range `[start, end)` of a model's stages, loaded and runnable.

Stage 0 is the embedding, stages 1..L the decoder blocks, stage L+1 the final norm and LM head.
A span starting at 0 takes token ids (B, T); any other span takes hidden states (B, T, C). A
span ending at L+2 returns logits (B, T, V); any other returns hidden states. Chaining spans
`[0, a) [a, b) [b, L+2)` computes exactly what the whole model computes.

Every input is checked before compute: dtype, shape, token range, and the KV cache's position
contract (see `KVCache`). Errors are `SpanError` / `PositionError`, never an `assert`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

import torch
from torch import nn

from sharding import _row as row
from sharding._checkpoint import Checkpoint
from sharding._config import ModelConfig
from sharding._errors import DeviceError, PositionError, SpanError
from sharding._kvcache import KVCache
from sharding._model import (
    Block,
    Embedding,
    Head,
    can_pack,
    inverse_frequencies,
    rope_tables,
)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str | None = None) -> torch.device:
    """The device to compute on: `name` if given, else CUDA when present, else the CPU.

    A named device is checked here, where the user named it: torch would only fail at the
    first tensor moved there, deep in a load, with an error that does not name the flag.

    Raises:
        DeviceError: `name` is not a device, or names a CUDA device this machine lacks.
    """
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"not a device: {name!r} (try cpu, cuda or cuda:1)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {name!r}: this machine has no CUDA device that torch "
                              f"{torch.__version__} can use")
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {name!r}: this machine has {count} CUDA device(s)")
    return device


def compute_dtype(config_dtype: str, device: torch.device) -> torch.dtype:
    """The dtype to compute in: the checkpoint's on a GPU, float32 on the CPU.

    CPUs without bf16 matrix units run half-precision matmuls slower than fp32 and lose
    accuracy, so a CPU node upcasts once at load time; a GPU keeps the checkpoint's dtype.
    """
    return torch_dtype(config_dtype) if device.type == "cuda" else torch.float32


def torch_dtype(name: str) -> torch.dtype:
    """Torch dtype for a config spelling ("float32", "bfloat16", "float16")."""
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise SpanError(
            f"unsupported dtype {name!r} (supported: {', '.join(_TORCH_DTYPES)})"
        ) from None


class Span(nn.Module):
    """Stages `[start, end)` of one model, with the code to run them."""

    inv_freq: torch.Tensor

    def __init__(
        self, config: ModelConfig, start: int, end: int,
        stage_weights: Mapping[int, dict[str, torch.Tensor]], *, share_tied: bool = False,
    ) -> None:
        """Build from in-memory weights; `share_tied` makes a tied head reuse the embedding
        parameter (training: one tensor, one gradient) instead of a faster transposed copy."""
        super().__init__()
        if not (0 <= start < end <= config.num_stages):
            raise SpanError(
                f"span [{start}, {end}) is outside the model's stages [0, {config.num_stages})"
            )
        self.config = config
        self.start, self.end = start, end
        self.embedding = Embedding(stage_weights[0]) if start == 0 else None
        self.blocks = nn.ModuleList(
            Block(config, stage_weights[s])
            for s in range(max(start, 1), min(end, config.head_stage))
        )
        self.head: Head | None = None
        if end == config.num_stages:
            tied = (self.embedding.embed if share_tied and config.tie_word_embeddings
                    and self.embedding is not None else None)
            self.head = Head(config, stage_weights[config.head_stage], tied=tied)
        first = next(iter(stage_weights.values()))
        any_weight = next(iter(first.values()))
        self.dtype = any_weight.dtype
        self.device = any_weight.device
        self.register_buffer("inv_freq", inverse_frequencies(config).to(self.device),
                             persistent=False)
        self.model_id: str | None = None

    @classmethod
    def load(
        cls, checkpoint: Checkpoint | str | os.PathLike[str], start: int, end: int, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
        pack: bool = True,
    ) -> Span:
        """Load stages `[start, end)` from a checkpoint folder, reading only their tensors.

        Every stage is validated (names, shapes, dtypes) before any weight is read. With
        `pack` (the default) a float32 span on a CPU also holds a oneDNN copy of its matrices
        (`pack()`: faster batches and prefill, twice the weights' memory).
        """
        ckpt = (checkpoint if isinstance(checkpoint, Checkpoint)
                else Checkpoint.open(Path(checkpoint)))
        ckpt.check_span(start, end)
        for stage in range(start, end):
            ckpt.stage_tensors(stage)
        dev = device if isinstance(device, torch.device) else pick_device(device)
        dt = dtype or compute_dtype(ckpt.config.dtype, dev)
        weights = {s: ckpt.load_stage(s, dtype=dt, device=dev) for s in range(start, end)}
        span = cls(ckpt.config, start, end, weights).requires_grad_(False).eval()
        if pack:
            span.pack()
        return span

    def pack(self) -> bool:
        """Inference only: add a copy of every matrix in oneDNN's layout, where that applies.

        Products of several rows then run on it: a batch of decode steps costs little more
        than one step, and prefill runs faster (numbers in `sharding/_model.py`); single rows
        keep the dense matrices. The copy doubles the weights' memory and cannot be trained.
        Returns whether it packed.
        """
        if not can_pack(self.device, self.dtype):
            return False
        for block in self.blocks:
            cast(Block, block).pack()
        if self.head is not None:
            self.head.pack()
        return True

    @property
    def packed(self) -> bool:
        """Whether this span holds oneDNN copies of its matrices (`pack`)."""
        blocks = [cast(Block, b).packed for b in self.blocks]
        if self.head is not None and self.head.lm_head is not None:
            blocks.append(self.head.p_head is not None)
        return bool(blocks) and all(blocks)

    # -- inputs and caches ------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def returns_logits(self) -> bool:
        return self.head is not None

    def stages(self, stages: tuple[int, int] | None) -> tuple[int, int]:
        """Validate a sub-range of this span's stages (default: all of them)."""
        if stages is None:
            return self.start, self.end
        a, b = stages
        if not (isinstance(a, int) and isinstance(b, int) and self.start <= a < b <= self.end):
            raise SpanError(
                f"stages [{a}, {b}) are not inside this span [{self.start}, {self.end})"
            )
        return a, b

    def row_macs(self, stages: tuple[int, int] | None = None) -> tuple[int, int]:
        """Multiply-adds one row costs in one block among `stages` (default: all of this
        span's; 0 without blocks), and in the head if `stages` hold it (else 0): the sizes
        `use_threads` weighs against waking OpenMP's threads."""
        a, b = self.stages(stages)
        block = self.config.block_macs if len(self._block_range(a, b)) else 0
        head = self.config.vocab_size * self.config.hidden_size \
            if self.head is not None and b == self.end else 0
        return block, head

    def _block_range(self, a: int, b: int) -> range:
        """Indices into `self.blocks` of the blocks among stages `[a, b)`."""
        first = max(self.start, 1)
        return range(max(a, 1) - first, min(b, self.config.head_stage) - first)

    def new_cache(self, max_length: int, stages: tuple[int, int] | None = None) -> KVCache:
        """A KV cache for one session on this span (or on a sub-range of its stages)."""
        if not 0 < max_length <= self.config.max_position_embeddings:
            raise PositionError(
                f"max_length {max_length} must be in 1..{self.config.max_position_embeddings}"
            )
        c = self.config
        return KVCache(num_layers=len(self._block_range(*self.stages(stages))),
                       num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                       max_length=max_length, dtype=self.dtype, device=self.device)

    def check_input(self, x: torch.Tensor, stages: tuple[int, int] | None = None) -> torch.Tensor:
        """Validate an input for stages `[a, b)`; return it on the span's device and dtype."""
        c = self.config
        a, b = self.stages(stages)
        if a == 0:
            if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
                raise SpanError(
                    f"stages [{a}, {b}) take token ids (B, T) as int64, "
                    f"got {x.dtype} {list(x.shape)}"
                )
            if x.numel():
                low, high = torch.aminmax(x)  # one pass, not two
                if int(low) < 0 or int(high) >= c.vocab_size:
                    raise SpanError(f"token ids must be in [0, {c.vocab_size})")
            return x.to(device=self.device, dtype=torch.int64)
        if x.dim() != 3 or x.shape[-1] != c.hidden_size or not x.is_floating_point():
            raise SpanError(
                f"stages [{a}, {b}) take hidden states (B, T, {c.hidden_size}) "
                f"as floats, got {x.dtype} {list(x.shape)}"
            )
        return x.to(device=self.device, dtype=self.dtype)

    # -- compute ----------------------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False,
        stages: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Run the span (or stages `[a, b)` of it) on one session's step.

        Args:
            x: token ids (B, T) when the stages start at 0, else hidden states (B, T, C).
            cache: this session's cache; the step starts at `cache.length`. Without one, `x` is
                a whole sequence from position 0 (B may then be > 1).
            last_only: when the stages end with the head, compute logits for the last
                position only (what a decode loop needs).
            stages: a sub-range of this span's stages; the cache must have been made for it.
        """
        a, b = self.stages(stages)
        if cache is None:
            return self._run(self.check_input(x, (a, b)), None, last_only, a, b)
        if x.shape[0] != 1:
            raise SpanError(f"a cached step carries one session, got batch {x.shape[0]}")
        return self._run(self.check_input(x, (a, b)), [cache], last_only, a, b)

    def forward_batch(
        self, x: torch.Tensor, caches: Sequence[KVCache], *, last_only: bool = False,
        stages: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """One step of several sessions in one forward: row b of `x` continues `caches[b]`.

        Sessions may sit at different positions; they must take the same number of new tokens
        (decode steps take one each) and run the same stages.
        """
        a, b = self.stages(stages)
        if x.shape[0] != len(caches) or not caches:
            raise SpanError(f"batch of {x.shape[0]} rows for {len(caches)} caches")
        if len({id(c) for c in caches}) != len(caches):
            raise SpanError("a cache appears twice in one batch")
        return self._run(self.check_input(x, (a, b)), list(caches), last_only, a, b)

    def _run(self, x: torch.Tensor, caches: list[KVCache] | None, last_only: bool,
             a: int, b: int) -> torch.Tensor:
        T = x.shape[1]
        blocks = self._block_range(a, b)
        if caches is None:
            if self.config.max_position_embeddings < T:
                raise PositionError(f"{T} tokens exceed max_position_embeddings "
                                    f"{self.config.max_position_embeddings}")
        else:
            for cache in caches:
                if cache.keys.shape[0] != len(blocks):
                    raise SpanError(f"cache holds {cache.keys.shape[0]} blocks, "
                                    f"stages [{a}, {b}) have {len(blocks)}")
                cache.check_step(cache.length, T)
        if a == 0 and self.embedding is not None:
            x = self.embedding(x)  # (B, T, C)
        if blocks:  # positions only where rope needs them (not for an embedding or a head)
            if caches is None:
                positions = torch.arange(T, device=self.device)[None]  # (1, T)
            else:
                base = torch.tensor([c.length for c in caches], device=self.device)
                positions = base[:, None] + torch.arange(T, device=self.device)  # (B, T)
            cos, sin = rope_tables(self.inv_freq, positions, x.dtype)  # (B, 1, T, D)
            mine = [cast(Block, self.blocks[index]) for index in blocks]
            if caches is not None and row.applies(x, caches, mine[0]):
                x = row.run_blocks(mine, x, cos, sin, caches[0])  # one decode row, in numpy
            else:
                for layer, block in enumerate(mine):
                    x = block(x, cos, sin, layer, caches)
        if b == self.config.num_stages and self.head is not None:
            x = self.head(x[:, -1:] if last_only else x)  # (B, T, V)
        if caches is not None:
            for cache in caches:
                cache.length += T
        return x

    def stage_weights(self) -> dict[int, dict[str, torch.Tensor]]:
        """Each stage's tensors under our logical names (to save a checkpoint)."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        if self.embedding is not None:
            out[0] = self.embedding.weights()
        for i, block in enumerate(self.blocks):
            out[max(self.start, 1) + i] = cast(Block, block).weights()
        if self.head is not None:
            out[self.config.head_stage] = self.head.weights()
        return out
