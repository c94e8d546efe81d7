"""Which queued steps a worker runs in its next forward: a pure decision over a snapshot.

Theory of operation: a `SpanWorker` runs one forward at a time. Steps that arrive while one runs
wait in a queue, and when the device frees up the worker asks `next_work` what to run next:

- **decode steps** (one new token each) of different sessions run together, as one
  `Span.forward_batch` over up to `max_batch` of them, oldest first. A batch needs one stage
  range, so it takes the oldest decode step's stages and the queued decode steps that share
  them; the others wait for a later batch.
- **prefill steps** (several tokens) run alone, `prefill_chunk` tokens per forward, oldest step
  first, so a 2048-token prompt is 16 forwards rather than one long one.
- when both kinds wait, they take turns: after a decode batch comes one prefill chunk, after a
  chunk comes a decode batch. A long prefill then delays each decode by at most one chunk, and
  a stream of decodes cannot starve a prefill either.

There is no timer: the batching window is exactly the time the previous forward took, so a lone
session never waits, and under load each forward takes everything that queued behind it
("continuous batching").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How a worker groups steps into forwards."""

    max_batch: int = 16
    prefill_chunk: int = 128

    def __post_init__(self) -> None:
        if self.max_batch <= 0 or self.prefill_chunk <= 0:
            raise ValueError("max_batch and prefill_chunk must be positive")


@dataclass(frozen=True, slots=True)
class Queued:
    """A queued step as the planner sees it; `ticket` orders arrivals (lower is older)."""

    ticket: int
    stages: tuple[int, int]
    decode: bool  # a one-token step, batchable with other sessions' one-token steps
    tokens_left: int


@dataclass(frozen=True, slots=True)
class Work:
    """One forward: the steps it advances and how many tokens each gets."""

    tickets: tuple[int, ...]
    decode: bool
    tokens: int


def next_work(queue: Sequence[Queued], *, after_decode: bool, policy: BatchPolicy) -> Work | None:
    """The next forward to run over `queue`, or None when nothing waits.

    `after_decode` says whether the previous forward was a decode batch (prefill chunks and
    decode batches alternate while both wait).
    """
    ordered = sorted(queue, key=lambda q: q.ticket)
    decodes = [q for q in ordered if q.decode]
    prefills = [q for q in ordered if not q.decode]
    if decodes and not (prefills and after_decode):
        stages = decodes[0].stages
        batch = [q.ticket for q in decodes if q.stages == stages][: policy.max_batch]
        return Work(tickets=tuple(batch), decode=True, tokens=1)
    if prefills:
        first = prefills[0]
        return Work(tickets=(first.ticket,), decode=False,
                    tokens=min(first.tokens_left, policy.prefill_chunk))
    return None
