"""Signed announcements: who serves which stages of which model, and how well.

Theory of operation
-------------------
An :class:`Announcement` is a frozen message describing one serving node. It travels
wrapped in a :class:`SignedAnnouncement`: the announcement's exact wire bytes plus an
Ed25519 signature by the announcing peer's key under the domain
:data:`ANNOUNCE_DOMAIN`. Because an Ed25519 peer id embeds its public key, verifying
needs nothing but the record itself: the signature must verify against the key inside
``announcement.peer``, so a record signed by anyone else (a forgery) or naming a peer
id that does not match its signer is rejected.

Freshness: ``seq`` grows with every change (it starts from the wall clock in
microseconds, so it also grows across restarts), and ``expires_at`` (unix seconds)
bounds how long a record may be believed. Expired records and records claiming an
expiry implausibly far in the future are rejected; among valid records for the same
peer, the highest ``seq`` wins.

The same signed bytes are gossiped on the model's pubsub topic
(:func:`announce_topic`) and stored in the DHT under :func:`announce_key`, whose
:class:`AnnouncementRecordValidator` enforces all of the above for the strict DHT.
Everything here is pure (no I/O); times are passed in.
"""

from __future__ import annotations

import enum
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from p2p._errors import LocalProtocolError, RemoteProtocolError
from p2p._identity import Identity
from p2p._messages import Message, WireLimits, message
from p2p._peer_id import InvalidPeerIdError, PeerId

__all__ = [
    "ANNOUNCE_DOMAIN",
    "ANNOUNCE_NAMESPACE",
    "MAX_ANNOUNCE_TTL",
    "AnnounceState",
    "Announcement",
    "SignedAnnouncement",
    "AnnouncementRecordValidator",
    "announce_key",
    "announce_topic",
    "model_key",
    "next_seq",
    "sign_announcement",
    "verify_announcement",
]

logger = logging.getLogger(__name__)

ANNOUNCE_DOMAIN = b"shardnet/announce/1"
ANNOUNCE_NAMESPACE = "shardnet"
MAX_ANNOUNCE_TTL = 3600.0
# Peers' clocks disagree; a record may claim this much more than MAX_ANNOUNCE_TTL.
CLOCK_SKEW = 60.0
MAX_SIGNED_ANNOUNCEMENT_BYTES = 8 * 1024
ANNOUNCE_LIMITS = WireLimits(max_frame_bytes=MAX_SIGNED_ANNOUNCEMENT_BYTES, max_collection_len=64)

_MODEL_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_MAX_STAGE = 1 << 20
_MAX_ADDRS = 16
_MAX_ADDR_LEN = 256


class AnnounceState(enum.Enum):
    """Lifecycle of a serving node."""

    JOINING = "joining"
    """Loading weights; not ready for sessions yet."""
    ONLINE = "online"
    """Serving."""
    DRAINING = "draining"
    """Leaving: finishing current sessions, accepting no new ones."""


def _check_model_id(model_id: str) -> None:
    if not _MODEL_ID.fullmatch(model_id):
        raise ValueError("model_id must be 1..128 chars of [A-Za-z0-9._-]")


@message("p2p.Announcement", 1)
@dataclass(frozen=True, slots=True)
class Announcement(Message):
    """What a serving node tells the swarm about itself.

    Attributes:
        peer: the announcing node.
        addrs: multiaddrs (with ``/p2p/<id>``) where it can be dialed.
        model_id: the model's manifest hash.
        span_start: first stage served (inclusive).
        span_end: stage after the last one served (exclusive).
        state: joining / online / draining.
        compute_tps: tokens per second its span computes (estimate).
        network_tps: tokens per second its links can carry (estimate).
        free_cache_tokens: KV-cache tokens it can still accept.
        load: queue utilization (0 idle, 1 saturated, may exceed 1).
        version: software version string.
        seq: sequence number; higher replaces lower.
        expires_at: unix time after which the record is void.
    """

    peer: PeerId
    addrs: tuple[str, ...]
    model_id: str
    span_start: int
    span_end: int
    state: AnnounceState
    compute_tps: float
    network_tps: float
    free_cache_tokens: int
    load: float
    version: str
    seq: int
    expires_at: float

    def validate(self, limits: WireLimits) -> None:
        _check_model_id(self.model_id)
        if not 0 <= self.span_start < self.span_end <= _MAX_STAGE:
            raise ValueError("span must satisfy 0 <= start < end")
        if len(self.addrs) > _MAX_ADDRS or any(len(a) > _MAX_ADDR_LEN for a in self.addrs):
            raise ValueError("too many or too long addresses")
        if min(self.compute_tps, self.network_tps, self.load) < 0:
            raise ValueError("throughput and load must be >= 0")
        if self.free_cache_tokens < 0 or self.seq < 0 or self.expires_at <= 0:
            raise ValueError("free_cache_tokens, seq and expires_at must be positive")
        if len(self.version) > 64:
            raise ValueError("version too long")

    def is_expired(self, now: float) -> bool:
        """True once ``now`` (unix seconds) has reached the expiry."""
        return now >= self.expires_at


