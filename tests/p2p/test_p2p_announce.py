"""Announcements (sign/verify, DHT validator) and SwarmView, without any network."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from p2p import (
    ANNOUNCE_DOMAIN,
    Announcement,
    AnnouncementRecordValidator,
    AnnounceState,
    Identity,
    LocalProtocolError,
    MAX_ANNOUNCE_TTL,
    RemoteProtocolError,
    SignedAnnouncement,
    SwarmView,
    announce_key,
    announcement_validator,
    next_seq,
    sign_announcement,
    verify_announcement,
)

NOW = 1_700_000_000.0
ALICE = Identity.from_seed(b"\x0a" * 32)
MALLORY = Identity.from_seed(b"\x0b" * 32)
MODEL = "m" + "0" * 63


def ann(who: Identity = ALICE, **changes: object) -> Announcement:
    base = Announcement(
        peer=who.peer_id,
        addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{who.peer_id}",),
        model_id=MODEL,
        span_start=1,
        span_end=5,
        state=AnnounceState.ONLINE,
        compute_tps=120.0,
        network_tps=900.0,
        free_cache_tokens=4096,
        load=0.25,
        version="test",
        seq=10,
        expires_at=NOW + 30,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def forge(claimed: Announcement, signer: Identity) -> bytes:
    record = claimed.to_wire()
    return SignedAnnouncement(record=record, signature=signer.sign(ANNOUNCE_DOMAIN, record)).to_wire()


def test_sign_and_verify_round_trip() -> None:
    data = sign_announcement(ALICE, ann())
    assert verify_announcement(data, now=NOW) == ann()


def test_forgery_and_wrong_domain_are_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="not signed by that peer"):
        verify_announcement(forge(ann(ALICE), MALLORY), now=NOW, source="12D3KooWsrc")
    record = ann().to_wire()
    wrong_domain = SignedAnnouncement(record=record, signature=ALICE.sign(b"shardnet/receipt/1", record))
    with pytest.raises(RemoteProtocolError):
        verify_announcement(wrong_domain.to_wire(), now=NOW)
    tampered = bytearray(sign_announcement(ALICE, ann()))
    tampered[-70] ^= 1  # inside the record or the signature
    with pytest.raises(RemoteProtocolError):
        verify_announcement(bytes(tampered), now=NOW)
    with pytest.raises(LocalProtocolError):
        sign_announcement(MALLORY, ann(ALICE))


def test_expiry_bounds() -> None:
    with pytest.raises(RemoteProtocolError, match="expired"):
        verify_announcement(sign_announcement(ALICE, ann(expires_at=NOW - 1)), now=NOW)
    far = ann(expires_at=NOW + MAX_ANNOUNCE_TTL * 2)
    with pytest.raises(RemoteProtocolError, match="future"):
        verify_announcement(sign_announcement(ALICE, far), now=NOW)


@pytest.mark.parametrize(
    "change",
    [
        {"span_start": 5, "span_end": 5},
        {"span_start": -1},
        {"model_id": "has/slash"},
        {"load": -0.5},
        {"addrs": ("x",) * 17},
    ],
)
def test_invalid_announcements(change: dict[str, object]) -> None:
    bad = ann(**change)
    with pytest.raises(LocalProtocolError):
        sign_announcement(ALICE, bad)
    # the same record built by a hostile peer is rejected on arrival
    fields = dict(msgpack.unpackb(ann().to_wire(), raw=False)[2])
    key = next(iter(change))
    value = change[key]
    fields[key] = list(value) if isinstance(value, tuple) else value
    record = msgpack.packb(["p2p.Announcement", 1, fields], use_bin_type=True)
    data = SignedAnnouncement(record=record, signature=ALICE.sign(ANNOUNCE_DOMAIN, record)).to_wire()
    with pytest.raises(RemoteProtocolError):
        verify_announcement(data, now=NOW)


def test_gossip_validator_drops_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="p2p")
    validate = announcement_validator(MODEL, clock=lambda: NOW)
    assert validate(MALLORY.peer_id, sign_announcement(ALICE, ann()))
    assert not validate(MALLORY.peer_id, forge(ann(ALICE), MALLORY))
    assert not validate(MALLORY.peer_id, b"\x00garbage")
    assert not validate(None, sign_announcement(ALICE, ann(model_id="other")))
    assert str(MALLORY.peer_id) in caplog.text


def test_dht_validator_checks_key_and_keeps_highest_seq() -> None:
    validator = AnnouncementRecordValidator(clock=lambda: NOW)
    key = announce_key(MODEL, ALICE.peer_id)
    old, new = sign_announcement(ALICE, ann(seq=1)), sign_announcement(ALICE, ann(seq=2))
    validator.validate(key, new)
    with pytest.raises(RemoteProtocolError):
        validator.validate(announce_key(MODEL, MALLORY.peer_id), new)  # someone else's key
    with pytest.raises(RemoteProtocolError):
        validator.validate(announce_key("other", ALICE.peer_id), new)
    with pytest.raises(RemoteProtocolError):
        validator.validate(key, forge(ann(ALICE, seq=99), MALLORY))
    with pytest.raises(RemoteProtocolError):
        validator.validate("/shardnet/other/thing", new)
    assert validator.select(key, [old, new]) == 1
    assert validator.select(key, [new, old]) == 0
    assert validator.select(key, [forge(ann(ALICE, seq=99), MALLORY), old]) == 1


def test_next_seq_grows() -> None:
    first = next_seq(-1)
    assert next_seq(first) > first
    assert next_seq(first + 10**12) == first + 10**12 + 1


def test_swarm_view_dedups_orders_and_expires() -> None:
    view = SwarmView(MODEL)
    assert view.offer(ann(ALICE, seq=5), NOW)
    assert not view.offer(ann(ALICE, seq=5), NOW)  # duplicate
    assert not view.offer(ann(ALICE, seq=4), NOW)  # stale
    assert view.offer(ann(ALICE, seq=6, load=0.9), NOW)
    assert view.offer(ann(MALLORY, seq=1, expires_at=NOW + 5, state=AnnounceState.DRAINING), NOW)
    assert not view.offer(ann(MALLORY, seq=2, model_id="other"), NOW)
    assert not view.offer(ann(MALLORY, seq=3, expires_at=NOW - 1), NOW)
    live = view.live(NOW)
    assert [a.peer for a in live] == sorted([ALICE.peer_id, MALLORY.peer_id])
    assert view.get(ALICE.peer_id, NOW) == ann(ALICE, seq=6, load=0.9)
    assert [a.peer for a in view.live(NOW, include_draining=False)] == [ALICE.peer_id]
    assert [a.peer for a in view.live(NOW + 10)] == [ALICE.peer_id]  # MALLORY aged out
    assert view.live(NOW + 60) == ()
    assert len(view) == 0
