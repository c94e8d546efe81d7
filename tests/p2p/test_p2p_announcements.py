"""Announcements: signatures, sequence numbers, expiry (the 20-node overlay is in
test_p2p_overlay.py)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from p2p import Identity, LocalProtocolError, P2PError, RemoteProtocolError
from p2p._announcements import (
    DOMAIN,
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
    return AnnouncementFields(
        start=start,
        end=end,
        state=AnnouncementState.ONLINE,
        addrs=("/ip4/127.0.0.1/tcp/1",),
        throughput=10.0,
        free_cache_tokens=100,
        load=0.1,
    )


class _Offline:
    """An announcer needs a host only to publish; signing works without one."""

    pubsub = None
    dht = None


def _announcer(identity: Identity, ttl_s: float = 10.0) -> Announcer:
    return Announcer(
        _Offline(),
        identity,
        model_id=MODEL,
        version="t",  # type: ignore[arg-type]
        ttl_s=ttl_s,
    )


def test_signed_records_verify_and_forgeries_do_not() -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    data = _announcer(alice).sign(_fields())
    body = verify_announcement(data)
    assert body.peer_id == alice.peer_id and body.state is AnnouncementState.ONLINE
    # Mallory signs a record that claims to be Alice's.
    signed = SignedAnnouncement.from_wire(data)
    forged = SignedAnnouncement(
        body=signed.body, signature=mallory.sign(b"shardnet/announcement/1", signed.body)
    )
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
        v.validate(
            announcement_key(MODEL, alice.peer_id), _announcer(alice, ttl_s=-1).sign(_fields())
        )
    assert v.select("k", [old, b"junk", new]) == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("start", 4),
        ("load", 1.5),
        ("model_id", "has/slash"),
        ("addrs", ["x"] * 17),
        ("throughput", -1.0),
        ("throughput", float("nan")),
        ("throughput", float("inf")),
        ("load", float("nan")),
        ("seq", "1"),
    ],
)
def test_invalid_records_are_refused_on_both_sides(field: str, value: object) -> None:
    alice = Identity.generate()
    good = SignedAnnouncement.from_wire(_announcer(alice).sign(_fields()))
    fields = dict(msgpack.unpackb(good.body, raw=False)[2])
    fields[field] = value
    body = msgpack.packb(["shardnet.Announcement", 1, fields], use_bin_type=True)
    hostile = SignedAnnouncement(body=body, signature=alice.sign(DOMAIN, body)).to_wire()
    with pytest.raises(RemoteProtocolError):
        verify_announcement(hostile)
    if field not in ("seq", "addrs"):
        local = dataclasses.replace(Announcement.from_wire(good.body), **{field: value})
        with pytest.raises(LocalProtocolError):
            local.to_wire()


def test_expiry_bounds() -> None:
    alice = Identity.generate()
    with pytest.raises(RemoteProtocolError, match="expired"):
        verify_announcement(_announcer(alice, ttl_s=-1).sign(_fields()))
    far = _announcer(alice)
    far.ttl_s = 10 * 3600
    with pytest.raises(RemoteProtocolError, match="implausible"):
        verify_announcement(far.sign(_fields()))


def test_dropped_records_are_logged_with_their_source(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="p2p")
    alice, mallory = Identity.generate(), Identity.generate()
    body = SignedAnnouncement.from_wire(_announcer(alice).sign(_fields())).body
    forged = SignedAnnouncement(body=body, signature=mallory.sign(DOMAIN, body)).to_wire()
    view = SwarmView(MODEL)
    assert view.ingest(forged, source=str(mallory.peer_id)) is None
    assert view.ingest(b"\x00junk", source=str(mallory.peer_id)) is None
    assert view.dropped == 2 and view.live() == []
    assert str(mallory.peer_id) in caplog.text and "bad signature" in caplog.text


def test_a_record_that_expired_in_transit_still_supersedes_the_older_one() -> None:
    alice = Identity.generate()
    announcer = _announcer(alice, ttl_s=60.0)
    online = announcer.sign(_fields())
    leaving = announcer.sign(_fields(), ttl_s=1.0)  # a short-lived draining record...
    view = SwarmView(MODEL, clock=lambda: time.time() + 2.0)  # ...that arrives 2 s late
    assert view.ingest(online) is not None
    assert view.ingest(leaving) is None
    assert view.live() == []
    # Long expired (replayed) records are plain drops.
    late = SwarmView(MODEL, clock=lambda: time.time() + 120.0)
    assert late.ingest(leaving) is None and late.dropped == 1


# --- publishing: gossip at once, the DHT from the announcer's own task ------------------


class _SlowDht:
    """A DHT whose stores take ``put_s`` seconds (a DHT waiting on far peers)."""

    def __init__(self, put_s: float) -> None:
        self.put_s = put_s
        self.stored: list[tuple[float, Announcement]] = []  # (clock when done, record)
        self.provided = 0

    def register_validator(self, namespace: str, validator: object) -> None:
        pass

    async def put(self, key: str, value: bytes) -> None:
        await trio.sleep(self.put_s)
        self.stored.append((trio.current_time(), verify_announcement(value)))

    async def provide(self, key: str) -> None:
        self.provided += 1


class _Gossip:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def publish(self, topic: str, data: bytes) -> None:
        self.sent.append(data)


class _Host:
    def __init__(self, put_s: float) -> None:
        self.pubsub = _Gossip()
        self.dht = _SlowDht(put_s)


def _publishing(host: _Host, **kwargs: Any) -> Announcer:
    return Announcer(
        host,  # type: ignore[arg-type]
        Identity.generate(),
        model_id=MODEL,
        version="t",
        **kwargs,
    )


def _state(state: AnnouncementState, load: float = 0.1) -> AnnouncementFields:
    return dataclasses.replace(_fields(), state=state, load=load)


async def test_publish_does_not_wait_for_the_dht(autojump_clock: trio.testing.MockClock) -> None:
    host = _Host(put_s=4.0)
    announcer = _publishing(host, dht_every=1)
    async with announcer.running():
        start = trio.current_time()
        await announcer.publish(_state(AnnouncementState.JOINING))
        await trio.sleep(1)  # its store is under way
        await announcer.publish(_state(AnnouncementState.ONLINE))
        await announcer.publish(_state(AnnouncementState.ONLINE, load=0.5))
        assert trio.current_time() - start == 1  # gossiped at once, the store is pending
        assert len(host.pubsub.sent) == 3
        await trio.sleep(10)
    # The first store took 4 s; meanwhile two more records came, the latest one won.
    assert [(t - start, r.state, r.load) for t, r in host.dht.stored] == [
        (4.0, AnnouncementState.JOINING, 0.1),
        (8.0, AnnouncementState.ONLINE, 0.5),
    ]
    assert host.dht.provided == 1 and announcer.dht_stores == 2

    # Without `running`, a publish still stores inline (bounded), as it always did.
    slow = _Host(put_s=60.0)
    inline = _publishing(slow)
    start = trio.current_time()
    await inline.publish(_fields())
    assert trio.current_time() - start == pytest.approx(5.0)
    assert slow.dht.stored == [] and inline.dht_failures == 1


async def test_keep_publishing_keeps_the_dht_record_fresh(
    autojump_clock: trio.testing.MockClock,
) -> None:
    host = _Host(put_s=1.0)
    # Every 5th of 2 s publications would be a store every 10 s: the whole 10 s
    # lifetime. The half-life rule stores more often than that.
    announcer = _publishing(host, ttl_s=10.0, dht_every=5)
    state = AnnouncementState.JOINING
    start = trio.current_time()
    with trio.move_on_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(announcer.keep_publishing, lambda: _state(state), 2.0)
            await trio.sleep(20)
            state = AnnouncementState.ONLINE
    times = [t - start for t, _ in host.dht.stored]
    assert times[0] == pytest.approx(3.0)  # the first publication (at 2 s) and its put
    # Never a gap near the record's 10 s lifetime: half of it, plus a publication
    # interval and a put at most.
    assert max(b - a for a, b in zip(times, times[1:], strict=False)) <= 10.0 / 2 + 2.0 + 1.0
    # The state change was stored at the next publication, not the next 5th.
    changed = next(t for t, r in host.dht.stored if r.state is AnnouncementState.ONLINE)
    assert changed - start <= 20.0 + 2.0 + 1.0
