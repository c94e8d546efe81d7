"""A 20-node gossip overlay on loopback, in one trio run.

After bootstrap: every announcement reaches every other node within 3 s, a forged
announcement reaches nobody, and a node that leaves disappears from every view.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import pytest
import trio

from p2p import (
    ANNOUNCE_DOMAIN,
    AnnounceConfig,
    Announcer,
    AnnounceState,
    Host,
    HostConfig,
    Identity,
    LiveSwarm,
    ServingInfo,
    SignedAnnouncement,
    announce_topic,
    open_announcer,
    open_host,
    open_swarm_view,
)

N = 20
HUBS = 3
MODEL = "overlay-test-model"
TOPIC = announce_topic(MODEL)
# All 20 nodes share one process (one core): py-libp2p spends ~0.1-0.2 ms of CPU per
# yamux frame, so 20 nodes refreshing every few seconds would saturate it with 20x a
# real node's load. Refreshes are therefore rare here; leaving is made observable by
# the short expiry of the final "draining" record.
ANNOUNCE = AnnounceConfig(ttl=60.0, refresh_interval=30.0, min_interval=0.2, leave_grace=1.0)
STAGGER = 0.15  # nodes start announcing one after another, as a devnet comes up


@dataclass
class Node:
    identity: Identity
    host: Host
    swarm: LiveSwarm
    announcer: Announcer | None = None
    go: trio.Event = field(default_factory=trio.Event)
    announcing: trio.Event = field(default_factory=trio.Event)
    stop: trio.Event = field(default_factory=trio.Event)


async def run_node(
    index: int, bootstrap: tuple[str, ...], *, task_status: trio.TaskStatus[Node]
) -> None:
    identity = Identity.generate()
    config = HostConfig(
        listen_addrs=("/ip4/127.0.0.1/tcp/0",),
        bootstrap=bootstrap,
        enable_mdns=False,
        enable_dht=False,
        bootstrap_retry=0.2,
    )
    async with open_host(identity, config) as host, open_swarm_view(
        host, MODEL, config=ANNOUNCE
    ) as swarm:
        node = Node(identity, host, swarm)
        task_status.started(node)
        await node.go.wait()
        info = ServingInfo(MODEL, index, index + 1, state=AnnounceState.ONLINE)
        async with open_announcer(host, info, config=ANNOUNCE) as announcer:
            node.announcer = announcer
            node.announcing.set()
            await node.stop.wait()


async def wait_until(predicate: object, *, timeout: float, poll: float = 0.02) -> float:
    """Poll ``predicate()`` until true; returns the seconds it took."""
    start = trio.current_time()
    with trio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(poll)
    return trio.current_time() - start


def latency(node: Node, peer: Node) -> float:
    """Seconds from ``peer`` building its current announcement to ``node`` accepting it."""
    ann = node.swarm.get(peer.identity.peer_id)
    accepted = node.swarm.accepted_at(peer.identity.peer_id)
    assert ann is not None and accepted is not None
    return accepted - (ann.expires_at - ANNOUNCE.ttl)


def sees(node: Node, peer: Node, *, seq: int | None = None) -> bool:
    ann = node.swarm.get(peer.identity.peer_id)
    return ann is not None and (seq is None or ann.seq >= seq)


async def test_twenty_node_overlay(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="p2p._announcer")
    nodes: list[Node] = []
    async with trio.open_nursery() as nursery:
        for i in range(N):
            hubs = tuple(n.host.listen_addrs()[0] for n in nodes[:HUBS])
            nodes.append(await nursery.start(run_node, i, hubs))

        # Bootstrap: everyone reached a hub and has gossip mesh peers on the topic.
        await wait_until(
            lambda: all(n.host.pubsub and len(n.host.pubsub.mesh_peers(TOPIC)) >= 2 for n in nodes),
            timeout=30,
        )

        # 1. Joins: nodes start announcing one after another; each announcement is seen
        # by every other node within 3 s of being published.
        for n in nodes:
            n.go.set()
            await n.announcing.wait()
            await trio.sleep(STAGGER)
        await wait_until(lambda: all(len(n.swarm.live()) == N for n in nodes), timeout=10.0)
        worst = max(latency(n, peer) for n in nodes for peer in nodes if peer is not n)
        assert worst < 3.0

        # 2. Any node's update reaches every other node within 3 s.
        for k in (0, 7, N - 1):
            announcer = nodes[k].announcer
            assert announcer is not None and announcer.current is not None
            before = announcer.current.seq
            announcer.update(dataclasses.replace(announcer.info, load=0.5 + k))
            await wait_until(lambda: announcer.current.seq > before, timeout=2.0)  # type: ignore[union-attr]
            seq = announcer.current.seq
            await wait_until(lambda: all(sees(n, nodes[k], seq=seq) for n in nodes), timeout=3.0)
            assert max(latency(n, nodes[k]) for n in nodes if n is not nodes[k]) < 3.0

        # 3. Forgeries reach nobody: node 5 claims to be node 7 (signed with its own key),
        # and announces a made-up peer. Its own validator is removed so the forged
        # messages actually leave it; the other nodes must drop them.
        forger, victim, ghost = nodes[5], nodes[7], Identity.generate()
        assert forger.host.pubsub is not None and victim.announcer is not None
        forger.host.pubsub.remove_validator(TOPIC)
        current = victim.announcer.current
        assert current is not None
        for claimed in (
            dataclasses.replace(current, seq=current.seq + 10**9, load=99.0),
            dataclasses.replace(current, peer=ghost.peer_id, seq=1),
        ):
            record = claimed.to_wire()
            signed = SignedAnnouncement(
                record=record, signature=forger.identity.sign(ANNOUNCE_DOMAIN, record)
            )
            await forger.host.pubsub.publish(TOPIC, signed.to_wire())
        # A genuine update from the forger, sent after the forgeries, reaches everyone.
        assert forger.announcer is not None
        forger.announcer.update(dataclasses.replace(forger.announcer.info, load=3.0))
        await wait_until(lambda: forger.announcer.current.load == 3.0, timeout=2.0)  # type: ignore[union-attr]
        marker = forger.announcer.current.seq  # type: ignore[union-attr]
        await wait_until(lambda: all(sees(n, forger, seq=marker) for n in nodes), timeout=3.0)
        for n in nodes:
            seen = n.swarm.get(victim.identity.peer_id)
            assert seen is not None and seen.load != 99.0
            assert n.swarm.get(ghost.peer_id) is None
        assert "not signed by that peer" in caplog.text

        # 4. A node that leaves disappears from every view (draining first, then gone).
        leaver = nodes[-1]
        leaver.stop.set()
        await wait_until(
            lambda: all(
                not sees(n, leaver)
                or n.swarm.get(leaver.identity.peer_id).state is AnnounceState.DRAINING  # type: ignore[union-attr]
                for n in nodes[:-1]
            ),
            timeout=3.0,
        )
        await wait_until(
            lambda: not any(sees(n, leaver) for n in nodes[:-1]),
            timeout=ANNOUNCE.leave_grace + 3.0,
        )
        assert all(len(n.swarm.live()) == N - 1 for n in nodes[:-1])

        for n in nodes:
            n.stop.set()
