"""Announcements: signatures, sequence numbers, expiry, and a 20-node overlay on loopback."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

import pytest
import trio

from p2p import HostConfig, Identity, P2PError, open_host
from p2p._announcements import (
    Announcement,
    AnnouncementFields,
    AnnouncementState,
    Announcer,
    SignedAnnouncement,
    SwarmView,
    _DhtValidator,
    announcement_key,
    verify_announcement,
)

MODEL = "m" * 64


def _fields(start: int = 0, end: int = 4) -> AnnouncementFields:
    return AnnouncementFields(start=start, end=end, state=AnnouncementState.ONLINE,
                              addrs=("/ip4/127.0.0.1/tcp/1",), throughput=10.0,
                              free_cache_tokens=100, load=0.1)


class _Offline:
    """An announcer needs a host only to publish; signing works without one."""

    pubsub = None
    dht = None


def _announcer(identity: Identity, ttl_s: float = 10.0) -> Announcer:
    return Announcer(_Offline(), identity, model_id=MODEL, version="t",  # type: ignore[arg-type]
                     ttl_s=ttl_s)


def test_signed_records_verify_and_forgeries_do_not() -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    data = _announcer(alice).sign(_fields())
    body = verify_announcement(data)
    assert body.peer_id == alice.peer_id and body.state is AnnouncementState.ONLINE
    # Mallory signs a record that claims to be Alice's.
    signed = SignedAnnouncement.from_wire(data)
    forged = SignedAnnouncement(body=signed.body,
                                signature=mallory.sign(b"shardnet/announcement/1", signed.body))
    with pytest.raises(P2PError, match="bad signature"):
        verify_announcement(forged.to_wire())
    # A tampered body no longer matches Alice's signature.
    tampered_body = Announcement.from_wire(signed.body)
    import dataclasses

    evil = dataclasses.replace(tampered_body, load=0.0, free_cache_tokens=10**9).to_wire()
    with pytest.raises(P2PError, match="bad signature"):
        verify_announcement(SignedAnnouncement(body=evil, signature=signed.signature).to_wire())
    with pytest.raises(P2PError):
        verify_announcement(b"\x93garbage")


def test_the_view_keeps_the_newest_record_and_forgets_expired_ones() -> None:
    alice = Identity.generate()
    announcer = _announcer(alice, ttl_s=5.0)
    first, second = announcer.sign(_fields(0, 2)), announcer.sign(_fields(0, 3))
    view = SwarmView(MODEL)
    assert view.ingest(second) is not None
    assert view.ingest(first) is None  # stale sequence number
    assert [(r.start, r.end) for r in view.live()] == [(0, 3)]
    assert view.live(now=time.time() + 6) == []  # expired
    assert SwarmView("other-model").ingest(second) is None


def test_dht_validator_checks_key_signature_and_expiry() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    announcer = _announcer(alice)
    old, new = announcer.sign(_fields()), announcer.sign(_fields())
    v = _DhtValidator()
    v.validate(announcement_key(MODEL, alice.peer_id), new)
    with pytest.raises(ValueError, match="another peer"):
        v.validate(announcement_key(MODEL, bob.peer_id), new)
    with pytest.raises(ValueError, match="another peer"):
        v.validate(announcement_key("x" * 64, alice.peer_id), new)
    with pytest.raises(ValueError, match="expired"):
        v.validate(announcement_key(MODEL, alice.peer_id), _announcer(alice, ttl_s=-1).sign(
            _fields()))
    assert v.select("k", [old, b"junk", new]) == 2


async def test_twenty_node_overlay_sees_announcements_quickly_and_never_forgeries() -> None:
    n = 20
    loopback = ("/ip4/127.0.0.1/tcp/0",)
    with trio.fail_after(120):
        async with AsyncExitStack() as stack:
            boot = await stack.enter_async_context(open_host(
                Identity.generate(), HostConfig(listen_addrs=loopback, enable_mdns=False)))
            await stack.enter_async_context(SwarmView.watch(boot, None))  # the relay
            addr = boot.listen_addrs()[0]
            identities = [Identity.generate() for _ in range(n - 1)]
            hosts, views = [], []
            for identity in identities:
                host = await stack.enter_async_context(open_host(identity, HostConfig(
                    listen_addrs=loopback, bootstrap=(addr,), enable_mdns=False)))
                hosts.append(host)
                views.append(await stack.enter_async_context(SwarmView.watch(host, MODEL)))
            for host in hosts:
                with trio.fail_after(20):
                    await host.wait_bootstrapped()
            # Gossip meshes form over a few heartbeats: wait until a probe is seen everywhere.
            probe = Announcer(hosts[0], identities[0], model_id=MODEL, version="t")
            with trio.fail_after(30):
                while not all(identities[0].peer_id in v.records for v in views[1:]):
                    await probe.publish(_fields())
                    await views[-1].wait_changed(0.5)
            # Every node announces once; every other node must see every announcement in 3 s.
            started = trio.current_time()
            for host, identity in zip(hosts, identities, strict=True):
                await Announcer(host, identity, model_id=MODEL, version="t").publish(
                    _fields(1, 3))
            with trio.fail_after(3):
                while not all(len([r for r in v.live() if r.start == 1]) == n - 1
                              for v in views):
                    await views[0].wait_changed(0.1)
            assert trio.current_time() - started <= 3
            # A forged record (Mallory's signature on a record naming node 1) reaches no view.
            mallory = Identity.generate()
            signed = SignedAnnouncement.from_wire(
                Announcer(hosts[1], identities[1], model_id=MODEL, version="t").sign(
                    _fields(0, 1)))
            forged = SignedAnnouncement(body=signed.body, signature=mallory.sign(
                b"shardnet/announcement/1", signed.body)).to_wire()
            pubsub = hosts[2].pubsub
            assert pubsub is not None
            await pubsub.publish("/shardnet/announce/1", forged)
            # A genuine record published after the forgery arrives; the forgery never does.
            await Announcer(hosts[3], identities[3], model_id=MODEL, version="t").publish(
                _fields(2, 4))
            with trio.fail_after(3):
                while not all(any(r.start == 2 for r in v.live()) for v in views):
                    await views[0].wait_changed(0.1)
            assert not any(r.start == 0 and r.end == 1 for v in views for r in v.live())
