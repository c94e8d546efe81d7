"""Stages run in this process: the `--local` reference and a client's own embed/head stages."""

from __future__ import annotations

import torch
import trio

from sharding import KVCache, Span


class LocalStages:
    """One session over stages `[start, end)` of a span held by this process.

    Compute runs in a worker thread behind `limiter`, like on a server, so a client that runs
    its own embedding and head keeps its event loop (heartbeats, other hops) responsive.
    `inline` runs it on the event loop instead, for the embedding stage only: a lookup of T
    rows takes microseconds, less than the thread hand-off it would otherwise pay per token.
    """

    def __init__(self, span: Span, *, max_length: int, stages: tuple[int, int] | None = None,
                 limiter: trio.CapacityLimiter | None = None, inline: bool = False) -> None:
        self.span = span
        self.inline = inline
        self.start, self.end = span.stages(stages)
        self.cache: KVCache = span.new_cache(max_length, stages=(self.start, self.end))
        self.limiter = limiter or trio.CapacityLimiter(1)

    def _run(self, position: int, x: torch.Tensor, last_only: bool) -> torch.Tensor:
        if position < self.cache.length:
            self.cache.rollback(position)
        with torch.inference_mode():
            out: torch.Tensor = self.span(x, self.cache, last_only=last_only,
                                          stages=(self.start, self.end))
        return out

    async def step(self, position: int, x: torch.Tensor, *, last_only: bool) -> torch.Tensor:
        """Run a step at `position` (rolling the cache back first if it is behind)."""
        if self.inline:
            await trio.lowlevel.checkpoint()
            return self._run(position, x, last_only)
        return await trio.to_thread.run_sync(self._run, position, x, last_only,
                                             limiter=self.limiter)

    async def forward(self, position: int, ids: torch.Tensor) -> torch.Tensor:
        """The whole-model `Forward` of the generation loop: last position's logits (V,)."""
        logits = await self.step(position, ids, last_only=True)
        return logits[0, -1].float()
