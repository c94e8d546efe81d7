"""`SpanWorker`: the compute side of a server — sessions, KV caches, limits, validation.

Theory of operation: a node loads one `Span` and serves sessions on any sub-range of its
stages. `open` admits a session only within the limits (sessions, KV-cache tokens, per-session
`max_length`) and refuses with a retryable `busy` otherwise, so a full node never degrades the
sessions it already holds. `step` validates everything a client sent — model, codec, shapes,
dtype, token counts, the position contract — before touching torch, and raises `RefusedError`
naming the problem; a refused step changes nothing.

Torch work runs in a worker thread (`trio.to_thread.run_sync`) behind one `CapacityLimiter` per
worker, so the event loop keeps answering heartbeats and other sessions while a block computes,
and only one forward uses the device at a time. A session's cache is only touched inside that
thread, so there is no lock on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import trio

from node._errors import RefusedError
from node._protocol import OpenSession, Step, StepOutput
from node._tensors import hidden_from_wire, hidden_to_wire, ids_from_wire
from sharding import CODECS, KVCache, ShardingError, Span


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one node admits; beyond it requests get a retryable `busy` refusal."""

    max_sessions: int = 32
    max_cache_tokens: int = 1 << 16
    max_length: int = 2048
    max_step_tokens: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_cache_tokens", "max_length", "max_step_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclass(slots=True)
class WorkerSession:
    """One client's session on this node."""

    session_id: bytes
    start: int
    end: int
    max_length: int
    codec: str
    cache: KVCache
    opened: float = field(default_factory=time.monotonic)
    steps: int = 0


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    sessions: int
    cache_tokens_reserved: int
    cache_tokens_free: int
    steps: int
    tokens: int
    compute_s: float


class SpanWorker:
    """Sessions over one loaded span, with admission limits and a compute limiter."""

    def __init__(self, span: Span, *, model_id: str, limits: ServerLimits | None = None,
                 decode_threads: int | None = None, prefill_threads: int | None = None) -> None:
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
        self._steps = 0
        self._tokens = 0
        self._compute_s = 0.0

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
                                cache)
        self.sessions[req.session_id] = session
        if self._idle.is_set():
            self._idle = trio.Event()
        return session

    def close(self, session_id: bytes) -> None:
        """Forget a session and free its cache (idempotent)."""
        self.sessions.pop(session_id, None)
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

    def _compute(self, session: WorkerSession, step: Step, x: torch.Tensor) -> StepOutput:
        """Runs in the worker thread: roll back if asked, forward, encode."""
        started = time.perf_counter()
        if step.rollback:
            session.cache.rollback(step.position)
        threads = self.prefill_threads if x.shape[1] > 1 else self.decode_threads
        if threads is not None and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        with torch.inference_mode():
            y = self.span(x, session.cache, last_only=step.last_only,
                          stages=(session.start, session.end))
        logits = session.end == self.span.config.num_stages
        out = hidden_to_wire(y, "raw" if logits else session.codec)
        elapsed = time.perf_counter() - started
        self._steps += 1
        self._tokens += x.shape[1]
        self._compute_s += elapsed
        session.steps += 1
        return StepOutput(step=step.step, position=step.position, output=out, compute_s=elapsed)

    async def step(self, session: WorkerSession, step: Step) -> StepOutput:
        """Validate a step, then run it off the event loop; `RefusedError` on bad input."""
        x = self._decode_input(session, step)
        self._check_position(session, step, x.shape[1])
        try:
            return await trio.to_thread.run_sync(self._compute, session, step, x,
                                                 limiter=self.limiter)
        except ShardingError as exc:  # e.g. non-finite output refused by the codec
            raise RefusedError("bad-request", str(exc)) from exc

    def statistics(self) -> WorkerStatistics:
        reserved = self.reserved_tokens
        return WorkerStatistics(
            sessions=len(self.sessions), cache_tokens_reserved=reserved,
            cache_tokens_free=max(0, self.limits.max_cache_tokens - reserved),
            steps=self._steps, tokens=self._tokens, compute_s=self._compute_s)
