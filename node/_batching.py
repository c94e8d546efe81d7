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

The batching window is the time the previous forward took, so under load each forward takes
everything that queued behind it ("continuous batching"). An idle worker adds one bounded wait
(`gather_wait`): when a decode step arrives while other sessions decoding here are due (their
steps usually come back by now) but not queued, it waits for them for at most one decode
forward. Without it,
the steps a previous hop pushes out one after another after its batch arrive a few hundred
microseconds apart, the first one runs alone, and the rest run in a second forward that costs
as much as the first (a packed batch of 8 costs about what one step does): the sessions split
into groups that never rejoin, and every hop runs twice the forwards. A lone session never
waits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How a worker groups steps into forwards."""

    max_batch: int = 16
    prefill_chunk: int = 128
    gather_fraction: float = 1.0  # of the last decode forward's time, at most...
    max_gather_s: float = 0.020  # ...and never longer than this

    def __post_init__(self) -> None:
        if self.max_batch <= 0 or self.prefill_chunk <= 0:
            raise ValueError("max_batch and prefill_chunk must be positive")
        if not (0 <= self.gather_fraction <= 1 and 0 <= self.max_gather_s <= 1):
            raise ValueError("gather_fraction must be in [0, 1] and max_gather_s in [0, 1] s")


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


def gather_wait(*, queued_decodes: int, missing: int, prefills: int, last_decode_s: float,
                policy: BatchPolicy) -> float:
    """Seconds an idle worker waits for `missing` decoding sessions before its next forward.

    Only decode batches wait (a prefill chunk runs at once), only when some session that is
    decoding here has no step queued yet, and never when the batch is already full.
    """
    if queued_decodes <= 0 or missing <= 0 or prefills > 0 or last_decode_s <= 0 \
            or queued_decodes >= policy.max_batch:
        return 0.0
    return min(policy.max_gather_s, policy.gather_fraction * last_decode_s)
