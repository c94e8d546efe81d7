"""A 20-node gossip overlay on loopback, in one trio run (a bootstrap and 19 serving nodes).

After bootstrap: every announcement reaches every other node within 3 s, a forged
announcement reaches nobody, and a node that leaves disappears from every view.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import trio

from p2p import (
    ANNOUNCE_DOMAIN,
    ANNOUNCE_TOPIC,
    AnnouncementFields,
    AnnouncementState,
    Announcer,
    Host,
    HostConfig,
    Identity,
    SignedAnnouncement,
    SwarmView,
    open_host,
)

N = 20  # hosts: one bootstrap (relays, serves nothing) and N - 1 serving nodes
MODEL = "overlay-test-model"
TTL = 60.0
# All 20 hosts share one process and one core here, ~20x a real node's load: py-libp2p
# spends ~10 ms of CPU per node per announcement, so nodes join a little apart (as a
# devnet does when its processes come up) instead of all in the same instant.
STAGGER = 0.5


@dataclass
class Node:
    identity: Identity
    host: Host
    view: SwarmView
    announcer: Announcer | None
    stop: trio.Event = field(default_factory=trio.Event)

    def fields(self, state: AnnouncementState, load: float = 0.1) -> AnnouncementFields:
        return AnnouncementFields(
            start=0, end=4, state=state, addrs=self.host.listen_addrs(), load=load
        )


async def run_node(
    bootstrap: tuple[str, ...], serving: bool, *, task_status: trio.TaskStatus[Node]
) -> None:
    identity = Identity.generate()
    config = HostConfig(
        listen_addrs=("/ip4/127.0.0.1/tcp/0",),
        bootstrap=bootstrap,
        enable_mdns=False,
        enable_dht=False,
        bootstrap_retry=0.2,
    )
    async with (
        open_host(identity, config) as host,
        SwarmView.watch(host, MODEL if serving else None) as view,
    ):
        announcer = (
            Announcer(host, identity, model_id=MODEL, version="test", ttl_s=TTL)
            if serving
            else None
        )
        node = Node(identity, host, view, announcer)
        task_status.started(node)
        await node.stop.wait()


async def wait_until(predicate: Callable[[], bool], *, within: float) -> None:
    """Poll ``predicate`` every 20 ms until it holds; fail after ``within`` seconds."""
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - the condition spans many views
            await trio.sleep(0.02)


def latency(node: Node, peer: Node) -> float:
    """Seconds from ``peer`` signing its current record to ``node`` accepting it."""
    record = node.view.get(peer.identity.peer_id)
    accepted = node.view.accepted_at(peer.identity.peer_id)
    assert record is not None and accepted is not None
    return accepted - (record.expires_at - TTL)


def sees(node: Node, peer: Node, *, seq: int = 0) -> bool:
    record = node.view.get(peer.identity.peer_id)
    return record is not None and record.seq >= seq


async def test_twenty_node_overlay(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="p2p._announcements")
    async with trio.open_nursery() as nursery:
        boot: Node = await nursery.start(run_node, (), False)
        nodes: list[Node] = [boot]
        for _ in range(N - 1):
            nodes.append(await nursery.start(run_node, (boot.host.listen_addrs()[0],), True))
        servers = nodes[1:]

        # Bootstrap: everyone reached the bootstrap, met more peers by peer exchange,
        # and has gossip mesh peers on the topic.
        with trio.fail_after(30):
            for n in nodes:
                await n.host.wait_bootstrapped()
        await wait_until(
            lambda: all(
                n.host.pubsub is not None and len(n.host.pubsub.mesh_peers(ANNOUNCE_TOPIC)) >= 3
                for n in nodes
            ),
            within=30,
        )

        # 1. Joins: each serving node's announcement reaches every other node within 3 s.
        for s in servers:
            assert s.announcer is not None
            await s.announcer.publish(s.fields(AnnouncementState.ONLINE))
            await trio.sleep(STAGGER)
        await wait_until(lambda: all(len(n.view.live()) == N - 1 for n in nodes), within=10)
        assert max(latency(n, s) for n in nodes for s in servers if n is not s) < 3.0

        # 2. Updates: a changed announcement reaches every other node within 3 s.
        for s in (servers[0], servers[9], servers[-1]):
            assert s.announcer is not None
            await s.announcer.publish(s.fields(AnnouncementState.ONLINE, load=0.9))
            seq = s.announcer.last.seq  # type: ignore[union-attr]
            await wait_until(lambda: all(sees(n, s, seq=seq) for n in nodes), within=3.0)  # noqa: B023
            assert max(latency(n, s) for n in nodes if n is not s) < 3.0

        # 3. Forgeries reach nobody: node 5 claims to be node 7 (signing with its own key)
        # and announces a made-up peer. Its own validator is removed so the forgeries
        # actually leave it; every other node must drop them at the first hop.
        forger, victim, ghost = servers[5], servers[7], Identity.generate()
        assert forger.host.pubsub is not None and victim.announcer is not None
        forger.host.pubsub.remove_validator(ANNOUNCE_TOPIC)
        genuine = SignedAnnouncement.from_wire(
            victim.announcer.sign(victim.fields(AnnouncementState.DRAINING, load=1.0))
        )
        ghost_record = SignedAnnouncement.from_wire(
            Announcer(forger.host, ghost, model_id=MODEL, version="x").sign(
                forger.fields(AnnouncementState.ONLINE)
            )
        )
        for body in (genuine.body, ghost_record.body):
            forged = SignedAnnouncement(
                body=body, signature=forger.identity.sign(ANNOUNCE_DOMAIN, body)
            )
            await forger.host.pubsub.publish(ANNOUNCE_TOPIC, forged.to_wire())
        assert forger.announcer is not None  # a genuine record sent after the forgeries
        await forger.announcer.publish(forger.fields(AnnouncementState.ONLINE, load=0.3))
        marker = forger.announcer.last.seq  # type: ignore[union-attr]
        await wait_until(lambda: all(sees(n, forger, seq=marker) for n in nodes), within=3.0)
        for n in nodes:
            held = n.view.get(victim.identity.peer_id)
            assert held is not None and held.state is AnnouncementState.ONLINE
            assert n.view.get(ghost.peer_id) is None
        assert "bad signature" in caplog.text

        # 4. A node that leaves announces draining with a short expiry, stops, and
        # disappears from every view (even where the draining record arrives expired,
        # it supersedes the node's long-lived online record).
        leaver = servers[-1]
        assert leaver.announcer is not None
        await leaver.announcer.publish(leaver.fields(AnnouncementState.DRAINING), ttl_s=1.0)
        leaver.stop.set()
        rest = [n for n in nodes if n is not leaver]
        await wait_until(lambda: not any(sees(n, leaver) for n in rest), within=4.0)
        assert all(len(n.view.live()) == N - 2 for n in rest)

        for n in nodes:
            n.stop.set()
