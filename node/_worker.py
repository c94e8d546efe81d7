"""`SpanWorker`: the compute side of a server — sessions, KV caches, limits, validation, batching.

Theory of operation: a node loads one `Span` and serves sessions on any sub-range of its
stages. `open` admits a session only within the limits (sessions, KV-cache tokens, per-session
`max_length`) and refuses with a retryable `busy` otherwise, so a full node never degrades the
sessions it already holds. `step` validates everything a client sent — model, codec, shapes,
dtype, token counts, the position contract — before touching torch, and raises `RefusedError`
naming the problem; a refused step changes nothing.

Torch work runs in a worker thread (`node/_offload.py`: `to_thread`'s rules, a cheaper trip)
behind one `CapacityLimiter` per worker, so the event loop keeps answering heartbeats and other
sessions while a block computes, and only one forward uses the device at a time.

Batching: a validated step becomes a job in a queue. Whichever waiting step finds no forward
running "drives": it lets the steps that arrived at the same moment join (two passes through the
scheduler, no timer), asks `next_work` (`node/_batching.py`) what to run — up to `max_batch`
sessions' decode steps as one `Span.forward_batch`, or one chunk of a prefill — runs it in the
thread, and hands every job its result through the job's `trio.Event`. Steps that arrive while
a forward runs wait for the next one, so the batching window is the previous forward's length:
a lone session never waits, and a busy node batches everything that queued. A job not finished
by that forward (a prefill with chunks left, or a step left out of a full batch) stays queued,
and when the driver's own step is done it wakes the oldest waiting job to drive next. There is
no background task: every forward is driven by a caller of `step`.

Each session has at most one step queued or running, so a session's cache is only touched by
the forward that runs its step (in the thread), or on the event loop while none does. A step
that fails (a non-finite output refused by the codec, an error in a chunk) leaves its session's
cache at the step's position and fails alone: a batch that raises is rerun one step at a time.
Closing a session answers its queued step with a `no-session` refusal; a cancelled caller's
queued step is dropped, and one already computing finishes its forward first (threads cannot be
interrupted).
"""

from __future__ import annotations

import bisect
import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

import torch
import trio

from node._batching import BatchPolicy, Queued, Work, gather_wait, next_work
from node._errors import RefusedError
from node._offload import run_in_thread
from node._protocol import OpenSession, Step, StepOutput
from node._tensors import hidden_from_wire, hidden_to_wire, ids_from_wire
from sharding import CODECS, KVCache, ShardingError, Span, use_threads


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one node admits; beyond it requests get a retryable `busy` refusal."""

    max_sessions: int = 32
    max_cache_tokens: int = 1 << 16
    max_length: int = 2048
    max_step_tokens: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_cache_tokens", "max_length", "max_step_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(slots=True)
class WorkerSession:
    """One client's session on this node."""

    session_id: bytes
    start: int
    end: int
    max_length: int
    codec: str
    cache: KVCache
    final: bool = True  # no successor: `Step.last_only` leaves one row of its output
    opened: float = field(default_factory=time.monotonic)
    steps: int = 0
    stepping: bool = False  # a step of this session is queued or running
    decoding: bool = False  # its last step here was a decode step (see `gather_wait`)
    last_done: float = 0.0  # trio time its last decode step here finished
    away_s: float = 0.0  # how long its steps stay away between decodes here (moving average)

    def expected(self, now: float) -> bool:
        """Whether its next decode step is due here: it is decoding, and it has been away no
        longer than twice its usual time away (a session left idle is not waited for)."""
        return self.decoding and self.away_s > 0 and now - self.last_done <= 2 * self.away_s


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    sessions: int
    cache_tokens_reserved: int
    cache_tokens_free: int
    steps: int
    tokens: int
    compute_s: float
    forwards: int = 0  # span forwards run: a decode batch or a prefill chunk is one
    decode_batches: int = 0
    decode_steps: int = 0  # decode steps run in those batches (mean batch = steps / batches)
    prefill_chunks: int = 0
    queued: int = 0  # steps waiting for a forward right now


