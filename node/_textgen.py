"""`generate --local`: the whole model in this process, with the client's sampling code.

This is the reference the network path must match token for token (greedy and seeded), and a
handy tool for scripts.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path

import torch

from node._generate import GenerationStats, check_positions, generate_text
from node._local import LocalStages
from node._sampling import SamplingParams
from sharding import Checkpoint, Span, Tokenizer

EOT_TOKEN = "<|endoftext|>"


def eos_id(tokenizer: Tokenizer, folder: Path) -> int | None:
    """The end-of-text id: the tokenizer's marker, else config.json's `eos_token_id`."""
    import json

    found = tokenizer.token_id(EOT_TOKEN)
    if found is not None:
        return found
    value = json.loads((folder / "config.json").read_text()).get("eos_token_id")
    return value if isinstance(value, int) else None


class LocalModel:
    """A whole checkpoint loaded in this process, ready to generate."""

    def __init__(self, folder: str | os.PathLike[str], *, device: str | None = None,
                 dtype: torch.dtype | None = None, threads: int | None = None) -> None:
        self.threads = threads  # cores for a forward (`sharding.use_threads`); None: as set
        self.folder = Path(folder)
        self.checkpoint = Checkpoint.open(self.folder)
        self.span = Span.load(self.checkpoint, 0, self.checkpoint.config.num_stages,
                              device=device, dtype=dtype)
        self.tokenizer = Tokenizer.from_folder(self.folder)
        self.eos_id = eos_id(self.tokenizer, self.folder)

    async def generate(self, prompt: str, params: SamplingParams,
                       stats: GenerationStats | None = None) -> AsyncGenerator[str, None]:
        """Stream text for `prompt` (sampling as the network client does)."""
        tokens = len(self.tokenizer.encode(prompt))
        check_positions(tokens, params.max_new_tokens,
                        self.checkpoint.config.max_position_embeddings)
        max_length = tokens + params.max_new_tokens
        stages = LocalStages(self.span, max_length=max_length, threads=self.threads)
        pieces = generate_text(stages.forward, self.tokenizer, prompt, params,
                               eos_id=self.eos_id, stats=stats)
        async with aclosing(pieces):
            async for piece in pieces:
                yield piece
