"""Server-to-server push: hops forward steps to their successor; the client only feeds the first.

These run real nodes (`run_node`) on loopback in this process; the client's sends are counted
by wrapping `RemoteHop.send`, which is how we know the servers did the forwarding.
"""

from __future__ import annotations

import secrets
import threading
from collections import Counter
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from node._client import Client, ClientConfig
from node._hop import RemoteHop
from node._protocol import (
    PROTOCOL,
    CloseSession,
    OpenSession,
    PushOpen,
    Refusal,
    SessionClosed,
    SessionOpened,
    Step,
    StepOutput,
)
from node._sampling import SamplingParams
from node._tensors import hidden_to_wire
from node._textgen import LocalModel
from p2p import Host, HostConfig, Identity, PeerId, open_host, parse_peer_addr

PROMPT = "The list type is"
SPANS = ["0:2", "2:4", "4:6"]


async def _local(model: Path, prompt: str, tokens: int) -> str:
    params = SamplingParams(temperature=0, max_new_tokens=tokens)
    return "".join([p async for p in LocalModel(model).generate(prompt, params)])


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[int, int]]:
    """Steps the client sent itself, by the hop's (start, end)."""
    counts: Counter[tuple[int, int]] = Counter()
    original = RemoteHop.send

    async def counted(self: RemoteHop, *args: Any, **kwargs: Any) -> None:
        counts[(self.start, self.end)] += 1
        await original(self, *args, **kwargs)

    monkeypatch.setattr(RemoteHop, "send", counted)
    return counts


