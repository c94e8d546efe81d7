"""Control messages of the session and RPC protocols.

They are ordinary registered messages (one encoding for everything), under names in
the reserved ``p2p.`` prefix. Session streams consume them internally; application
code never sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2p._messages import Message, WireLimits, message

__all__ = ["Ping", "Credit", "Goodbye", "RpcFailure"]

_MAX_REASON = 256


@message("p2p.Ping", 1)
@dataclass(frozen=True, slots=True)
class Ping(Message):
    """A heartbeat: sent when a side has had nothing else to send for a while.

    `dead_after` is the sender's own silence limit (0 = not said): the receiver then pings
    at least four times within it, so two sides configured differently do not declare each
    other dead while both are healthy. Each side sends one ping when the session opens.
    """

    dead_after: float = 0.0

    def validate(self, limits: WireLimits) -> None:
        if not 0.0 <= self.dead_after <= 86400.0:  # NaN fails too
            raise ValueError("dead_after out of range")


@message("p2p.Credit", 1)
@dataclass(frozen=True, slots=True)
class Credit(Message):
    """Flow control: the sender of this frame may now receive ``amount`` more bytes."""

    amount: int

    def validate(self, limits: WireLimits) -> None:
        if not 0 < self.amount <= 1 << 40:
            raise ValueError("credit must be positive and sane")


@message("p2p.Goodbye", 1)
@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    """A clean end of the session: nothing more will be sent on this stream."""

    reason: str = ""

    def validate(self, limits: WireLimits) -> None:
        if len(self.reason) > _MAX_REASON:
            raise ValueError("goodbye reason too long")


@message("p2p.RpcFailure", 1)
@dataclass(frozen=True, slots=True)
class RpcFailure(Message):
    """An RPC handler refused a request (a declared code, never a stack trace)."""

    code: str
    detail: str = ""

    def validate(self, limits: WireLimits) -> None:
        if not 0 < len(self.code) <= 64 or len(self.detail) > _MAX_REASON:
            raise ValueError("rpc failure code/detail too long")
