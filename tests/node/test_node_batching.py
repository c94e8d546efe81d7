"""Batching in the worker: concurrent sessions share forwards, prefills run in chunks."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
import trio.testing

from node._batching import BatchPolicy, Queued, Work, gather_wait, next_work
from node._errors import RefusedError
from node._protocol import OpenSession, Step, StepOutput
from node._tensors import hidden_to_wire, ids_to_wire
from node._worker import SpanWorker, WorkerSession
from p2p import Tensor
from sharding import EMBEDDED_MODEL, Checkpoint, Span, SpanError
from sharding._threads import PARALLEL_MIN_MACS, STREAMED_HEAD_MACS


def _worker(folder: Path, start: int, end: int | None = None,
            policy: BatchPolicy | None = None, **kw: Any) -> SpanWorker:
    ckpt = Checkpoint.open(folder)
    span = Span.load(ckpt, start, ckpt.config.num_stages if end is None else end)
    return SpanWorker(span, model_id=ckpt.model_id, batching=policy, **kw)


def _open(w: SpanWorker, sid: int, *, max_length: int = 256, codec: str = "raw",
          successor: tuple[str, ...] = ()) -> WorkerSession:
    return w.open(OpenSession(session_id=sid.to_bytes(16, "big"), model_id=w.model_id,
                              start=w.span.start, end=w.span.end, max_length=max_length,
                              codec=codec, successor=successor,
                              successor_session=bytes(16) if successor else b""))


def _tensor(out: StepOutput) -> torch.Tensor:
    t = out.output
    return torch.frombuffer(bytearray(t.payload), dtype=torch.float32).reshape(t.shape)


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _ids_step(step: int, position: int, ids: torch.Tensor, **kw: Any) -> Step:
    return Step(step=step, position=position, input=ids_to_wire(ids), **kw)


class Gate:
    """Wraps a span method so that, once armed, its next call blocks until `release`."""

    def __init__(self, span: Span, name: str) -> None:
        self.inner: Callable[..., torch.Tensor] = getattr(span, name)
        self.armed = False
        self.entered = threading.Event()
        self.opened = threading.Event()
        setattr(span, name, self)

    def __call__(self, *args: Any, **kw: Any) -> torch.Tensor:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.opened.wait(timeout=30)
        return self.inner(*args, **kw)

    async def wait_entered(self) -> None:
        assert await trio.to_thread.run_sync(self.entered.wait, 10)

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Arm the gate; whatever happens, open it on the way out (never strand a thread)."""
        self.armed = True
        try:
            yield
        finally:
            self.opened.set()


# -- the planner alone --------------------------------------------------------------------


def test_next_work_batches_decodes_alternates_with_chunks_and_caps() -> None:
    policy = BatchPolicy(max_batch=3, prefill_chunk=100)

    def q(ticket: int, tokens: int, stages: tuple[int, int] = (0, 6),
          left: int | None = None) -> Queued:
        return Queued(ticket=ticket, stages=stages, decode=tokens == 1,
                      tokens_left=tokens if left is None else left)

    assert next_work([], after_decode=False, policy=policy) is None
    decodes = [q(5, 1), q(1, 1), q(2, 1, stages=(1, 6)), q(3, 1), q(4, 1), q(6, 1)]
    # Oldest first, the oldest's stages only, at most max_batch.
    assert next_work(decodes, after_decode=True, policy=policy) == \
        Work(tickets=(1, 3, 4), decode=True, tokens=1)
    mixed = [q(7, 250, left=120), q(8, 1), q(2, 40)]
    assert next_work(mixed, after_decode=False, policy=policy) == \
        Work(tickets=(8,), decode=True, tokens=1)
    # After a decode batch the oldest prefill gets one chunk, however old the decodes are.
    assert next_work(mixed, after_decode=True, policy=policy) == \
        Work(tickets=(2,), decode=False, tokens=40)
    assert next_work([q(7, 250, left=120)], after_decode=True, policy=policy) == \
        Work(tickets=(7,), decode=False, tokens=100)
    with pytest.raises(ValueError):
        BatchPolicy(max_batch=0)


# -- batched decode ----------------------------------------------------------------------


