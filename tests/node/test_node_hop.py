"""The client's hop opens without a round trip: its first step follows `OpenSession` at once.

A scripted server (a bare host with a session handler) reads what the client sends before it
answers anything, so a client that waited for `SessionOpened` would hang here.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import torch
import trio

from node._errors import SessionRefusedError
from node._hop import HopEvent, RemoteHop
from node._protocol import (
    PROTOCOL,
    CloseSession,
    OpenSession,
    Refusal,
    SessionClosed,
    SessionOpened,
    Step,
    StepOutput,
)
from node._tensors import hidden_to_wire, ids_to_wire
from p2p import Host, HostConfig, Identity, SessionConfig, SessionStream, open_host

HIDDEN = 8
Script = Callable[[SessionStream], Awaitable[None]]
Events = trio.MemoryReceiveChannel[HopEvent]


def _config() -> HostConfig:
    return HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0",), enable_mdns=False)


@asynccontextmanager
async def _hop(script: Script) -> AsyncIterator[tuple[RemoteHop, Events]]:
    """A running `RemoteHop` on stages [0, 1) of a peer that runs `script` on the session."""
    async with open_host(Identity.generate(), _config()) as server, \
            open_host(Identity.generate(), _config()) as client, trio.open_nursery() as nursery:
        server.set_session_handler(PROTOCOL, script)
        send, receive = trio.open_memory_channel[HopEvent](16)
        hop = RemoteHop(client, peer=server.peer_id, addrs=_addrs(server), start=0, end=1,
                        model_id="m", max_length=8, codec="raw",
                        session_id=secrets.token_bytes(16), hidden_size=HIDDEN, vocab_size=16,
                        num_stages=3, session_config=SessionConfig(), events=send)
        await nursery.start(hop.run)
        yield hop, receive
        hop.aclose()


def _addrs(host: Host) -> tuple[str, ...]:
    return tuple(host.listen_addrs())


async def test_the_first_step_goes_out_before_the_session_is_confirmed() -> None:
    seen: list[str] = []

    async def script(session: SessionStream) -> None:
        request = await session.receive()
        step = await session.receive()  # read before anything is answered
        seen.extend([request.wire_name, step.wire_name])
        assert isinstance(request, OpenSession) and isinstance(step, Step)
        await session.send(SessionOpened(session_id=request.session_id, dtype="float32"))
        await session.send(StepOutput(step=step.step, position=step.position,
                                      output=hidden_to_wire(torch.ones(1, 2, HIDDEN), "raw")))
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with _hop(script) as (hop, events):
            await hop.send(0, 0, ids_to_wire(torch.tensor([[1, 2]])))
            event = await events.receive()
    assert seen == ["shardnet.OpenSession", "shardnet.Step"]
    assert isinstance(event.reply, StepOutput) and event.error is None
    assert hop.check_output(event.reply.output, 2, False).shape == (1, 2, HIDDEN)


@pytest.mark.parametrize("retryable", [True, False])
async def test_a_refused_session_arrives_as_the_hops_failure(retryable: bool) -> None:
    async def script(session: SessionStream) -> None:
        await session.receive()
        await session.send(Refusal(code="busy" if retryable else "bad-request",
                                   detail="no room", retryable=retryable))

    with trio.fail_after(20):
        async with _hop(script) as (hop, events):
            await hop.send(0, 0, ids_to_wire(torch.tensor([[1]])))
            event = await events.receive()
    assert isinstance(event.error, SessionRefusedError)
    assert event.error.refusal.retryable is retryable and "no room" in str(event.error)
    assert hop.failed is event.error


def test_carried_outputs_and_session_ids_are_bounded() -> None:
    from node._protocol import MAX_CARRIED
    from p2p import LocalProtocolError, decode_message, encode_message

    row = hidden_to_wire(torch.ones(1, 1, HIDDEN), "int8-block")
    ok = Step(step=3, position=7, input=row, push=True, relay=True, carried=(row, row))
    assert decode_message(encode_message(ok)) == ok
    for bad in (Step(step=3, position=7, input=row, carried=(row,)),  # carried, no relay
                Step(step=3, position=7, input=row, relay=True,
                     carried=(row,) * (MAX_CARRIED + 1)),
                StepOutput(step=3, position=7, output=row, carried=(row,) * (MAX_CARRIED + 1)),
                CloseSession(session_id=b"short"), SessionClosed(session_id=bytes(17))):
        with pytest.raises(LocalProtocolError):
            encode_message(bad)