class _State(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


@dataclass(eq=False, slots=True)
class _Job:
    """One validated step, from the queue to its answer.

    While RUNNING, only the worker thread writes its fields; otherwise only the event loop.
    """

    ticket: int
    session: WorkerSession
    step: Step
    x: torch.Tensor  # (1, T) token ids or (1, T, C) hidden states
    state: _State = _State.QUEUED
    done_tokens: int = 0  # of a chunked prefill
    parts: list[torch.Tensor] = field(default_factory=list)  # outputs of its chunks so far
    compute_s: float = 0.0
    output: StepOutput | None = None
    error: BaseException | None = None
    wake: trio.Event = field(default_factory=trio.Event)

    @property
    def tokens(self) -> int:
        return int(self.x.shape[1])

    def queued(self) -> Queued:
        s = self.session
        return Queued(ticket=self.ticket, stages=(s.start, s.end), decode=self.tokens == 1,
                      tokens_left=self.tokens - self.done_tokens)

    def finish(self, result: StepOutput | BaseException) -> None:
        if isinstance(result, StepOutput):
            self.output = result
        else:
            self.error = result
        self.state = _State.DONE
        self.wake.set()


# What the thread returns per job: its output, its error, or None (a prefill with chunks left).
_Result = StepOutput | Exception | None


class SpanWorker:
    """Sessions over one loaded span, with admission limits, a compute limiter and batching.

    `batching` sets the largest decode batch and the prefill chunk (see `BatchPolicy`).
    """

    def __init__(self, span: Span, *, model_id: str, limits: ServerLimits | None = None,
                 decode_threads: int | None = None, prefill_threads: int | None = None,
                 batching: BatchPolicy | None = None) -> None:
        self.span = span
        # Decode steps stream weights (memory-bound: one thread takes most of the bandwidth,
        # and idle spinning threads would steal cores from the other nodes of a pipeline on
        # the same machine); prefill chunks are compute-bound and use more threads.
        self.decode_threads = decode_threads
        self.prefill_threads = prefill_threads
        self.model_id = model_id
        self.limits = limits or ServerLimits()
        self.sessions: dict[bytes, WorkerSession] = {}
        self.limiter = trio.CapacityLimiter(1)
        self.accepting = True
        self._idle = trio.Event()
        self._idle.set()
        self.batching = batching or BatchPolicy()
        self._queue: list[_Job] = []  # ordered by ticket (arrival)
        self._tickets = itertools.count()
        self._busy = False  # a caller is driving a forward (planning it or waiting on it)
        self._after_decode = False  # the last forward was a decode batch
        self._went_idle = True  # the last forward left nothing queued
        self._last_decode_s = 0.0  # how long the last decode batch took
        self._arrived = trio.Event()  # set (and replaced) whenever a step is queued
        self._steps = 0
        self._tokens = 0
        self._compute_s = 0.0
        self._forwards = 0
        self._decode_batches = 0
        self._decode_steps = 0
        self._prefill_chunks = 0

    # -- admission ---------------------------------------------------------------------------

    @property
    def reserved_tokens(self) -> int:
        return sum(s.max_length for s in self.sessions.values())

    def open(self, req: OpenSession) -> WorkerSession:
        """Admit a session or raise `RefusedError`."""
        span = self.span
        if not self.accepting:
            raise RefusedError("closing", "this node is draining", retryable=True)
        if req.model_id != self.model_id:
            raise RefusedError("wrong-model", f"this node serves model {self.model_id[:16]}")
        if not (span.start <= req.start < req.end <= span.end):
            raise RefusedError("wrong-span", f"stages [{req.start}, {req.end}) are not inside "
                                             f"[{span.start}, {span.end})")
        if req.codec not in CODECS:
            raise RefusedError("bad-request", f"unknown codec {req.codec!r}")
        if req.session_id in self.sessions:
            raise RefusedError("bad-request", "session id already open")
        limit = min(self.limits.max_length, span.config.max_position_embeddings)
        if req.max_length > limit:
            raise RefusedError("bad-request", f"max_length {req.max_length} exceeds {limit}")
        if len(self.sessions) >= self.limits.max_sessions:
            raise RefusedError("busy", f"{len(self.sessions)} sessions open", retryable=True)
        if self.reserved_tokens + req.max_length > self.limits.max_cache_tokens:
            raise RefusedError("busy", "KV cache is full", retryable=True)
        cache = span.new_cache(req.max_length, stages=(req.start, req.end))
        session = WorkerSession(req.session_id, req.start, req.end, req.max_length, req.codec,
                                cache, final=not req.successor)
        self.sessions[req.session_id] = session
        if self._idle.is_set():
            self._idle = trio.Event()
        return session

    def close(self, session_id: bytes) -> None:
        """Forget a session and free its cache (idempotent); its queued step is refused."""
        session = self.sessions.pop(session_id, None)
        if session is not None:
            for job in [j for j in self._queue if j.session is session]:
                self._queue.remove(job)
                job.finish(RefusedError("no-session", "the session closed before its step ran"))
            self._kick()
        if not self.sessions:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no session is open (a draining node waits for this)."""
        await self._idle.wait()

    # -- steps -------------------------------------------------------------------------------

    def _decode_input(self, session: WorkerSession, step: Step) -> torch.Tensor:
        c = self.span.config
        t = step.input
        if len(t.shape) < 2 or not 1 <= t.shape[1] <= self.limits.max_step_tokens:
            raise RefusedError("bad-request", f"a step carries (1, T, ...) with T in "
                                              f"1..{self.limits.max_step_tokens}")
        try:
            if session.start == 0:
                x = ids_from_wire(t, vocab_size=c.vocab_size)
            else:
                if len(t.shape) != 3 or t.shape[0] != 1 or t.shape[2] != c.hidden_size:
                    raise RefusedError("bad-request", f"hidden states must be (1, T, "
                                                      f"{c.hidden_size}), got {list(t.shape)}")
                if t.codec not in (session.codec, "raw"):
                    raise RefusedError("bad-request", f"codec {t.codec} is not the session's")
                x = hidden_from_wire(t, max_elements=self.limits.max_step_tokens * c.hidden_size)
        except ShardingError as exc:
            raise RefusedError("bad-request", str(exc)) from exc
        if x.shape[0] != 1:
            raise RefusedError("bad-request", "a step carries one sequence")
        return x

    def _check_position(self, session: WorkerSession, step: Step, tokens: int) -> None:
        cache = session.cache
        if step.position != cache.length and not (step.rollback and step.position < cache.length):
            raise RefusedError(
                "position", f"step at {step.position} but the session holds {cache.length} "
                "positions (steps are contiguous; set rollback to replay)")
        if step.position + tokens > session.max_length:
            raise RefusedError("position", f"step would reach {step.position + tokens}, past "
                                           f"max_length {session.max_length}")

    @staticmethod
    def _use_threads(threads: int | None, rows: int,
                     macs: tuple[int, int] | None = None) -> None:
        if threads is not None:
            use_threads(threads, rows=rows, macs=macs)

    def _answer(self, job: _Job, y: torch.Tensor) -> StepOutput | Exception:
        """Encode a finished step's output; a refused encoding undoes the step."""
        session = job.session
        logits = session.end == self.span.config.num_stages
        try:
            out = hidden_to_wire(y, "raw" if logits else session.codec)
        except ShardingError as exc:  # e.g. non-finite output refused by the codec
            session.cache.rollback(job.step.position)
            return exc
        self._steps += 1
        self._tokens += job.tokens
        session.steps += 1
        return StepOutput(step=job.step.step, position=job.step.position, output=out,
                          compute_s=job.compute_s)

    def _forward_chunk(self, job: _Job, tokens: int) -> _Result:
        """Runs in the worker thread: the next `tokens` of one step, alone."""
        started = time.perf_counter()
        session, step = job.session, job.step
        if job.tokens > 1:  # a small prefill runs on one thread (`sharding.use_threads`)
            self._use_threads(self.prefill_threads, tokens,
                              self.span.row_macs((session.start, session.end)))
        else:
            self._use_threads(self.decode_threads, tokens)
        if job.done_tokens == 0 and step.rollback:
            session.cache.rollback(step.position)
        a = job.done_tokens
        last = a + tokens == job.tokens
        try:
            with torch.inference_mode():
                y = self.span(job.x[:, a : a + tokens], session.cache, last_only=step.last_only,
                              stages=(session.start, session.end))
        except ShardingError as exc:
            session.cache.rollback(step.position)  # undo the chunks already run
            return exc
        finally:
            elapsed = time.perf_counter() - started
            job.compute_s += elapsed
            self._compute_s += elapsed
            self._forwards += 1
            if job.tokens > 1:
                self._prefill_chunks += 1
        job.done_tokens += tokens
        session.decoding = job.tokens == 1
        # With `last_only` on a head or a hop with no successor, the earlier chunks give
        # nothing the client asked for, and of the last one only its last row (a head's
        # logits are that row already). Otherwise every row of every chunk is the answer.
        one_row = step.last_only and (session.final or session.end == self.span.config.num_stages)
        if one_row and last:
            job.parts.append(y[:, -1:])
        elif not one_row:
            job.parts.append(y)
        if not last:
            return None
        y = job.parts[0] if len(job.parts) == 1 else torch.cat(job.parts, dim=1)
        job.parts = []
        return self._answer(job, y)

    def _forward_decodes(self, jobs: list[_Job]) -> list[_Result]:
        """Runs in the worker thread: one decode step of each job's session, in one forward."""
        started = time.perf_counter()
        self._use_threads(self.decode_threads, len(jobs))
        for job in jobs:
            if job.step.rollback:
                job.session.cache.rollback(job.step.position)
        first = jobs[0].session
        y: torch.Tensor | None = None
        try:
            with torch.inference_mode():
                y = self.span.forward_batch(torch.cat([job.x for job in jobs]),
                                            [job.session.cache for job in jobs],
                                            stages=(first.start, first.end))  # (B, 1, ...)
        except ShardingError:
            pass  # rerun below, one step at a time
        finally:
            elapsed = time.perf_counter() - started
            self._compute_s += elapsed
            self._forwards += 1
        if y is None:
            # Validation should have caught whatever the span refused; whichever step it was,
            # only it fails when each runs alone.
            return [self._forward_chunk(job, 1) for job in jobs]
        self._decode_batches += 1
        self._decode_steps += len(jobs)
        self._last_decode_s = elapsed
        results: list[_Result] = []
        for b, job in enumerate(jobs):
            job.session.decoding = True
            job.compute_s = elapsed
            results.append(self._answer(job, y[b : b + 1]))
        return results

    def _compute(self, work: Work, jobs: list[_Job]) -> list[_Result]:
        """Runs in the worker thread: one forward, one result per job."""
        if work.decode:
            return self._forward_decodes(jobs)
        return [self._forward_chunk(jobs[0], work.tokens)]

    def _kick(self) -> None:
        """Wake the oldest queued step to drive the next forward, unless one is driven."""
        if not self._busy and self._queue:
            self._queue[0].wake.set()

    async def _drive(self) -> None:
        """Plan one forward over the queue, run it in the worker thread, hand out results."""
        self._busy = True
        jobs: list[_Job] = []
        try:
            # Two passes through the scheduler (no timer): the tasks runnable now — such as the
            # ones the last forward's results woke, about to send their next step — queue their
            # steps before this forward is planned. One pass is not enough: trio runs a batch of
            # runnable tasks in either order, so this task could run again before them.
            # With one session open there is nothing to gather: skip the passes.
            for _ in range(2 if len(self.sessions) > 1 else 0):
                await trio.lowlevel.checkpoint()
            if self._went_idle:
                await self._gather()
            work = next_work([job.queued() for job in self._queue],
                             after_decode=self._after_decode, policy=self.batching)
            if work is None:
                return
            by_ticket = {job.ticket: job for job in self._queue}
            jobs = [by_ticket[t] for t in work.tickets]
            for job in jobs:
                job.state = _State.RUNNING
            chosen = set(work.tickets)
            self._queue = [job for job in self._queue if job.ticket not in chosen]
            try:
                results = await run_in_thread(self._compute, work, jobs, limiter=self.limiter)
            except trio.Cancelled:
                # Only raised before the thread started (a started thread is waited for): the
                # jobs go back where they were.
                for job in jobs:
                    job.state = _State.QUEUED
                    bisect.insort(self._queue, job, key=lambda j: j.ticket)
                raise
            except Exception as exc:  # noqa: BLE001 - handed to every caller below, not swallowed
                # A bug or an environmental failure (not a refusal, which the thread returns as
                # a result). It is not swallowed: every step that shared the forward re-raises
                # it to its own caller, as an unbatched worker would have.
                results = [exc] * len(jobs)
                for job in jobs:
                    if job.done_tokens:
                        job.session.cache.rollback(job.step.position)
            self._after_decode = work.decode
            done = trio.current_time()
            for job, result in zip(jobs, results, strict=True):
                job.session.last_done = done
                if result is not None:
                    job.finish(result)
                elif self.sessions.get(job.session.session_id) is not job.session:
                    job.finish(RefusedError("no-session", "the session closed during its step"))
                else:  # a prefill with chunks left
                    job.state = _State.QUEUED
                    bisect.insort(self._queue, job, key=lambda j: j.ticket)
                    job.wake.set()
        finally:
            for job in jobs:
                if job.state is _State.RUNNING:  # only if this code has a bug; never hang on it
                    job.finish(RuntimeError("the forward of this step was lost"))
            self._busy = False
            self._went_idle = not self._queue
            self._kick()

    def _missing(self) -> int:
        """Sessions whose decode step is due here but not queued (none runs while a driver
        plans)."""
        queued = {id(job.session) for job in self._queue}
        now = trio.current_time()
        return sum(1 for s in self.sessions.values()
                   if id(s) not in queued and s.expected(now))

    async def _gather(self) -> None:
        """Wait a bounded moment for the decoding sessions whose steps are on their way."""
        def wait() -> float:
            decodes = sum(1 for job in self._queue if job.tokens == 1)
            return gather_wait(queued_decodes=decodes, missing=self._missing(),
                               prefills=len(self._queue) - decodes,
                               last_decode_s=self._last_decode_s, policy=self.batching)

        budget = wait()
        if budget <= 0:
            return
        with trio.move_on_after(budget):
            while wait() > 0:
                arrived = self._arrived
                await arrived.wait()

    async def _run(self, job: _Job) -> None:
        """Queue a job and wait for its result, driving forwards whenever none is driven."""
        session = job.session
        session.stepping = True
        if session.decoding and job.tokens == 1:
            away = trio.current_time() - session.last_done
            session.away_s = away if session.away_s <= 0 else 0.5 * (session.away_s + away)
        self._queue.append(job)  # tickets increase, so the queue stays ordered
        self._arrived.set()
        self._arrived = trio.Event()
        try:
            while job.state is not _State.DONE:
                if self._busy:
                    job.wake = trio.Event()
                    await job.wake.wait()
                else:
                    await self._drive()
        finally:
            if job.state is not _State.DONE:  # the caller was cancelled
                with trio.CancelScope(shield=True):
                    while job.state is _State.RUNNING:  # a started forward cannot be stopped
                        job.wake = trio.Event()
                        await job.wake.wait()
                if job.state is _State.QUEUED:
                    self._queue.remove(job)
                    if job.done_tokens:  # a chunked prefill stopped half-way
                        job.session.cache.rollback(job.step.position)
            job.session.stepping = False
            self._kick()

    async def step(self, session: WorkerSession, step: Step) -> StepOutput:
        """Validate a step, then run it off the event loop; `RefusedError` on bad input."""
        if self.sessions.get(session.session_id) is not session:
            raise RefusedError("no-session", "the session is closed")
        if session.stepping:
            raise RefusedError("bad-request", "the session's previous step is still running")
        x = self._decode_input(session, step)
        self._check_position(session, step, x.shape[1])
        job = _Job(next(self._tickets), session, step, x)
        await self._run(job)
        if job.output is not None:
            return job.output
        if isinstance(job.error, ShardingError):  # e.g. non-finite output refused by the codec
            raise RefusedError("bad-request", str(job.error)) from job.error
        raise job.error if job.error is not None else RuntimeError("a step ended unanswered")

    def statistics(self) -> WorkerStatistics:
        reserved = self.reserved_tokens
        return WorkerStatistics(
            sessions=len(self.sessions), cache_tokens_reserved=reserved,
            cache_tokens_free=max(0, self.limits.max_cache_tokens - reserved),
            steps=self._steps, tokens=self._tokens, compute_s=self._compute_s,
            forwards=self._forwards, decode_batches=self._decode_batches,
            decode_steps=self._decode_steps, prefill_chunks=self._prefill_chunks,
            queued=len(self._queue))
