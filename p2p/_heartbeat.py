"""Sans-IO liveness bookkeeping for long-lived streams.

libp2p never notices a frozen peer (SIGSTOP, a laptop lid closed mid-session, a
silent partition): the TCP connection stays up and reads just block. So each side of
a session sends *something* at least every ``ping_interval`` (a :class:`~p2p._control.Ping`
when it has nothing else to say), and declares the peer dead when *no byte at all*
has arrived for ``dead_after`` seconds. Any received byte counts, so a long frame that
is still trickling in on a slow link keeps the peer alive.

Times are plain floats from whatever clock the caller uses (``trio.current_time()``
in the adapter, a fake in tests).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Liveness"]


@dataclass(slots=True)
class Liveness:
    """When to ping, and when to give up on the peer.

    Attributes:
        dead_after: seconds of total silence after which the peer is dead.
        ping_interval: seconds of our own silence after which we send a ping; must be
            well under ``dead_after`` so one late ping does not kill the session.
        last_receive: clock time of the last byte received.
        last_send: clock time of the last frame sent.
    """

    dead_after: float
    ping_interval: float
    last_receive: float
    last_send: float

    @classmethod
    def start(
        cls, now: float, *, dead_after: float, ping_interval: float | None = None
    ) -> Liveness:
        """Begin tracking at ``now`` (the session just opened).

        Raises:
            ValueError: non-positive timings or a ping interval not below dead_after.
        """
        interval = dead_after / 4 if ping_interval is None else ping_interval
        if dead_after <= 0 or not 0 < interval < dead_after:
            raise ValueError("need 0 < ping_interval < dead_after")
        return cls(dead_after=dead_after, ping_interval=interval, last_receive=now, last_send=now)

    def on_receive(self, now: float) -> None:
        """Record that bytes arrived."""
        self.last_receive = now

    def on_send(self, now: float) -> None:
        """Record that a frame went out."""
        self.last_send = now

    def dead_at(self) -> float:
        """Clock time at which the peer is declared dead if nothing more arrives."""
        return self.last_receive + self.dead_after

    def is_dead(self, now: float) -> bool:
        """True once the peer has been silent for ``dead_after``."""
        return now >= self.dead_at()

    def ping_at(self) -> float:
        """Clock time at which we must send a ping if we send nothing else."""
        return self.last_send + self.ping_interval

    def ping_due(self, now: float) -> bool:
        """True when we have been silent for ``ping_interval``."""
        return now >= self.ping_at()
