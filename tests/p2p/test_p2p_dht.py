"""Announcements through the strict Kademlia DHT (three hosts on loopback, no gossip)."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from dataclasses import replace

import pytest
import trio

from p2p import (
    ANNOUNCE_DOMAIN,
    AnnouncementFields,
    AnnouncementState,
    Announcer,
    HostConfig,
    Identity,
    LocalProtocolError,
    SignedAnnouncement,
    SwarmView,
    announcement_key,
    open_host,
    verify_announcement,
)

MODEL = "dht-test-model"


def config(bootstrap: tuple[str, ...] = ()) -> HostConfig:
    return HostConfig(
        listen_addrs=("/ip4/127.0.0.1/tcp/0",),
        bootstrap=bootstrap,
        enable_mdns=False,
        enable_pubsub=False,
        bootstrap_retry=0.2,
    )


async def test_announcements_are_found_in_the_dht_and_forgeries_are_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="libp2p")
    async with AsyncExitStack() as stack:
        boot = await stack.enter_async_context(open_host(Identity.generate(), config()))
        server, client = [
            await stack.enter_async_context(
                open_host(Identity.generate(), config((boot.listen_addrs()[0],)))
            )
            for _ in range(2)
        ]
        with trio.fail_after(10):
            await server.wait_bootstrapped()
            await client.wait_bootstrapped()
        announcer = Announcer(server, server.identity, model_id=MODEL, version="t", dht_every=1)
        fields = AnnouncementFields(0, 2, AnnouncementState.ONLINE, server.listen_addrs())
        with trio.fail_after(10):
            await announcer.publish(fields)

        # A newcomer with no gossip at all reads the swarm from the DHT.
        async with SwarmView.watch(client, MODEL, dht_every_s=0.5) as view:
            with trio.fail_after(10):
                while not view.live():
                    await view.wait_changed(0.2)
        assert [r.peer_id for r in view.live()] == [server.peer_id]

        # The client tries to store a record naming the server but signed by itself:
        # the strict validator refuses it before it goes anywhere.
        dht = client.dht
        assert dht is not None
        key = announcement_key(MODEL, server.peer_id)
        body = SignedAnnouncement.from_wire(announcer.sign(fields)).body
        forged = SignedAnnouncement(
            body=body, signature=client.identity.sign(ANNOUNCE_DOMAIN, body)
        )
        with pytest.raises(LocalProtocolError):
            await dht.put(key, forged.to_wire())
        with pytest.raises(LocalProtocolError):  # keys outside our namespace are refused too
            await dht.put("/elsewhere/x", b"anything")

        # Stale records lose: the stored value stays the newest genuine one.
        stale = announcer.sign(fields)
        fresh = announcer.sign(fields)  # signed later: a higher sequence number
        with trio.fail_after(10):
            await dht.put(key, fresh)
            with pytest.raises(LocalProtocolError):
                await dht.put(key, stale)
            value = await dht.get(key)
        assert value is not None
        assert verify_announcement(value).seq == verify_announcement(fresh).seq
    # Every lookup above reached the remote peers: py-libp2p's servers ignore a FIND_NODE
    # whose key is over 50 bytes, which our record keys must therefore not be.
    refused = [r.getMessage() for r in caplog.records if "FIND_NODE key" in r.getMessage()]
    assert refused == []
    assert len(announcement_key("m" * 64, server.peer_id)) <= 50


async def test_clients_that_came_and_went_are_not_kept_or_handed_out() -> None:
    # py-libp2p added every peer that queried it to its routing table and handed it out to
    # later peers, which dialed it long after it had left. Clients now read the DHT without
    # serving it, and tables admit only peers that identify as DHT servers.
    from libp2p.peer.id import ID

    async with open_host(Identity.generate(), config()) as boot:
        boot_addr = (boot.listen_addrs()[0],)
        assert boot.dht is not None
        table = boot.dht.kad.routing_table
        async with open_host(Identity.generate(), config(boot_addr)) as server:
            assert server.dht is not None
            await server.wait_bootstrapped()
            server_id = ID(server.peer_id.to_bytes())
            with trio.fail_after(10):  # a server is admitted once identify has said so
                while not table.peer_in_table(server_id):
                    await server.dht.get("/announcement/nothing/here")
            left: list[ID] = []
            for _ in range(3):
                client_config = replace(config(boot_addr), dht_server=False)
                async with open_host(Identity.generate(), client_config) as client:
                    assert client.dht is not None
                    await client.wait_bootstrapped()
                    with trio.fail_after(10):
                        assert await client.dht.get("/announcement/nothing/here") is None
                    left.append(ID(client.peer_id.to_bytes()))
            assert not any(table.peer_in_table(p) for p in left)
            assert not any(server.dht.kad.routing_table.peer_in_table(p) for p in left)
            newcomer_config = replace(config(boot_addr), dht_server=False)
            async with open_host(Identity.generate(), newcomer_config) as newcomer:
                assert newcomer.dht is not None
                await newcomer.wait_bootstrapped()
                with trio.fail_after(10):
                    await newcomer.dht.get("/announcement/nothing/here")
                assert not set(newcomer.libp2p.get_peerstore().peer_ids()) & set(left)


async def test_a_client_present_is_not_handed_out_to_newcomers() -> None:
    # A client offered its address in peer exchange, so a node joining while it was there
    # dialed it, put it in its routing table and later asked it DHT queries it cannot
    # answer (seen as "protocol not supported: /ipfs/kad/1.0.0" on every benchmark client).
    from libp2p.peer.id import ID

    async with open_host(Identity.generate(), config()) as boot:
        boot_addr = (boot.listen_addrs()[0],)
        client_config = replace(config(boot_addr), dht_server=False)
        async with open_host(Identity.generate(), client_config) as client:
            await client.wait_bootstrapped()
            assert boot.is_connected(client.peer_id)
            async with open_host(Identity.generate(), config(boot_addr)) as newcomer:
                assert newcomer.dht is not None
                await newcomer.wait_bootstrapped()  # its peer exchange and dials are done
                assert not newcomer.is_connected(client.peer_id)
                table = newcomer.dht.kad.routing_table
                assert not table.peer_in_table(ID(client.peer_id.to_bytes()))
