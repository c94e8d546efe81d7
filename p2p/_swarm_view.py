"""The set of live announcements for one model, as a pure data structure.

:class:`SwarmView` is what routing and span selection read: one announcement per peer
(the highest ``seq`` seen), expired ones pruned, sorted by peer id so that every
decision made from it is deterministic. It does no I/O and never looks at a clock;
callers pass ``now`` (unix seconds). Records must be verified before they are offered
(:func:`~p2p.verify_announcement`); the view only enforces model, freshness and order.
"""

from __future__ import annotations

from p2p._announce import Announcement, AnnounceState
from p2p._peer_id import PeerId

__all__ = ["SwarmView"]


class SwarmView:
    """Live announcements for ``model_id``, deduplicated per peer.

    Args:
        model_id: the model whose servers this view tracks.
    """

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self._by_peer: dict[PeerId, Announcement] = {}
        self.version = 0  # bumped on every change, for cheap change detection

    def offer(self, announcement: Announcement, now: float) -> bool:
        """Take a verified announcement; True if it changed the view.

        Ignored: another model's record, an expired record, or one whose ``seq`` is
        not above what we already hold for that peer (a stale or replayed record).
        """
        if announcement.model_id != self.model_id or announcement.is_expired(now):
            return False
        current = self._by_peer.get(announcement.peer)
        if current is not None and announcement.seq <= current.seq:
            return False
        self._by_peer[announcement.peer] = announcement
        self.version += 1
        return True

    def expire(self, now: float) -> list[PeerId]:
        """Drop expired records; returns the peers that disappeared."""
        gone = sorted(p for p, a in self._by_peer.items() if a.is_expired(now))
        for peer in gone:
            del self._by_peer[peer]
        if gone:
            self.version += 1
        return gone

    def live(self, now: float, *, include_draining: bool = True) -> tuple[Announcement, ...]:
        """Unexpired announcements sorted by peer id (expired ones are pruned)."""
        self.expire(now)
        return tuple(
            a
            for _, a in sorted(self._by_peer.items())
            if include_draining or a.state is not AnnounceState.DRAINING
        )

    def get(self, peer: PeerId, now: float) -> Announcement | None:
        """The live announcement of ``peer``, if any."""
        announcement = self._by_peer.get(peer)
        if announcement is None or announcement.is_expired(now):
            return None
        return announcement

    def next_expiry(self) -> float | None:
        """The earliest ``expires_at`` held, for scheduling the next prune."""
        return min((a.expires_at for a in self._by_peer.values()), default=None)

    def __len__(self) -> int:
        return len(self._by_peer)
