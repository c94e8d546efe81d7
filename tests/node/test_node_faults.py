"""Bad clients and dropped sessions: refusals, no crash, nothing leaks."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
import trio.lowlevel

from node import GenerationError
from node._client import Client, ClientConfig
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
from node._sampling import SamplingParams
from node._tensors import hidden_to_wire, ids_to_wire
from node._textgen import LocalModel
from node._worker import ServerLimits
from p2p import HostConfig, Identity, Tensor, open_host

PROMPT = "The list type"


async def test_a_misbehaving_client_is_refused_while_an_honest_session_completes(
    tiny_model: Path, loopback_swarm: Any
) -> None:
    params = SamplingParams(temperature=0, max_new_tokens=40)
    expected = "".join([p async for p in LocalModel(tiny_model).generate(PROMPT, params)])
    with trio.fail_after(90):
        async with loopback_swarm(tiny_model, ["0:6"]) as net:
            node = net.nodes[0]
            worker = node.worker
            peer = node.host.peer_id
            addrs = [a.rsplit("/p2p/", 1)[0] for a in node.host.listen_addrs()]
            honest: list[str] = []
            seen: dict[str, str] = {}

            async def honest_client() -> None:
                async with Client(bootstrap=[net.bootstrap], model=tiny_model,
                                  config=ClientConfig(codec="raw")) as client:
                    async for piece in client.generate(PROMPT, max_new_tokens=40):
                        honest.append(piece)
                        await trio.lowlevel.checkpoint()

            async def attacker() -> None:
                cfg = HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0",), enable_mdns=False,
                                 enable_dht=False, enable_pubsub=False)
                async with open_host(Identity.generate(), cfg) as host:
                    await host.connect_peer(peer, addrs)
                    # 1. Garbage bytes: the node drops the stream, nothing else.
                    raw = await host.open_stream(peer, PROTOCOL)
                    await raw.send_all(b"\xff" * 64 + secrets.token_bytes(4096))
                    await raw.aclose()
                    # 2. A session that breaks every rule, one step at a time.
                    async with host.open_session(peer, PROTOCOL) as s:
                        sid = secrets.token_bytes(16)
                        await s.send(OpenSession(session_id=sid, model_id=worker.model_id,
                                                 start=0, end=6, max_length=16, codec="raw"))
                        assert isinstance(await s.receive(), SessionOpened)
                        bad_steps = {
                            "position": Step(step=0, position=3,
                                             input=ids_to_wire(torch.tensor([[1, 2]]))),
                            "too-long": Step(step=0, position=0,
                                             input=ids_to_wire(torch.ones(1, 40,
                                                                          dtype=torch.long))),
                            "hidden-for-ids": Step(step=0, position=0,
                                                   input=hidden_to_wire(torch.zeros(1, 2, 64),
                                                                        "raw")),
                            "bad-ids": Step(step=0, position=0,
                                            input=ids_to_wire(torch.tensor([[5, 10_000]]))),
                            "oversize": Step(step=0, position=0, input=Tensor(
                                dtype="int64", shape=(1, 100_000), codec="raw",
                                payload=bytes(800_000))),
                        }
                        for name, step in bad_steps.items():
                            await s.send(step)
                            reply = await s.receive()
                            assert isinstance(reply, Refusal), name
                            seen[name] = reply.code
                        # The same session still works after all that.
                        await s.send(Step(step=1, position=0,
                                          input=ids_to_wire(torch.tensor([[1, 2]]))))
                        assert isinstance(await s.receive(), StepOutput)
                    # 3. A frame far over the limit: the stream is reset, the node lives on.
                    raw = await host.open_stream(peer, PROTOCOL)
                    await raw.send_all((200 << 20).to_bytes(4, "big") + bytes(8))
                    await raw.aclose()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(honest_client)
                nursery.start_soon(attacker)
            assert "".join(honest) == expected
            assert seen == {"position": "position", "too-long": "position",
                            "hidden-for-ids": "bad-request", "bad-ids": "bad-request",
                            "oversize": "bad-request"}
            with trio.fail_after(10):
                await worker.wait_idle()  # every session freed its cache


async def test_sessions_are_freed_when_a_client_vanishes_mid_generation(
    tiny_model: Path, loopback_swarm: Any
) -> None:
    with trio.fail_after(60):
        async with loopback_swarm(tiny_model, ["0:3", "3:6"], dead_after_s=1.0) as net:
            workers = [n.worker for n in net.nodes]
            with trio.CancelScope() as scope:
                async with Client(bootstrap=[net.bootstrap], model=tiny_model) as client:
                    async for _ in client.generate(PROMPT, max_new_tokens=200):
                        if all(w.sessions for w in workers):
                            scope.cancel()  # the client disappears mid-generation
            with trio.fail_after(10):  # heartbeats notice the client is gone
                for w in workers:
                    await w.wait_idle()
            assert all(w.statistics().cache_tokens_reserved == 0 for w in workers)


async def test_a_generation_returns_once_every_hop_has_freed_its_session(
    tiny_model: Path, loopback_swarm: Any
) -> None:
    with trio.fail_after(60):
        async with loopback_swarm(tiny_model, ["0:3", "3:6"]) as net:
            workers = [n.worker for n in net.nodes]
            async with Client(bootstrap=[net.bootstrap], model=tiny_model) as client:
                for push in ("on", "off"):
                    client.config = dataclasses.replace(client.config, push=push)
                    held = []
                    async for _ in client.generate(PROMPT, max_new_tokens=8):
                        held.append(sum(len(w.sessions) for w in workers))
                    # No polling: the close is acknowledged before `generate` ends.
                    assert min(held) == 2, push
                    assert [len(w.sessions) for w in workers] == [0, 0], push
                    assert all(w.statistics().cache_tokens_reserved == 0 for w in workers)
            # The acknowledgement, on the wire: `SessionClosed` comes after the cache is freed.
            node = net.nodes[0]
            cfg = HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0",), enable_mdns=False,
                             enable_dht=False, enable_pubsub=False)
            async with open_host(Identity.generate(), cfg) as host:
                await host.connect_peer(node.host.peer_id, [
                    a.rsplit("/p2p/", 1)[0] for a in node.host.listen_addrs()])
                async with host.open_session(node.host.peer_id, PROTOCOL) as s:
                    sid = secrets.token_bytes(16)
                    await s.send(OpenSession(session_id=sid, model_id=node.worker.model_id,
                                             start=0, end=3, max_length=16, codec="raw"))
                    assert isinstance(await s.receive(), SessionOpened)
                    assert len(node.worker.sessions) == 1
                    await s.send(CloseSession(session_id=secrets.token_bytes(16)))  # not ours
                    assert isinstance(await s.receive(), Refusal)
                    await s.send(CloseSession(session_id=sid))
                    assert await s.receive() == SessionClosed(session_id=sid)
                    assert len(node.worker.sessions) == 0
                    # The stream carries the next session (clients keep streams for reuse).
                    sid = secrets.token_bytes(16)
                    await s.send(OpenSession(session_id=sid, model_id=node.worker.model_id,
                                             start=0, end=3, max_length=16, codec="raw"))
                    await s.send(Step(step=0, position=0,
                                      input=ids_to_wire(torch.tensor([[1, 2]]))))
                    assert isinstance(await s.receive(), SessionOpened)
                    assert isinstance(await s.receive(), StepOutput)


async def test_streams_are_kept_across_generations_by_clients_and_pushing_nodes(
    tiny_model: Path, loopback_swarm: Any
) -> None:
    params = SamplingParams(temperature=0, max_new_tokens=12)
    expected = "".join([p async for p in LocalModel(tiny_model).generate(PROMPT, params)])
    with trio.fail_after(60):
        async with loopback_swarm(tiny_model, ["0:2", "2:4", "4:6"]) as net, \
                Client(bootstrap=[net.bootstrap], model=tiny_model,
                       config=ClientConfig(push="on", codec="raw")) as client:
            for _ in range(3):
                text = "".join([p async for p in client.generate(PROMPT, max_new_tokens=12)])
                assert text == expected and client.last.push
            assert client.streams is not None
            assert (client.streams.opened, client.streams.reused) == (3, 6)
            first, second = (n.pushes for n in net.nodes[:2])
            assert first is not None and second is not None
            assert (first.opened, first.reused) == (1, 2)
            assert (second.opened, second.reused) == (1, 2)
            # A client that keeps nothing opens new streams every time, with the same output.
            client.config = dataclasses.replace(client.config, keep_streams_s=0)
            client.streams = None
            text = "".join([p async for p in client.generate(PROMPT, max_new_tokens=12)])
            assert text == expected
            assert first.reused == 3  # the nodes still keep theirs


async def test_a_generation_cancelled_mid_way_leaves_the_client_as_it_was(
    tiny_model: Path, loopback_swarm: Any
) -> None:
    with trio.fail_after(60):
        async with loopback_swarm(tiny_model, ["0:3", "3:6"]) as net, \
                Client(bootstrap=[net.bootstrap], model=tiny_model) as client:
            expected = "".join([p async for p in client.generate(PROMPT, max_new_tokens=8)])
            with trio.CancelScope() as scope:
                async for _ in client.generate(PROMPT, max_new_tokens=200):
                    scope.cancel()
            assert client._head is not None and client._head.users == 0
            assert "".join([p async for p in client.generate(PROMPT, max_new_tokens=8)]) \
                == expected
            with trio.fail_after(10):  # the cancelled sessions were dropped, not kept
                for n in net.nodes:
                    assert n.worker is not None
                    await n.worker.wait_idle()


async def test_a_refusing_node_gives_a_one_line_error(
    tiny_model: Path, loopback_swarm: Any
) -> None:
    with trio.fail_after(60):
        async with loopback_swarm(tiny_model, ["0:6"], limits=ServerLimits(max_length=32)) \
                as net, Client(bootstrap=[net.bootstrap], model=tiny_model) as client:
            with pytest.raises(GenerationError) as info:
                await client.generate_text(PROMPT, max_new_tokens=64)
    message = str(info.value)
    assert "\n" not in message
    assert "max_length 77 exceeds 32" in message


async def test_failover_mid_generation_keeps_greedy_output(
    tiny_model: Path, loopback_swarm: Any
) -> None:
    params = SamplingParams(temperature=0, max_new_tokens=48)
    expected = "".join([p async for p in LocalModel(tiny_model).generate(PROMPT, params)])
    with trio.fail_after(90):
        async with loopback_swarm(tiny_model, ["0:3", "3:6", "1:6"]) as net, \
                Client(bootstrap=[net.bootstrap], model=tiny_model,
                       config=ClientConfig(codec="raw", route_timeout_s=20)) as client:
            pieces: list[str] = []
            async for piece in client.generate(PROMPT, max_new_tokens=48):
                pieces.append(piece)
                if len(pieces) == 20:  # mid-sentence: the first hop of the route dies
                    route = client.last.route
                    assert route is not None
                    victim = route.hops[0].peer_id
                    net.stop(net.index_of(victim))
            info = client.last
    assert "".join(pieces) == expected
    assert info.failovers == 1
    assert info.route is not None and victim not in {h.peer_id for h in info.route.hops}
