"""The churn soak: nodes killed and restarted all along while two clients generate.

A 5-node devnet serves the model with every stage on two nodes. Every `PERIOD_S` seconds one
node (in turn) is killed with SIGKILL and restarted with the same data dir, so the same peer id
comes back on the same span; the next kill comes only after it is online again, so no stage is
ever without a server for longer than a restart. Meanwhile two clients, each with its own host,
generate greedily without pause, and every output is compared token for token with the
single-process reference (`raw` activations are exact).

At the end: no generation failed or differed, every node says (in its own announcements) that
it holds no session and reserves no KV cache, and once the devnet is down no process of it is
left, nor an unreaped child.

Run it with `pytest -m soak tests/node/test_node_soak.py`; `SHARDNET_SOAK_S` sets the length in
seconds (default 600).
"""

from __future__ import annotations

import os
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from devnet import Devnet
from devnet._leaks import leftover_processes, unreaped_children
from node import GenerationError
from node._client import Client, ClientConfig
from node._daemon import NodeConfig
from node._generate import generate_ids
from node._local import LocalStages
from node._sampling import Sampler, SamplingParams
from node._textgen import LocalModel
from node._worker import ServerLimits
from p2p import Announcement, HostConfig, Identity, PeerId, SwarmView, open_host

pytestmark = pytest.mark.soak

SOAK_S = float(os.environ.get("SHARDNET_SOAK_S", "600"))
PERIOD_S = 30.0
TOKENS = 48
PROMPTS = ("The list type", "def ", "Hello, world", "import trio", "In the beginning",
           "class Foo:")
# Stages: 0 embed, 1-4 blocks, 5 head. Every stage has two servers, and the cheapest routes
# go through several nodes, so every victim is on some client's route now and then.
SPANS = ["0:2", "0:3", "2:4", "3:6", "4:6"]
CLIENTS = 2


@dataclass
class Tally:
    """What the clients did, for the assertions and the failure message."""

    generations: int = 0
    failovers: int = 0
    failures: list[str] = field(default_factory=list)
    kills: list[str] = field(default_factory=list)


async def _reference(model: Path) -> dict[str, list[int]]:
    local = LocalModel(model)
    params = SamplingParams(temperature=0, max_new_tokens=TOKENS)
    out = {}
    for prompt in PROMPTS:
        ids = local.tokenizer.encode(prompt)
        stages = LocalStages(local.span, max_length=len(ids) + TOKENS)
        async with aclosing(generate_ids(stages.forward, ids, Sampler(params),
                                         eos_id=local.eos_id)) as tokens:
            out[prompt] = [t async for t in tokens]
    return out


async def _generate_until(client: Client, who: int, stop: trio.Event,
                          reference: dict[str, list[int]], tally: Tally) -> None:
    """Generate one prompt after another until `stop`; record every failure."""
    turn = who
    while not stop.is_set():
        prompt = PROMPTS[turn % len(PROMPTS)]
        turn += 1
        ids = client.tokenizer.encode(prompt)
        got: list[int] = []
        try:
            async with aclosing(client.generate_ids(ids, max_new_tokens=TOKENS)) as tokens:
                got = [t async for t in tokens]
        except GenerationError as exc:
            tally.failures.append(f"client {who}, {prompt!r}: {exc}")
            continue
        finally:
            tally.generations += 1
            tally.failovers += client.last.failovers
        if got != reference[prompt]:
            tally.failures.append(f"client {who}, {prompt!r}: got {got}, "
                                  f"want {reference[prompt]}")


async def _churn(net: Devnet, started: float, deadline: float, tally: Tally) -> None:
    """Kill and restart one node every `PERIOD_S` seconds, in turn, until `deadline`."""
    turn = 0
    while True:
        at = started + (turn + 1) * PERIOD_S
        if at >= deadline:
            return
        await trio.sleep_until(at)  # the churn schedule, not a wait for the swarm to settle
        assert _crashed(net) == []
        victim = net.nodes[turn % len(net.nodes)]
        turn += 1
        victim.kill()
        assert await victim.wait() == -9
        tally.kills.append(victim.name)
        await victim.restart()  # same data dir: same peer id, same span; waits until online


def _crashed(net: Devnet) -> list[str]:
    """Nodes that exited on their own (only the churn may stop a node), with their logs."""
    return [f"{n.name} exited with {n.returncode}, see {n.log_path}"
            for n in net.nodes if not n.alive]


async def _wait_no_sessions(net: Devnet, model_id: str, since: float) -> None:
    """Poll the nodes' announcements until each, published after `since`, shows no session.

    A record's publication time is its expiry minus the nodes' TTL, so an older record (say
    from the DHT) cannot vouch for a node. The observer is a host of its own: a second watch
    on a client's host would share (and, leaving, unsubscribe) the client's gossip topic.
    """
    limits = ServerLimits()
    ttl_s = NodeConfig(data_dir=Path()).announce_ttl_s  # what the devnet's nodes run with
    peers = {PeerId.from_string(n.peer_id): n.name for n in net.nodes}

    def idle(record: Announcement | None) -> bool:
        return (record is not None and record.expires_at - ttl_s > since
                and record.load == 0 and record.free_cache_tokens == limits.max_cache_tokens)

    config = HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0",), bootstrap=net.bootstrap_addrs,
                        enable_mdns=False)
    async with open_host(Identity.generate(), config) as host, \
            SwarmView.watch(host, model_id) as view:
        with trio.move_on_after(30):
            while not all(idle(view.get(peer)) for peer in peers):
                await view.wait_changed()
        busy = {name: view.get(peer) for peer, name in peers.items() if not idle(view.get(peer))}
    assert not busy, f"30 s after the clients stopped, not every node announces 0 sessions: {busy}"


async def test_churn_soak_fails_no_generation_and_leaks_nothing(
    tmp_path: Path, tiny_model: Path
) -> None:
    reference = await _reference(tiny_model)
    root = tmp_path / "net"
    tally = Tally()
    config = ClientConfig(codec="raw", route_timeout_s=30)
    with trio.fail_after(SOAK_S + 300):
        async with Devnet(len(SPANS), root=root, model=tiny_model, spans=SPANS) as net, \
                Client(bootstrap=net.bootstrap_addrs, model=tiny_model, config=config) as first, \
                Client(bootstrap=net.bootstrap_addrs, model=tiny_model, config=config) as second:
            stop = trio.Event()
            started = trio.current_time()
            deadline = started + SOAK_S
            async with trio.open_nursery() as nursery:
                for who, client in enumerate((first, second)):
                    nursery.start_soon(_generate_until, client, who, stop, reference, tally)
                await _churn(net, started, deadline, tally)
                await trio.sleep_until(deadline)
                stop.set()  # each client finishes the generation it is in
            assert _crashed(net) == []
            stopped = time.time()
            await _wait_no_sessions(net, first.model_id, stopped)
    print(f"soak {SOAK_S:.0f} s: {tally.generations} generations, {len(tally.kills)} kills "
          f"({', '.join(tally.kills)}), {tally.failovers} failovers, "
          f"{len(tally.failures)} failures")
    assert tally.failures == [], f"{len(tally.failures)} of {tally.generations} failed"
    assert tally.generations >= CLIENTS * SOAK_S / 30  # the clients really kept generating
    assert len(tally.kills) == max(0, int((SOAK_S - 1e-9) // PERIOD_S))
    assert tally.failovers > 0  # the churn really hit the clients
    assert leftover_processes(root) == []
    assert unreaped_children() == []
