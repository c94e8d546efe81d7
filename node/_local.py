"""Stages run in this process: the `--local` reference and a client's own embed/head stages."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import trio

from node._batching import BatchPolicy, gather_wait
from node._offload import run_in_thread
from sharding import KVCache, Span, use_threads


class LocalStages:
    """One session over stages `[start, end)` of a span held by this process.

    Compute runs in a worker thread behind `limiter`, like on a server, so a client that runs
    its own embedding and head keeps its event loop (heartbeats, other hops) responsive.
    `inline` runs it on the event loop instead, for the embedding stage only: a lookup of T
    rows takes microseconds, less than the thread hand-off it would otherwise pay per token.
    """

    def __init__(self, span: Span, *, max_length: int, stages: tuple[int, int] | None = None,
                 limiter: trio.CapacityLimiter | None = None, inline: bool = False,
                 threads: int | None = None) -> None:
        self.span = span
        self.inline = inline
        self.threads = threads  # cores for a forward (`sharding.use_threads`); None: as set
        self.start, self.end = span.stages(stages)
        self.cache: KVCache = span.new_cache(max_length, stages=(self.start, self.end))
        self.limiter = limiter or trio.CapacityLimiter(1)

    def _run(self, position: int, x: torch.Tensor, last_only: bool) -> torch.Tensor:
        if position < self.cache.length:
            self.cache.rollback(position)
        if self.threads is not None and not self.inline:
            use_threads(self.threads, rows=x.shape[0] * x.shape[1],
                        macs=self.span.row_macs((self.start, self.end)))
        with torch.inference_mode():
            out: torch.Tensor = self.span(x, self.cache, last_only=last_only,
                                          stages=(self.start, self.end))
        return out

    async def step(self, position: int, x: torch.Tensor, *, last_only: bool) -> torch.Tensor:
        """Run a step at `position` (rolling the cache back first if it is behind)."""
        if self.inline:
            await trio.lowlevel.checkpoint()
            return self._run(position, x, last_only)
        return await run_in_thread(self._run, position, x, last_only, limiter=self.limiter)

    async def forward(self, position: int, ids: torch.Tensor) -> torch.Tensor:
        """The whole-model `Forward` of the generation loop: last position's logits (V,)."""
        logits = await self.step(position, ids, last_only=True)
        return logits[0, -1].float()


@dataclass(eq=False, slots=True)
class _HeadRequest:
    x: torch.Tensor  # (1, 1, C)
    out: torch.Tensor | None = None
    error: BaseException | None = None
    wake: trio.Event = field(default_factory=trio.Event)


class SharedHead:
    """A client's head stage (final norm and LM head), shared by all its generations.

    The head keeps no per-session state, so the steps of concurrent generations run as one
    forward: one generation never waits behind the others' heads, and the weights (the largest
    matrix of a small model) are streamed once per round instead of once per generation. With
    packed weights (`sharding/_model.py`) 8 rows cost about what one does, and each row's
    result does not depend on the others, so output is the same batched or not.

    Whichever caller finds no forward running drives the next one (the worker's pattern in
    `node/_worker.py`, without the queue policy): it waits a bounded moment for the other
    generations' steps (`gather_wait`, as a node does, so generations that reach the head a few
    hundred microseconds apart share a forward instead of drifting into separate groups), runs
    them in a thread behind `limiter`, and hands out the rows.
    """

    def __init__(self, span: Span, *, limiter: trio.CapacityLimiter | None = None,
                 max_batch: int = 64, threads: int | None = None) -> None:
        self.span = span
        self.threads = threads  # cores for a forward (`sharding.use_threads`); None: as set
        self.limiter = limiter or trio.CapacityLimiter(1)
        self.users = 0  # generations using the head now (with one, nothing can join a batch)
        self.forwards = 0
        self.policy = BatchPolicy(max_batch=max_batch)
        self._queue: list[_HeadRequest] = []
        self._busy = False
        self._last_s = 0.0  # how long the last forward took
        self._arrived = trio.Event()

    async def step(self, position: int, x: torch.Tensor, *, last_only: bool) -> torch.Tensor:
        """Logits (1, 1, V) for hidden states (1, 1, C); `position` and `last_only` are moot."""
        request = _HeadRequest(x)
        self._queue.append(request)
        self._arrived.set()
        self._arrived = trio.Event()
        try:
            while request.out is None and request.error is None:
                if self._busy:
                    request.wake = trio.Event()
                    await request.wake.wait()
                else:
                    await self._drive()
        finally:
            if request in self._queue:  # cancelled before its forward started
                self._queue.remove(request)
            self._kick()
        if request.out is None:
            raise request.error or RuntimeError("a head step ended unanswered")
        return request.out

    def _kick(self) -> None:
        if not self._busy and self._queue:
            self._queue[0].wake.set()

    def _run(self, xs: list[torch.Tensor]) -> torch.Tensor:
        started = time.perf_counter()
        if self.threads is not None:
            use_threads(self.threads, rows=len(xs))
        with torch.inference_mode():
            out: torch.Tensor = self.span(torch.cat(xs))  # (B, 1, V)
        self._last_s = time.perf_counter() - started
        return out

    def _wait(self) -> float:
        return gather_wait(queued_decodes=len(self._queue),
                           missing=self.users - len(self._queue), prefills=0,
                           last_decode_s=self._last_s, policy=self.policy)

    async def _drive(self) -> None:
        self._busy = True
        try:
            if self.users > 1:  # two passes: see `SpanWorker._drive`
                await trio.lowlevel.checkpoint()
                await trio.lowlevel.checkpoint()
            with trio.move_on_after(self._wait()):
                while self._wait() > 0:
                    arrived = self._arrived
                    await arrived.wait()
            batch = self._queue[: self.policy.max_batch]
            del self._queue[: len(batch)]
            try:
                out = await run_in_thread(self._run, [r.x for r in batch], limiter=self.limiter)
            except trio.Cancelled:
                self._queue[:0] = batch  # the thread never started: back where they were
                raise
            except Exception as exc:  # noqa: BLE001 - every caller of the batch re-raises it
                for r in batch:
                    r.error = exc
            else:
                self.forwards += 1
                for b, r in enumerate(batch):
                    r.out = out[b : b + 1]
            for r in batch:
                r.wake.set()
        finally:
            self._busy = False
