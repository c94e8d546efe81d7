"""The generation loop, shared by the network client and the single-process reference.

Theory of operation: a generation only needs `forward(position, ids) -> logits` — "run these
new token ids at this position, give me the last position's logits" — whether the stages run
in this process (`shardnet generate --local`) or across a chain of peers. Sampling always
happens here, on the client, with a seeded `Sampler`, so greedy and seeded outputs are the
same whichever path computed the logits. Text is streamed incrementally: bytes that do not yet
form a whole UTF-8 character, and any tail that could still become a stop string, are held
back until they resolve, so what was shown never has to be taken back.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

import torch

from node._errors import GenerationError
from node._sampling import Sampler, SamplingParams, check_stop
from sharding import Tokenizer

Forward = Callable[[int, torch.Tensor], Awaitable[torch.Tensor]]
"""`forward(position, ids (1, T)) -> logits of the last position (V,)`."""


@dataclass(slots=True)
class GenerationStats:
    """What a generation measured (filled in as it runs)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float = 0.0
    elapsed_s: float = 0.0
    stopped_by: str = ""

    @property
    def decode_tokens_per_s(self) -> float:
        decode = self.elapsed_s - self.first_token_s
        return (self.new_tokens - 1) / decode if self.new_tokens > 1 and decode > 0 else 0.0


def check_positions(prompt_tokens: int, new_tokens: int, positions: int) -> None:
    """Refuse a generation that would run past the model's positions, before any work.

    Raises:
        GenerationError: the prompt and the new tokens together need more than `positions`.
    """
    if prompt_tokens + new_tokens > positions:
        raise GenerationError(f"prompt ({prompt_tokens} tokens) + new tokens ({new_tokens}) "
                              f"exceeds the model's {positions} positions")


async def generate_ids(
    forward: Forward, prompt_ids: Sequence[int], sampler: Sampler, *, eos_id: int | None,
    stats: GenerationStats | None = None,
) -> AsyncGenerator[int, None]:
    """Yield sampled token ids: one prefill of the prompt, then one step per token."""
    if not prompt_ids:
        raise GenerationError("the prompt is empty")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    max_new = sampler.params.max_new_tokens
    logits = await forward(0, torch.tensor([list(prompt_ids)], dtype=torch.int64))
    position = len(prompt_ids)
    for _ in range(max_new):
        token = sampler.sample(logits)
        if stats.new_tokens == 0:
            stats.first_token_s = time.perf_counter() - stats.started
        if token == eos_id:
            stats.stopped_by = "eos"
            break
        stats.new_tokens += 1
        stats.elapsed_s = time.perf_counter() - stats.started
        yield token
        if stats.new_tokens == max_new:
            stats.stopped_by = "max_new_tokens"
            break
        logits = await forward(position, torch.tensor([[token]], dtype=torch.int64))
        position += 1
    stats.elapsed_s = time.perf_counter() - stats.started


async def stream_text(
    tokens: AsyncGenerator[int, None], tokenizer: Tokenizer, stop: Sequence[str], *,
    stats: GenerationStats | None = None,
) -> AsyncGenerator[str, None]:
    """Yield text pieces of `tokens` as they become final (whole characters, stops cut)."""
    ids: list[int] = []
    shown = 0
    text = ""
    async with aclosing(tokens):
        async for token in tokens:
            ids.append(token)
            text = tokenizer.decode(ids)
            check = check_stop(text, stop)
            final = check.emit_until
            while final > shown and text[final - 1] == "\ufffd":  # an unfinished UTF-8 sequence
                final -= 1
            if final > shown:
                yield text[shown:final]
                shown = final
            if check.stopped:
                if stats is not None:
                    stats.stopped_by = "stop"
                return
    # The generation ended: whatever was held back for a stop string that never came is final.
    if len(text) > shown:
        yield text[shown:]


def generate_text(
    forward: Forward, tokenizer: Tokenizer, prompt: str, params: SamplingParams, *,
    eos_id: int | None, stats: GenerationStats | None = None,
) -> AsyncGenerator[str, None]:
    """Sample a completion of `prompt` through `forward`, streamed as text."""
    tokens = generate_ids(forward, tokenizer.encode(prompt), Sampler(params), eos_id=eos_id,
                          stats=stats)
    return stream_text(tokens, tokenizer, params.stop, stats=stats)
