"""The server's compute core: admission limits, validation, the position contract."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from node._errors import RefusedError
from node._protocol import OpenSession, Step
from node._tensors import hidden_to_wire, ids_to_wire
from node._worker import ServerLimits, SpanWorker
from p2p import Tensor
from sharding import Checkpoint, Span


def _worker(folder: Path, start: int, end: int, **limits: int) -> SpanWorker:
    ckpt = Checkpoint.open(folder)
    return SpanWorker(Span.load(ckpt, start, end), model_id=ckpt.model_id,
                      limits=ServerLimits(**limits))


def _open(w: SpanWorker, sid: int, start: int, end: int, max_length: int = 32,
          codec: str = "raw") -> OpenSession:
    return OpenSession(session_id=sid.to_bytes(16, "big"), model_id=w.model_id, start=start,
                       end=end, max_length=max_length, codec=codec)


async def test_steps_through_a_chain_of_workers_match_the_whole_model(tiny_model: Path) -> None:
    ckpt = Checkpoint.open(tiny_model)
    whole = Span.load(ckpt, 0, 6)
    workers = [_worker(tiny_model, 0, 2), _worker(tiny_model, 2, 6)]
    sessions = [w.open(_open(w, 1, w.span.start, w.span.end)) for w in workers]
    ids = torch.tensor([[72, 101, 108, 108, 111]])
    h = await workers[0].step(sessions[0], Step(step=0, position=0, input=ids_to_wire(ids)))
    out = await workers[1].step(sessions[1], Step(step=0, position=0, input=h.output))
    logits = torch.frombuffer(bytearray(out.output.payload), dtype=torch.float32)
    with torch.no_grad():
        expected = whole(ids)
    assert (logits.reshape(expected.shape) - expected).abs().max().item() <= 1e-5
    assert workers[1].statistics().tokens == 5


async def test_position_contract_and_rollback(tiny_model: Path) -> None:
    w = _worker(tiny_model, 0, 3)
    s = w.open(_open(w, 1, 0, 3, max_length=8))
    one = ids_to_wire(torch.tensor([[5]]))
    first = await w.step(s, Step(step=0, position=0, input=ids_to_wire(torch.tensor([[1, 2, 3]]))))
    with pytest.raises(RefusedError, match="position: step at 5 but the session holds 3"):
        await w.step(s, Step(step=1, position=5, input=one))
    with pytest.raises(RefusedError, match="position: step at 1"):
        await w.step(s, Step(step=1, position=1, input=one))  # going back needs rollback=True
    again = await w.step(s, Step(step=1, position=0, rollback=True,
                                 input=ids_to_wire(torch.tensor([[1, 2, 3]]))))
    assert again.output == first.output
    with pytest.raises(RefusedError, match="past max_length 8"):
        await w.step(s, Step(step=2, position=3, input=ids_to_wire(torch.ones(1, 6,
                                                                                dtype=torch.long))))
    assert s.cache.length == 3  # refused steps changed nothing


async def test_admission_limits_are_retryable_refusals(tiny_model: Path) -> None:
    w = _worker(tiny_model, 1, 4, max_sessions=2, max_cache_tokens=100, max_length=64)
    w.open(_open(w, 1, 1, 4, max_length=40))
    with pytest.raises(RefusedError, match="KV cache is full") as full:
        w.open(_open(w, 2, 1, 4, max_length=64))
    assert full.value.retryable
    w.open(_open(w, 3, 2, 3, max_length=40))
    with pytest.raises(RefusedError, match="busy: 2 sessions open") as busy:
        w.open(_open(w, 4, 1, 4, max_length=4))
    assert busy.value.retryable
    w.close((1).to_bytes(16, "big"))
    w.open(_open(w, 4, 1, 4, max_length=4))  # room again once a session closes
    assert w.statistics().sessions == 2


def test_sessions_that_do_not_fit_this_node_are_refused(tiny_model: Path) -> None:
    w = _worker(tiny_model, 1, 4, max_length=64)
    good = _open(w, 1, 1, 4)
    cases = {
        "wrong-model": OpenSession(session_id=good.session_id, model_id="0" * 64, start=1,
                                   end=4, max_length=8),
        "wrong-span": _open(w, 1, 0, 4),
        "bad-request: unknown codec": _open(w, 1, 1, 4, codec="zstd"),
        "bad-request: max_length": _open(w, 1, 1, 4, max_length=65),
    }
    for expected, req in cases.items():
        with pytest.raises(RefusedError, match=expected):
            w.open(req)
    w.accepting = False
    with pytest.raises(RefusedError, match="closing"):
        w.open(good)


async def test_malformed_inputs_are_refused_and_the_session_survives(tiny_model: Path) -> None:
    w = _worker(tiny_model, 2, 4)
    s = w.open(_open(w, 1, 2, 4, codec="int8-block"))
    C = w.span.config.hidden_size
    nan = torch.zeros(1, 2, C)
    nan[0, 1, 3] = math.nan
    bad = {
        "hidden states must be": hidden_to_wire(torch.zeros(1, 2, C + 1), "int8-block"),
        "non-finite": Tensor(dtype="float32", shape=(1, 2, C), codec="raw",
                             payload=nan.numpy().tobytes()),
        "codec fp16 is not": hidden_to_wire(torch.zeros(1, 2, C), "fp16"),
        "T in 1..": hidden_to_wire(torch.zeros(1, 0, C), "raw"),
    }
    for expected, tensor in bad.items():
        with pytest.raises(RefusedError, match=expected):
            await w.step(s, Step(step=0, position=0, input=tensor))
    ok = await w.step(s, Step(step=0, position=0,
                              input=hidden_to_wire(torch.randn(1, 2, C), "int8-block")))
    assert ok.output.codec == "int8-block" and ok.output.shape == (1, 2, C)


async def test_token_ids_are_checked(tiny_model: Path) -> None:
    w = _worker(tiny_model, 0, 2)
    s = w.open(_open(w, 1, 0, 2))
    with pytest.raises(RefusedError, match=r"token ids must be in \[0, 264\)"):
        await w.step(s, Step(step=0, position=0, input=ids_to_wire(torch.tensor([[1, 999]]))))
    with pytest.raises(RefusedError, match="raw int64"):
        await w.step(s, Step(step=0, position=0,
                             input=hidden_to_wire(torch.zeros(1, 2), "raw")))