async def _generate(w: SpanWorker, s: WorkerSession, prompt: torch.Tensor,
                    n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy: a prefill, then `n` decode steps; the tokens and every step's logits."""
    out = await w.step(s, _ids_step(0, 0, prompt, last_only=True))
    logits = [_tensor(out)[0, -1]]
    tokens = [int(logits[-1].argmax())]
    position = prompt.shape[1]
    for i in range(n):
        out = await w.step(s, _ids_step(i + 1, position, torch.tensor([[tokens[-1]]])))
        position += 1
        logits.append(_tensor(out)[0, -1])
        tokens.append(int(logits[-1].argmax()))
    return tokens, logits


async def test_concurrent_sessions_generate_what_each_generates_alone() -> None:
    """8 sessions at different positions, 32 greedy decode steps each, on the embedded model.

    Batched matmuls may differ from one-row ones in the last bits (the kernel blocks a
    different M), so logits are compared with a tight tolerance and tokens exactly.
    """
    prompts = [_ids(n, seed=n) for n in (3, 17, 5, 29, 8, 11, 2, 23)]
    alone = _worker(EMBEDDED_MODEL, 0)
    expected = [await _generate(alone, _open(alone, i), p, 32) for i, p in enumerate(prompts)]
    assert alone.statistics().decode_batches == alone.statistics().decode_steps == 8 * 32

    w = _worker(EMBEDDED_MODEL, 0)
    got: dict[int, tuple[list[int], list[torch.Tensor]]] = {}

    async def one(i: int) -> None:
        got[i] = await _generate(w, _open(w, i), prompts[i], 32)

    async with trio.open_nursery() as nursery:
        for i in range(len(prompts)):
            nursery.start_soon(one, i)
    for i, (tokens, logits) in enumerate(expected):
        assert got[i][0] == tokens, i
        for a, b in zip(got[i][1], logits, strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-4)
    stats = w.statistics()
    assert stats.decode_steps == 8 * 32 and stats.steps == 8 * 33
    # The batch really forms: after the prefills, every forward takes all 8 sessions.
    assert stats.decode_batches <= 32 + 8
    assert stats.forwards == stats.decode_batches + stats.prefill_chunks
    assert stats.queued == 0 and all(not s.stepping for s in w.sessions.values())


async def test_a_lone_step_runs_at_once(tiny_model: Path,
                                        autojump_clock: trio.testing.MockClock) -> None:
    """Nothing waits on a timer: under an autojumping mock clock, time does not move."""
    w = _worker(tiny_model, 0)
    s = _open(w, 1)
    t0 = trio.current_time()
    await w.step(s, _ids_step(0, 0, _ids(5, seed=1)))
    for i in range(3):
        await w.step(s, _ids_step(i + 1, 5 + i, torch.tensor([[7]])))
    assert trio.current_time() == t0
    stats = w.statistics()
    assert (stats.forwards, stats.decode_batches, stats.decode_steps) == (4, 3, 3)


async def test_the_batch_is_capped(tiny_model: Path) -> None:
    w = _worker(tiny_model, 0, policy=BatchPolicy(max_batch=3))
    sessions = [_open(w, i) for i in range(7)]
    for s in sessions:
        await w.step(s, _ids_step(0, 0, _ids(4, seed=2)))
    async with trio.open_nursery() as nursery:
        for s in sessions:
            nursery.start_soon(w.step, s, _ids_step(1, 4, torch.tensor([[9]])))
    stats = w.statistics()
    assert (stats.decode_batches, stats.decode_steps) == (3, 7)  # 3 + 3 + 1
    assert all(s.cache.length == 5 for s in sessions)


def test_gather_wait_is_for_missing_decoders_only_and_bounded() -> None:
    p = BatchPolicy(max_batch=4, gather_fraction=0.5, max_gather_s=0.008)
    kw: dict[str, Any] = {"queued_decodes": 1, "missing": 3, "prefills": 0, "policy": p}
    assert gather_wait(last_decode_s=0.010, **kw) == pytest.approx(0.005)
    assert gather_wait(last_decode_s=0.100, **kw) == 0.008  # capped
    assert gather_wait(last_decode_s=0.0, **kw) == 0.0  # nothing measured yet
    assert gather_wait(**{**kw, "missing": 0}, last_decode_s=0.01) == 0.0
    assert gather_wait(**{**kw, "prefills": 1}, last_decode_s=0.01) == 0.0
    assert gather_wait(**{**kw, "queued_decodes": 4}, last_decode_s=0.01) == 0.0  # full
    with pytest.raises(ValueError):
        BatchPolicy(gather_fraction=1.5)


async def _decoding_pair(tiny_model: Path) -> tuple[SpanWorker, WorkerSession, WorkerSession]:
    """A worker with two sessions that have run two decode steps together, 1 ms apart (the
    time their steps spend elsewhere in a pipeline)."""
    w = _worker(tiny_model, 0)
    a, b = _open(w, 1), _open(w, 2)
    for s in (a, b):
        await w.step(s, _ids_step(0, 0, _ids(4, seed=3)))
    for position in (4, 5):
        async with trio.open_nursery() as nursery:
            for s in (a, b):
                nursery.start_soon(w.step, s, _ids_step(position - 3, position,
                                                        torch.tensor([[9]])))
        await trio.sleep(0.001)
    assert w.statistics().decode_batches == 2
    assert a.expected(trio.current_time()) and b.expected(trio.current_time())
    return w, a, b


async def test_an_idle_worker_waits_briefly_for_a_session_on_its_way(
        tiny_model: Path, autojump_clock: trio.testing.MockClock) -> None:
    """The second step comes a moment after the first: they still share one forward."""
    w, a, b = await _decoding_pair(tiny_model)

    async def late() -> None:
        await trio.sleep(0.0005)
        await w.step(b, _ids_step(3, 6, torch.tensor([[4]])))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(w.step, a, _ids_step(3, 6, torch.tensor([[3]])))
        nursery.start_soon(late)
    stats = w.statistics()
    assert (stats.decode_batches, stats.decode_steps) == (3, 6)


async def test_the_wait_for_a_session_that_does_not_come_is_bounded(
        tiny_model: Path, autojump_clock: trio.testing.MockClock) -> None:
    w, a, _ = await _decoding_pair(tiny_model)
    t0 = trio.current_time()
    await w.step(a, _ids_step(3, 6, torch.tensor([[3]])))
    assert 0 < trio.current_time() - t0 <= w.batching.max_gather_s
    assert w.statistics().decode_batches == 3


async def test_a_session_left_idle_is_not_waited_for(
        tiny_model: Path, autojump_clock: trio.testing.MockClock) -> None:
    w, a, b = await _decoding_pair(tiny_model)
    await trio.sleep(1.0)  # b's client went quiet: far longer than its usual time away
    assert not b.expected(trio.current_time())
    t0 = trio.current_time()
    await w.step(a, _ids_step(3, 6, torch.tensor([[3]])))
    assert trio.current_time() == t0


# -- prefill in chunks ---------------------------------------------------------------------


@pytest.fixture
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("restore_threads")
async def test_a_long_prefill_lets_decodes_through_between_chunks(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The tiny model's chunks are far below the size where a second thread pays off
    # (`sharding.use_threads`); with that bound at 0 they must get the prefill threads.
    monkeypatch.setattr("sharding._threads.PARALLEL_MIN_MACS", 0)
    w = _worker(tiny_model, 0, policy=BatchPolicy(prefill_chunk=32), decode_threads=1,
                prefill_threads=2)
    events: list[tuple[str, int]] = []
    forward, forward_batch = w.span.forward, w.span.forward_batch

    def chunk(x: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        events.append(("chunk", torch.get_num_threads()))
        return forward(x, *args, **kw)

    def batch(x: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        events.append(("decode", torch.get_num_threads()))
        return forward_batch(x, *args, **kw)

    monkeypatch.setattr(w.span, "forward", chunk)
    monkeypatch.setattr(w.span, "forward_batch", batch)
    long, short = _open(w, 1), _open(w, 2)
    await w.step(short, _ids_step(0, 0, _ids(3, seed=3)))
    events.clear()
    prompt = _ids(200, seed=4)  # 7 chunks: 6 of 32 and one of 8
    result: list[StepOutput] = []

    async def prefill() -> None:
        result.append(await w.step(long, _ids_step(0, 0, prompt, last_only=True)))
        events.append(("prefill answered", 0))

    async def decodes() -> None:
        for i in range(10):
            await w.step(short, _ids_step(i + 1, 3 + i, torch.tensor([[i]])))
            events.append(("decode answered", 0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(prefill)
        nursery.start_soon(decodes)
    kinds = [kind for kind, _ in events]
    end = kinds.index("prefill answered")
    forwards = [k for k in kinds[:end] if k in ("chunk", "decode")]
    assert forwards.count("chunk") == 7
    first, last = forwards.index("chunk"), len(forwards) - 1 - forwards[::-1].index("chunk")
    between = forwards[first : last + 1]
    assert between == ["chunk", "decode"] * 6 + ["chunk"]  # strict turns while both wait
    assert kinds[:end].count("decode answered") >= 6
    assert {n for kind, n in events if kind == "chunk"} == {2}
    assert {n for kind, n in events if kind == "decode"} == {1}

    # One answer for the whole step, as if it had run in one piece.
    whole = _worker(tiny_model, 0)
    ref = await whole.step(_open(whole, 1), _ids_step(0, 0, prompt, last_only=True))
    assert result[0].output.shape == ref.output.shape == (1, 1, w.span.config.vocab_size)
    assert torch.allclose(_tensor(result[0]), _tensor(ref), rtol=0, atol=1e-4)
    assert long.cache.length == 200 and w.statistics().tokens == 3 + 200 + 10


async def test_a_small_prefill_runs_on_one_thread(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Waking a second OpenMP thread for each operation of a small cold forward costs more
    # than it gives (measurements in sharding/_threads.py).
    w = _worker(tiny_model, 0, decode_threads=1, prefill_threads=2)
    seen: list[int] = []
    forward = w.span.forward

    def record(x: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return forward(x, *args, **kw)

    monkeypatch.setattr(w.span, "forward", record)
    await w.step(_open(w, 1), _ids_step(0, 0, _ids(24, seed=5), last_only=True))
    block, head = w.span.row_macs()
    assert 24 * block < PARALLEL_MIN_MACS and head <= STREAMED_HEAD_MACS and seen == [1]


@pytest.mark.parametrize(("end", "last_only", "successor"),
                         [(3, True, ("/ip4/127.0.0.1/tcp/1",)), (3, False, ()), (6, False, ())])
async def test_chunked_prefill_answers_every_position(
    tiny_model: Path, end: int, last_only: bool, successor: tuple[str, ...]
) -> None:
    """A hop that pushes on (whatever `last_only` says) and full logits keep every chunk's
    rows."""
    w = _worker(tiny_model, 0, end, policy=BatchPolicy(prefill_chunk=16))
    whole = _worker(tiny_model, 0, end)
    prompt = _ids(70, seed=5)
    step = _ids_step(0, 0, prompt, last_only=last_only)
    got = await w.step(_open(w, 1, successor=successor), step)
    ref = await whole.step(_open(whole, 1, successor=successor), step)
    assert got.output.shape == ref.output.shape and got.output.shape[1] == 70
    assert torch.allclose(_tensor(got), _tensor(ref), rtol=0, atol=1e-4)
    assert w.statistics().prefill_chunks == 5


@pytest.mark.parametrize(("end", "chunk"), [(3, 16), (3, 128), (6, 16)])
async def test_last_only_without_a_successor_answers_the_last_row(
    tiny_model: Path, end: int, chunk: int
) -> None:
    """The route's last hop (no successor) answers a prompt with its last row alone: all the
    client reads of it. The row is the one the whole answer ends with."""
    w = _worker(tiny_model, 0, end, policy=BatchPolicy(prefill_chunk=chunk))
    whole = _worker(tiny_model, 0, end)
    prompt = _ids(70, seed=5)
    session, reference = _open(w, 1), _open(whole, 1)
    got = await w.step(session, _ids_step(0, 0, prompt, last_only=True))
    ref = await whole.step(reference, _ids_step(0, 0, prompt, last_only=False))
    assert got.output.shape[1] == 1 and ref.output.shape[1] == 70
    assert torch.allclose(_tensor(got)[0, 0], _tensor(ref)[0, -1], rtol=0, atol=1e-4)
    # The cache holds every position all the same: the next step continues from it.
    nxt = _ids(1, seed=6)
    got = await w.step(session, _ids_step(1, 70, nxt, last_only=True))
    ref = await whole.step(reference, _ids_step(1, 70, nxt, last_only=False))
    assert torch.allclose(_tensor(got)[0, 0], _tensor(ref)[0, -1], rtol=0, atol=1e-4)


# -- failures, closes and cancellations ----------------------------------------------------


async def test_a_bad_step_in_a_batch_is_refused_alone(tiny_model: Path) -> None:
    """A middle span whose output for one session is too large for int8-block."""
    w = _worker(tiny_model, 2, 4)
    alone = _worker(tiny_model, 2, 4)
    C = w.span.config.hidden_size
    g = torch.Generator().manual_seed(6)
    prefix = [torch.randn(1, 3, C, generator=g) for _ in range(4)]
    nxt = [torch.randn(1, 1, C, generator=g) for _ in range(4)]
    huge = Tensor(dtype="float32", shape=(1, 1, C), codec="raw",
                  payload=(torch.ones(1, 1, C) * 1e8).numpy().tobytes())
    sessions = [_open(w, i, codec="int8-block") for i in range(4)]
    expected = []
    for i, s in enumerate(sessions):
        await w.step(s, Step(step=0, position=0, input=hidden_to_wire(prefix[i], "raw")))
        ref = _open(alone, i, codec="int8-block")
        await alone.step(ref, Step(step=0, position=0, input=hidden_to_wire(prefix[i], "raw")))
        expected.append(await alone.step(ref, Step(step=1, position=3,
                                                   input=hidden_to_wire(nxt[i], "raw"))))
    results: dict[int, StepOutput | RefusedError] = {}

    async def one(i: int) -> None:
        tensor = huge if i == 2 else hidden_to_wire(nxt[i], "raw")
        try:
            results[i] = await w.step(sessions[i], Step(step=1, position=3, input=tensor))
        except RefusedError as exc:
            results[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(one, i)
    stats = w.statistics()
    assert (stats.decode_batches, stats.decode_steps) == (1, 4)  # they did share a forward
    bad = results.pop(2)
    assert isinstance(bad, RefusedError) and "too large" in bad.detail
    assert sessions[2].cache.length == 3  # the refused step was undone
    for i, out in results.items():
        assert isinstance(out, StepOutput) and out.output.codec == "int8-block"
        assert torch.allclose(_tensor_int8(out), _tensor_int8(expected[i]), atol=1e-2)
        assert sessions[i].cache.length == 4
    ok = await w.step(sessions[2], Step(step=1, position=3, input=hidden_to_wire(nxt[2], "raw")))
    assert ok.position == 3 and sessions[2].cache.length == 4


def _tensor_int8(out: StepOutput) -> torch.Tensor:
    from sharding import Encoded, decode

    t = out.output
    return decode(Encoded(codec=t.codec, dtype=t.dtype, shape=t.shape, payload=t.payload))


async def test_a_batch_the_span_refuses_is_rerun_one_step_at_a_time(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = _worker(tiny_model, 0)
    sessions = [_open(w, i) for i in range(3)]
    for s in sessions:
        await w.step(s, _ids_step(0, 0, _ids(4, seed=7)))
    poisoned = sessions[1].cache
    forward_batch = w.span.forward_batch

    def refuse(x: torch.Tensor, caches: list[Any], **kw: Any) -> torch.Tensor:
        if any(c is poisoned for c in caches):
            raise SpanError("this cache is poisoned")
        return forward_batch(x, caches, **kw)

    monkeypatch.setattr(w.span, "forward_batch", refuse)
    monkeypatch.setattr(w.span, "forward", lambda x, cache, **kw: refuse(x, [cache], **kw))
    outcomes: dict[int, str] = {}

    async def one(i: int) -> None:
        try:
            await w.step(sessions[i], _ids_step(1, 4, torch.tensor([[3]])))
            outcomes[i] = "ok"
        except RefusedError as exc:
            outcomes[i] = exc.detail

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(one, i)
    assert outcomes == {0: "ok", 1: "this cache is poisoned", 2: "ok"}
    assert [s.cache.length for s in sessions] == [5, 4, 5]


async def test_closing_a_session_refuses_its_queued_step(tiny_model: Path) -> None:
    w = _worker(tiny_model, 0)
    a, b = _open(w, 1), _open(w, 2)
    for s in (a, b):
        await w.step(s, _ids_step(0, 0, _ids(4, seed=8)))
    gate = Gate(w.span, "forward_batch")
    refused: list[RefusedError] = []

    async def b_step() -> None:
        with pytest.raises(RefusedError, match="no-session") as info:
            await w.step(b, _ids_step(1, 4, torch.tensor([[1]])))
        refused.append(info.value)

    with gate.holding():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(w.step, a, _ids_step(1, 4, torch.tensor([[1]])))
            await gate.wait_entered()  # a's forward holds the device
            nursery.start_soon(b_step)
            await trio.testing.wait_all_tasks_blocked()
            assert w.statistics().queued == 1
            w.close(b.session_id)
            await trio.testing.wait_all_tasks_blocked()
            assert refused and w.statistics().queued == 0
            gate.opened.set()
    assert a.cache.length == 5 and b.cache.length == 4
    await w.step(a, _ids_step(2, 5, torch.tensor([[2]])))  # the worker carries on
    with pytest.raises(RefusedError, match="no-session"):
        await w.step(b, _ids_step(1, 4, torch.tensor([[1]])))


async def test_closing_a_session_between_its_prefill_chunks(tiny_model: Path) -> None:
    w = _worker(tiny_model, 0, policy=BatchPolicy(prefill_chunk=8))
    s = _open(w, 1)
    gate = Gate(w.span, "forward")
    refused: list[RefusedError] = []

    async def prefill() -> None:
        with pytest.raises(RefusedError, match="no-session") as info:
            await w.step(s, _ids_step(0, 0, _ids(30, seed=9)))
        refused.append(info.value)

    with gate.holding():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prefill)
            await gate.wait_entered()  # inside the first chunk
            w.close(s.session_id)
            gate.opened.set()
    assert refused and not s.stepping
    assert w.statistics().queued == 0 and w.statistics().prefill_chunks == 1


async def test_a_cancelled_step_changes_nothing(tiny_model: Path) -> None:
    """A queued step is dropped; a chunked prefill finishes its running chunk, then undoes it."""
    w = _worker(tiny_model, 0, policy=BatchPolicy(prefill_chunk=8))
    a, b = _open(w, 1), _open(w, 2)
    await w.step(a, _ids_step(0, 0, _ids(4, seed=10)))
    gate = Gate(w.span, "forward")
    queued, running = trio.CancelScope(), trio.CancelScope()

    async def in_scope(scope: trio.CancelScope, s: WorkerSession, step: Step) -> None:
        with scope:
            await w.step(s, step)

    with gate.holding():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_scope, running, b, _ids_step(0, 0, _ids(30, seed=11)))
            await gate.wait_entered()  # b's first chunk is computing
            nursery.start_soon(in_scope, queued, a, _ids_step(1, 4, torch.tensor([[1]])))
            await trio.testing.wait_all_tasks_blocked()
            assert w.statistics().queued == 1 and a.stepping
            queued.cancel()
            running.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert w.statistics().queued == 0 and not a.stepping and b.stepping
            gate.opened.set()
    assert (a.cache.length, b.cache.length, b.stepping) == (4, 0, False)
    assert w.statistics().prefill_chunks == 2  # a's prompt, and b's one chunk
    await w.step(b, _ids_step(0, 0, _ids(30, seed=11)))  # both carry on
    await w.step(a, _ids_step(1, 4, torch.tensor([[1]])))
    assert (a.cache.length, b.cache.length) == (5, 30)


async def test_one_step_at_a_time_per_session(tiny_model: Path) -> None:
    w = _worker(tiny_model, 0)
    s = _open(w, 1)
    gate = Gate(w.span, "forward")
    with gate.holding():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(w.step, s, _ids_step(0, 0, _ids(4, seed=12)))
            await gate.wait_entered()
            with pytest.raises(RefusedError, match="still running"):
                await w.step(s, _ids_step(1, 4, torch.tensor([[1]])))
            gate.opened.set()
    assert s.cache.length == 4 and w.statistics().steps == 1


async def test_a_cancelled_step_already_in_a_batch_finishes_its_forward(tiny_model: Path) -> None:
    """Whichever of the two drives the batch, neither returns before the forward ends."""
    w = _worker(tiny_model, 0)
    p, q = _open(w, 1), _open(w, 2)
    for s in (p, q):
        await w.step(s, _ids_step(0, 0, _ids(4, seed=13)))
    gate = Gate(w.span, "forward_batch")
    scopes = [trio.CancelScope(), trio.CancelScope()]
    finished: list[int] = []

    async def decode(s: WorkerSession, scope: trio.CancelScope) -> None:
        with scope:
            await w.step(s, _ids_step(1, 4, torch.tensor([[5]])))
        finished.append(s.cache.length)

    with gate.holding():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(decode, p, scopes[0])
            nursery.start_soon(decode, q, scopes[1])
            await gate.wait_entered()
            for scope in scopes:
                scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert not finished and p.stepping and q.stepping  # both wait for the forward
            gate.opened.set()
    assert finished == [5, 5] and w.statistics().decode_steps == 2
    for s in (p, q):  # the forward counted; the sessions carry on from there
        await w.step(s, _ids_step(2, 5, torch.tensor([[6]])))
