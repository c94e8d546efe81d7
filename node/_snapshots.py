"""Frozen snapshots of the swarm that the node's pure decisions read.

Theory of operation: routing (`_routing`) and span choice (`_span_choice`) are pure functions.
They never see an announcement, a DHT record or a loaded model; an adapter (written with the
node layer) turns each verified announcement into a `PeerSnapshot` and hands the decisions a
plain iterable of them. Keeping the input this small makes the decisions testable on synthetic
swarms of thousands of peers and keeps `node`'s decision code free of `p2p`/`sharding` internals.

Every snapshot validates itself on construction: a value that came from a peer is checked here
once, so the decisions can do arithmetic on it without re-checking.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import TypeGuard


class PeerState(enum.StrEnum):
    """What a peer says it is doing, as in its announcement.

    Only `ONLINE` peers carry traffic. `JOINING` peers are loading their span: they count
    toward the swarm's throughput when a node picks its own span (they will serve soon), but
    routing never sends them work. `DRAINING` peers are leaving: neither counts them.
    """

    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"


@dataclass(frozen=True, slots=True)
class StageSpan:
    """A contiguous range `[start, end)` of a model's stages (0 = embedding, L+1 = head).

    Named `StageSpan` rather than `Span` so that it cannot be mistaken for `sharding.Span`,
    the loaded, runnable module.
    """

    start: int
    end: int

    def __post_init__(self) -> None:
        _check_span(self.start, self.end, what="span")

    @property
    def length(self) -> int:
        """Number of stages in the span."""
        return self.end - self.start

    @property
    def stages(self) -> range:
        """The stage numbers in the span, in order."""
        return range(self.start, self.end)

    def __contains__(self, stage: object) -> bool:
        return isinstance(stage, int) and self.start <= stage < self.end


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerSnapshot:
    """One peer as the decisions see it: its announcement, already verified.

    Attributes:
        peer_id: The peer's id (libp2p peer id, as text). Decisions sort by it to break ties.
        model_id: The model the peer serves (hash of the model manifest).
        start: First stage the peer serves.
        end: One past the last stage the peer serves.
        state: The announced state; see `PeerState`.
        throughput_tokens_per_s: Tokens per second the peer pushes through *one* of its
            stages (so `1 / throughput` is its seconds per token per stage). Per stage, not per
            span, so that the same number serves routing (compute time of a sub-span is
            `stages x tokens / throughput`) and span choice (the peer adds this much to every
            stage it serves). 0 means "not measured yet": such a peer is never routed to.
        load: Utilisation in [0, 1]: the share of the peer's compute already in use. Chosen
            over a queue length because it needs no knowledge of the queued jobs' sizes to turn
            into a waiting time (routing uses the M/M/1 factor `load / (1 - load)`).
        free_cache_tokens: KV-cache tokens the peer can still give a new session.
    """

    peer_id: str
    model_id: str
    start: int
    end: int
    state: PeerState
    throughput_tokens_per_s: float
    load: float
    free_cache_tokens: int

    def __post_init__(self) -> None:
        if not isinstance(self.peer_id, str) or not self.peer_id:
            raise ValueError(f"peer_id must be a non-empty string, got {self.peer_id!r}")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"peer {self.peer_id}: model_id must be a non-empty string")
        _check_span(self.start, self.end, what=f"peer {self.peer_id}: span")
        if not isinstance(self.state, PeerState):
            raise ValueError(f"peer {self.peer_id}: state must be a PeerState, got {self.state!r}")
        _check_real(
            self.throughput_tokens_per_s, low=0.0, high=math.inf,
            what=f"peer {self.peer_id}: throughput_tokens_per_s",
        )
        _check_real(self.load, low=0.0, high=1.0, what=f"peer {self.peer_id}: load")
        if not _is_int(self.free_cache_tokens) or self.free_cache_tokens < 0:
            raise ValueError(
                f"peer {self.peer_id}: free_cache_tokens must be an int >= 0, "
                f"got {self.free_cache_tokens!r}"
            )

    @property
    def span(self) -> StageSpan:
        """The stages this peer serves."""
        return StageSpan(self.start, self.end)

    def serves(self, stage: int) -> bool:
        """Whether this peer serves `stage`."""
        return self.start <= stage < self.end


def _is_int(value: object) -> TypeGuard[int]:
    # bool is an int subclass; True as a stage number or token count is always a bug.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_span(start: object, end: object, *, what: str) -> None:
    if not (_is_int(start) and _is_int(end)):
        raise ValueError(f"{what} bounds must be ints, got [{start!r}, {end!r})")
    if not 0 <= start < end:
        raise ValueError(f"{what} [{start}, {end}) must satisfy 0 <= start < end")


def _check_real(value: object, *, low: float, high: float, what: str) -> None:
    """Raise unless `value` is a real number (not bool) in `[low, high]`, finite unless inf."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        bounds = f"in [{low}, {high}]" if math.isfinite(high) else f"finite and >= {low}"
        raise ValueError(f"{what} must be {bounds}, got {value!r}")