@message("p2p.SignedAnnouncement", 1)
@dataclass(frozen=True, slots=True)
class SignedAnnouncement(Message):
    """An announcement's wire bytes and the announcing peer's signature over them."""

    record: bytes
    signature: bytes


def announce_topic(model_id: str) -> str:
    """The gossipsub topic where announcements for ``model_id`` travel."""
    _check_model_id(model_id)
    return f"/shardnet/announce/1/{model_id}"


def announce_key(model_id: str, peer: PeerId) -> str:
    """The DHT key of ``peer``'s announcement for ``model_id``."""
    _check_model_id(model_id)
    return f"/{ANNOUNCE_NAMESPACE}/ann/{model_id}/{peer}"


def model_key(model_id: str) -> str:
    """The DHT provider key under which servers of ``model_id`` advertise."""
    _check_model_id(model_id)
    return f"/{ANNOUNCE_NAMESPACE}/model/{model_id}"


def next_seq(previous: int) -> int:
    """A sequence number above ``previous`` that also grows across restarts."""
    return max(previous + 1, time.time_ns() // 1000)


def sign_announcement(identity: Identity, announcement: Announcement) -> bytes:
    """Sign and encode an announcement (the bytes to gossip and store).

    Raises:
        LocalProtocolError: the announcement names another peer, or is invalid.
    """
    if announcement.peer != identity.peer_id:
        raise LocalProtocolError("an announcement can only be signed by its own peer")
    record = announcement.to_wire(ANNOUNCE_LIMITS)
    signed = SignedAnnouncement(record=record, signature=identity.sign(ANNOUNCE_DOMAIN, record))
    return signed.to_wire(ANNOUNCE_LIMITS)


def verify_announcement(data: bytes, *, now: float, source: str | None = None) -> Announcement:
    """Decode and verify signed announcement bytes.

    Args:
        data: the signed announcement as gossiped or stored.
        now: current unix time.
        source: the peer we got it from, for error messages.

    Raises:
        RemoteProtocolError: malformed, badly signed, expired, or with an implausible
            expiry.
    """
    if len(data) > MAX_SIGNED_ANNOUNCEMENT_BYTES:
        raise RemoteProtocolError("signed announcement too large", peer=source)
    signed = SignedAnnouncement.from_wire(data, ANNOUNCE_LIMITS)
    announcement = Announcement.from_wire(signed.record, ANNOUNCE_LIMITS)
    if not announcement.peer.verify(ANNOUNCE_DOMAIN, signed.record, signed.signature):
        raise RemoteProtocolError(
            f"announcement for {announcement.peer} is not signed by that peer", peer=source
        )
    if announcement.is_expired(now):
        raise RemoteProtocolError(f"announcement of {announcement.peer} expired", peer=source)
    if announcement.expires_at > now + MAX_ANNOUNCE_TTL + CLOCK_SKEW:
        raise RemoteProtocolError(
            f"announcement of {announcement.peer} expires too far in the future", peer=source
        )
    return announcement


class AnnouncementRecordValidator:
    """DHT validator for ``/shardnet/ann/<model>/<peer>`` keys (see module docstring).

    Args:
        clock: unix-time source (injectable for tests).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock

    def validate(self, key: str, value: bytes) -> None:
        parts = key.split("/")
        # ["", "shardnet", "ann", model_id, peer]
        if len(parts) != 5 or parts[1] != ANNOUNCE_NAMESPACE or parts[2] != "ann":
            raise RemoteProtocolError(f"unknown shardnet DHT key {key[:80]!r}")
        announcement = verify_announcement(value, now=self._clock())
        try:
            key_peer = PeerId.from_string(parts[4])
        except InvalidPeerIdError as exc:
            raise RemoteProtocolError(f"bad peer id in DHT key {key[:80]!r}") from exc
        if announcement.model_id != parts[3] or announcement.peer != key_peer:
            raise RemoteProtocolError(f"announcement does not belong under {key[:80]!r}")

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_seq = 0, -1
        now = self._clock()
        for i, value in enumerate(values):
            try:
                seq = verify_announcement(value, now=now).seq
            except RemoteProtocolError:
                continue
            if seq > best_seq:
                best, best_seq = i, seq
        return best
