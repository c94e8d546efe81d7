"""Announcements: signatures, sequence numbers, expiry (the 20-node overlay is in
test_p2p_overlay.py)."""

from __future__ import annotations

import dataclasses
import logging
import time

import msgpack
import pytest

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
