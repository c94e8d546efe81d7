"""Failover with real processes: a middle node that dies, hangs or loses its link changes nothing.

Each test runs a 4-node devnet with spare capacity for the middle span (stages 2-4 on two
nodes), starts a 64-token greedy generation, disturbs the node serving the middle of the route
after 24 tokens, and checks that the output is the undisturbed one and that exactly one
failover happened. A killed node resets its connections; a frozen (SIGSTOP) or cut-off node
keeps them open and silent, so the client must declare it dead by heartbeats
(`ClientConfig.dead_after_s`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from devnet import Devnet, NodeHandle
from node._client import Client, ClientConfig
from node._sampling import SamplingParams
from node._textgen import LocalModel

PROMPT = "The list type"
TOKENS = 64
DISTURB_AT = 24  # text pieces into the generation
# Stages: 0 embed, 1-4 blocks, 5 head. Two nodes can serve the middle: spare capacity.
SPANS = ["0:2", "2:4", "2:4", "4:6"]
NETNS_OK = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("ip") is not None

Disturb = Callable[[NodeHandle], Awaitable[None]]


async def _expected(model: Path) -> str:
    params = SamplingParams(temperature=0, max_new_tokens=TOKENS)
    return "".join([p async for p in LocalModel(model).generate(PROMPT, params)])


async def _generate_disturbing_the_middle(
    net: Devnet, client: Client, disturb: Disturb
) -> tuple[str, NodeHandle]:
    """Generate, disturbing the node that serves stage 2 after `DISTURB_AT` pieces."""
    pieces: list[str] = []
    victim: NodeHandle | None = None
    async for piece in client.generate(PROMPT, max_new_tokens=TOKENS):
        pieces.append(piece)
        if len(pieces) == DISTURB_AT and victim is None:
            route = client.last.route
            assert route is not None
            middle = next(h for h in route.hops if h.start == 2)
            victim = next(n for n in net.nodes if n.peer_id == middle.peer_id)
            await disturb(victim)  # mid-sentence
    assert victim is not None, "the generation ended before the node was disturbed"
    return "".join(pieces), victim


async def _kill(node: NodeHandle) -> None:
    node.kill()  # SIGKILL


async def _freeze(node: NodeHandle) -> None:
    node.freeze()  # SIGSTOP


async def _cut_off(node: NodeHandle) -> None:
    await node.cut_off()


def _client_config() -> ClientConfig:
    return ClientConfig(codec="raw", route_timeout_s=30, dead_after_s=1.0)


async def test_a_middle_node_killed_mid_generation_changes_nothing(
    tmp_path: Path, tiny_model: Path
) -> None:
    expected = await _expected(tiny_model)
    with trio.fail_after(120):
        async with Devnet(4, root=tmp_path / "net", model=tiny_model, spans=SPANS) as net, \
                Client(bootstrap=net.bootstrap_addrs, model=tiny_model,
                       config=_client_config()) as client:
            text, victim = await _generate_disturbing_the_middle(net, client, _kill)
            info = client.last
    assert text == expected
    assert info.failovers == 1
    assert victim.returncode == -9


async def test_a_middle_node_frozen_mid_generation_changes_nothing(
    tmp_path: Path, tiny_model: Path
) -> None:
    expected = await _expected(tiny_model)
    victim: NodeHandle | None = None

    async def freeze(node: NodeHandle) -> None:
        nonlocal victim
        victim = node
        node.freeze()

    with trio.fail_after(120):
        async with Devnet(4, root=tmp_path / "net", model=tiny_model, spans=SPANS) as net, \
                Client(bootstrap=net.bootstrap_addrs, model=tiny_model,
                       config=_client_config()) as client:
            try:
                text, _ = await _generate_disturbing_the_middle(net, client, freeze)
                info = client.last
                assert victim is not None and victim.alive  # frozen, not dead
            finally:
                if victim is not None and victim.alive:
                    victim.thaw()  # leave no process stopped, whatever happened
    assert text == expected
    assert info.failovers == 1
    assert info.route is not None
    assert victim.peer_id not in {h.peer_id for h in info.route.hops}


@pytest.mark.skipif(not NETNS_OK, reason="--netns needs root and iproute2 (ip netns)")
async def test_a_middle_node_cut_off_mid_generation_changes_nothing(
    tmp_path: Path, tiny_model: Path
) -> None:
    expected = await _expected(tiny_model)
    with trio.fail_after(120):
        async with Devnet(4, root=tmp_path / "net", model=tiny_model, spans=SPANS,
                          netns=True) as net:
            plan = net.netns_plan
            assert plan is not None
            # The client lives in the root namespace and reaches the nodes over the bridge.
            config = ClientConfig(codec="raw", route_timeout_s=30, dead_after_s=1.0,
                                  listen=(f"/ip4/{plan.gateway}/tcp/0",))
            async with Client(bootstrap=net.bootstrap_addrs, model=tiny_model,
                              config=config) as client:
                text, victim = await _generate_disturbing_the_middle(net, client, _cut_off)
                info = client.last
                assert victim.alive  # running on, unreachable
    assert text == expected
    assert info.failovers == 1
    assert info.route is not None
    assert victim.peer_id not in {h.peer_id for h in info.route.hops}