@pytest.mark.parametrize("chunk", [0, 4])
async def test_push_feeds_only_the_first_hop_and_matches_the_engine(
    tiny_model: Path, loopback_swarm: Any, sends: Counter[tuple[int, int]], chunk: int
) -> None:
    expected = await _local(tiny_model, PROMPT, 16)
    with trio.fail_after(60):
        async with loopback_swarm(tiny_model, SPANS) as net, \
                Client(bootstrap=[net.bootstrap], model=tiny_model,
                       config=ClientConfig(codec="raw", push="on", prefill_chunk=chunk,
                                           route_timeout_s=20)) as client:
            text = await client.generate_text(PROMPT, max_new_tokens=16)
            info = client.last
    assert text == expected
    assert info.push and info.failovers == 0
    assert info.route is not None and len(info.route.hops) == 3
    first, *rest = [(h.start, h.end) for h in info.route.hops]
    prompt_steps = -(-len(PROMPT) // chunk) if chunk else 1  # byte-level tokenizer
    assert sends[first] == prompt_steps + 15  # the prompt, then one step per new token
    assert all(sends[hop] == 0 for hop in rest)  # the servers forwarded every step


@pytest.mark.parametrize("carry_bytes", [1 << 16, 0])
async def test_every_hops_output_reaches_the_client_carried_or_as_a_copy(
    tiny_model: Path, loopback_swarm: Any, monkeypatch: pytest.MonkeyPatch, carry_bytes: int
) -> None:
    """Small outputs ride along the chain to the last hop's answer; with no room to carry,
    each hop sends its own copy. Either way the client keeps every hop's input."""
    from node import _service
    from node._pipeline import Pipeline

    monkeypatch.setattr(_service, "CARRY_BYTES", carry_bytes)
    answers: Counter[tuple[int, int]] = Counter()  # (hop index, outputs carried) per answer
    pipelines: list[Pipeline] = []
    original = Pipeline._outputs

    def counted(self: Pipeline, index: int, reply: Any) -> Any:
        answers[(index, len(reply.carried))] += 1
        pipelines.append(self)
        return original(self, index, reply)

    monkeypatch.setattr(Pipeline, "_outputs", counted)
    expected = await _local(tiny_model, PROMPT, 12)
    with trio.fail_after(60):
        async with loopback_swarm(tiny_model, SPANS) as net, \
                Client(bootstrap=[net.bootstrap], model=tiny_model,
                       config=ClientConfig(codec="raw", push="on", prefill_chunk=0,
                                           route_timeout_s=20)) as client:
            text = await client.generate_text(PROMPT, max_new_tokens=12)
            info = client.last
    assert text == expected and info.push and info.failovers == 0
    steps = 12  # the prompt, then one step per new token but the last
    if carry_bytes:
        assert answers == Counter({(2, 2): steps})  # one answer per step, carrying two
    else:
        assert answers == Counter({(0, 0): steps, (1, 0): steps, (2, 0): steps})
    hops = pipelines[-1].hops
    assert [len(h.history) for h in hops] == [steps] * 3  # every hop's inputs, kept
    assert all(kept.input.codec == "raw" and kept.input.shape[-1] == 64
               for h in hops[1:] for kept in h.history)


async def test_push_and_client_driven_agree_exactly_with_quantized_activations(
    tiny_model: Path, loopback_swarm: Any
) -> None:
    texts = {}
    with trio.fail_after(90):
        async with loopback_swarm(tiny_model, SPANS) as net:
            for mode in ("on", "off"):
                async with Client(bootstrap=[net.bootstrap], model=tiny_model,
                                  config=ClientConfig(codec="int8-block", push=mode,
                                                      route_timeout_s=20)) as client:
                    texts[mode] = await client.generate_text(PROMPT, max_new_tokens=24)
                    assert client.last.push is (mode == "on")
    # Both modes hand every hop exactly the bytes its predecessor produced.
    assert texts["on"] == texts["off"]


async def test_failover_during_push_keeps_greedy_output(
    tiny_model: Path, loopback_swarm: Any
) -> None:
    expected = await _local(tiny_model, PROMPT, 40)
    with trio.fail_after(90):
        async with loopback_swarm(tiny_model, SPANS + ["2:4"]) as net, \
                Client(bootstrap=[net.bootstrap], model=tiny_model,
                       config=ClientConfig(codec="raw", push="on", route_timeout_s=20)) \
                as client:
            pieces: list[str] = []
            victim = ""
            async for piece in client.generate(PROMPT, max_new_tokens=40):
                pieces.append(piece)
                route = client.last.route
                if len(pieces) == 15 and route is not None:  # the middle hop dies
                    assert len(route.hops) == 3 and client.last.push
                    victim = route.hops[1].peer_id
                    net.stop(net.index_of(victim))
            info = client.last
    assert "".join(pieces) == expected
    assert info.failovers == 1 and not info.push  # the rest ran client-driven
    assert info.route is not None and victim not in {h.peer_id for h in info.route.hops}


def _bare_host() -> AbstractAsyncContextManager[Host]:
    """A host with no node behind it, to speak the protocol by hand."""
    return open_host(Identity.generate(),
                     HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0",), enable_mdns=False))


async def _connect(host: Host, node: Host) -> None:
    await host.connect_peer(node.peer_id, [parse_peer_addr(node.listen_addrs()[0])[1]])


async def test_a_push_stream_from_anyone_but_the_named_predecessor_is_refused(
    tiny_model: Path, loopback_swarm: Any
) -> None:
    from sharding import Checkpoint

    model_id = Checkpoint.open(tiny_model).model_id
    with trio.fail_after(60):
        async with loopback_swarm(tiny_model, ["0:6"]) as net, \
                _bare_host() as host:
            node = net.nodes[0].host
            peer: PeerId = node.peer_id
            await _connect(host, node)
            session_id = secrets.token_bytes(16)
            async with host.open_session(peer, PROTOCOL) as owner:
                await owner.send(OpenSession(session_id=session_id, model_id=model_id, start=2,
                                             end=4, max_length=32,
                                             predecessor=str(Identity.generate().peer_id)))
                assert isinstance(await owner.receive(), SessionOpened)
                async with host.open_session(peer, PROTOCOL) as intruder:
                    await intruder.send(PushOpen(session_id=session_id))
                    reply = await intruder.receive()
            assert isinstance(reply, Refusal) and reply.code == "no-session"


@pytest.fixture
def held_compute(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Every forward of the in-process nodes waits, once `computing` is set, for `release`."""
    from node._worker import SpanWorker

    computing, release = threading.Event(), threading.Event()
    compute = SpanWorker._compute

    def held(self: SpanWorker, *args: Any) -> Any:
        computing.set()
        release.wait(10)
        return compute(self, *args)

    monkeypatch.setattr(SpanWorker, "_compute", held)
    return computing, release


async def _close_while_computing(session: Any, sid: bytes, computing: threading.Event,
                                 worker: Any) -> None:
    """Send `CloseSession` once the node computes a step, and return once it acts on it."""
    from node import _service

    await trio.to_thread.run_sync(computing.wait)
    served = _service._SERVED[worker].sessions[sid]
    await session.send(CloseSession(session_id=sid))
    while not (served.closed or served.ending.is_set()):  # noqa: ASYNC110 - node internals
        await trio.sleep(0.001)


async def test_a_pushed_step_still_computing_answers_before_the_session_closes(
    tiny_model: Path, loopback_swarm: Any, held_compute: tuple[threading.Event, threading.Event]
) -> None:
    """Nothing of a session may follow its `SessionClosed`: the client reuses the stream."""
    from sharding import Checkpoint

    computing, release = held_compute

    model_id = Checkpoint.open(tiny_model).model_id
    with trio.fail_after(60):
        async with loopback_swarm(tiny_model, ["0:6"]) as net, \
                _bare_host() as host:
            node = net.nodes[0].host
            peer: PeerId = node.peer_id
            await _connect(host, node)
            hidden = Checkpoint.open(tiny_model).config.hidden_size
            sid = secrets.token_bytes(16)
            async with host.open_session(peer, PROTOCOL) as owner, \
                    host.open_session(peer, PROTOCOL) as push:
                await owner.send(OpenSession(session_id=sid, model_id=model_id, start=2,
                                             end=4, max_length=64, codec="raw",
                                             predecessor=str(host.peer_id)))
                assert isinstance(await owner.receive(), SessionOpened)
                await push.send(PushOpen(session_id=sid))
                assert isinstance(await push.receive(), SessionOpened)
                await push.send(Step(step=0, position=0, input=hidden_to_wire(
                    torch.randn(1, 48, hidden), "raw")))
                await _close_while_computing(owner, sid, computing, net.nodes[0].worker)
                release.set()
                replies = [await owner.receive(), await owner.receive()]
                assert [type(r) for r in replies] == [StepOutput, SessionClosed]
                # The stream is clean: the next session's first reply is its own.
                await owner.send(OpenSession(session_id=secrets.token_bytes(16),
                                             model_id=model_id, start=2, end=4,
                                             max_length=8, codec="raw"))
                assert isinstance(await owner.receive(), SessionOpened)


async def test_a_pushed_step_still_computing_is_pushed_on_before_the_push_stream_closes(
    tiny_model: Path, loopback_swarm: Any, held_compute: tuple[threading.Event, threading.Event]
) -> None:
    """The same for the hop's own push stream, which it keeps for its next session: a step
    held in the compute while the client closes still goes on to the successor, and the push
    stream stays clean for the next session."""
    from sharding import Checkpoint

    computing, release = held_compute
    ckpt = Checkpoint.open(tiny_model)
    with trio.fail_after(60):
        async with loopback_swarm(tiny_model, ["0:3", "3:6"]) as net, \
                _bare_host() as host:
            a, b = (n.host for n in net.nodes)
            for node in (a, b):
                await _connect(host, node)

            async def session_through_a_and_b(first: bool) -> None:
                sid_a, sid_b = secrets.token_bytes(16), secrets.token_bytes(16)
                async with host.open_session(b.peer_id, PROTOCOL) as owner_b, \
                        host.open_session(a.peer_id, PROTOCOL) as owner_a, \
                        host.open_session(a.peer_id, PROTOCOL) as push:
                    await owner_b.send(OpenSession(
                        session_id=sid_b, model_id=ckpt.model_id, start=3, end=6, max_length=64,
                        codec="raw", predecessor=str(a.peer_id)))
                    await owner_a.send(OpenSession(
                        session_id=sid_a, model_id=ckpt.model_id, start=1, end=3, max_length=64,
                        codec="raw", predecessor=str(host.peer_id),
                        successor=tuple(b.listen_addrs()), successor_session=sid_b))
                    assert isinstance(await owner_b.receive(), SessionOpened)
                    assert isinstance(await owner_a.receive(), SessionOpened)
                    await push.send(PushOpen(session_id=sid_a))
                    assert isinstance(await push.receive(), SessionOpened)
                    await push.send(Step(step=0, position=0, push=True, input=hidden_to_wire(
                        torch.randn(1, 8, ckpt.config.hidden_size), "raw")))
                    if first:  # the client closes while A computes the step
                        await _close_while_computing(owner_a, sid_a, computing,
                                                     net.nodes[0].worker)
                    release.set()
                    with trio.fail_after(10):  # the step went on to B all the same
                        reply = await owner_b.receive()
                    assert isinstance(reply, StepOutput) and len(reply.carried) == 1
                    if not first:
                        await owner_a.send(CloseSession(session_id=sid_a))
                    assert await owner_a.receive() == SessionClosed(session_id=sid_a)

            await session_through_a_and_b(first=True)
            await session_through_a_and_b(first=False)
            pushes = net.nodes[0].pushes
            assert pushes is not None
            assert (pushes.opened, pushes.reused) == (1, 1)  # the kept push stream was clean


def test_auto_push_measures_both_modes_then_keeps_the_faster() -> None:
    from node._pipeline import prefer_push

    assert prefer_push({}) is True  # push first
    assert prefer_push({True: 0.030}) is False  # then client-driven once, to compare
    assert prefer_push({True: 0.030, False: 0.040}) is True
    assert prefer_push({True: 0.041, False: 0.040}) is True  # within the margin
    assert prefer_push({True: 0.050, False: 0.040}) is False


async def test_auto_mode_tries_push_then_client_driven_with_the_same_output(
    tiny_model: Path, loopback_swarm: Any
) -> None:
    with trio.fail_after(90):
        async with loopback_swarm(tiny_model, SPANS) as net, \
                Client(bootstrap=[net.bootstrap], model=tiny_model,
                       config=ClientConfig(codec="int8-block", route_timeout_s=20)) as client:
            modes, texts = [], []
            for _ in range(3):
                texts.append(await client.generate_text(PROMPT, max_new_tokens=8))
                modes.append(client.last.push)
    assert modes[:2] == [True, False]
    assert len(set(texts)) == 1


async def test_no_replacement_fails_after_a_bounded_wait_naming_the_stages(
    tiny_model: Path, loopback_swarm: Any
) -> None:
    from node import GenerationError

    with trio.fail_after(60):
        async with loopback_swarm(tiny_model, SPANS) as net, \
                Client(bootstrap=[net.bootstrap], model=tiny_model,
                       config=ClientConfig(codec="raw", route_timeout_s=2)) as client:
            pieces: list[str] = []
            with pytest.raises(GenerationError) as info:
                async for piece in client.generate(PROMPT, max_new_tokens=40):
                    pieces.append(piece)
                    if len(pieces) == 5:
                        route = client.last.route
                        assert route is not None
                        middle = route.hops[1]
                        net.stop(net.index_of(middle.peer_id))
    message = str(info.value)
    assert "\n" not in message
    assert f"no peer serves stages {middle.start}-{middle.end - 1}" in message, message


@pytest.mark.parametrize(("push", "chunk"), [("on", 0), ("on", 4), ("off", 0)])
async def test_the_last_hop_answers_a_prompt_with_its_last_row(
    tiny_model: Path, loopback_swarm: Any, monkeypatch: pytest.MonkeyPatch, push: str,
    chunk: int
) -> None:
    """The client's head reads only the prompt's last row: the last hop sends no other, and
    every other hop's output (the next hop's input, kept for failover) stays whole."""
    from node._pipeline import Pipeline

    rows: dict[int, list[int]] = {}  # hop index -> rows of each output the client got
    original = Pipeline._outputs

    def counted(self: Pipeline, index: int, reply: Any) -> Any:
        outputs = original(self, index, reply)
        for i, t in outputs:
            rows.setdefault(i, []).append(t.shape[1])
        return outputs

    monkeypatch.setattr(Pipeline, "_outputs", counted)
    expected = await _local(tiny_model, PROMPT, 6)
    with trio.fail_after(60):
        async with loopback_swarm(tiny_model, SPANS) as net, \
                Client(bootstrap=[net.bootstrap], model=tiny_model,
                       config=ClientConfig(codec="raw", push=push, prefill_chunk=chunk,
                                           route_timeout_s=20)) as client:
            text = await client.generate_text(PROMPT, max_new_tokens=6)
            info = client.last
    assert text == expected and info.failovers == 0 and info.push is (push == "on")
    prompt = len(PROMPT)  # byte-level tokenizer
    pieces = [min(chunk, prompt - p) for p in range(0, prompt, chunk)] if chunk else [prompt]
    assert rows[2] == [1] * (len(pieces) + 5)  # the prompt's pieces, then 5 decode steps
    assert rows[0] == rows[1] == pieces + [1] * 5
