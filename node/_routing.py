"""Routing: the cheapest chain of peers that covers the stages a client needs.

Theory of operation
-------------------
A client needs stages `[first, last)` run in order. A route is a list of hops
`(peer, start, end)` that tile that range; a hop may use any sub-span of what its peer serves
(servers accept a sub-span starting anywhere inside theirs), and consecutive hops may be on
different peers, which is how a route is stitched from peers that each hold a piece.

The cost of a route, in seconds, is what one step of the session waits for:

* entering a peer (once per hop): half the client-measured RTT to it (the activations travel
  one way; with push, each hop sends straight to the next), plus serialization
  (`tokens x activation bytes / bandwidth`), plus the trust penalty from the ranking hook;
* each stage on peer `p`: `tokens / throughput(p)` of compute, times `1 + load / (1 - load)`
  for the queue in front of it (the M/M/1 waiting-time factor; `load` is capped below 1);
* leaving the last hop: half its RTT plus serialization, for the result to reach the client.

So staying on a peer for consecutive stages adds compute only, and every switch adds one more
entry: one peer covering everything beats an equal-compute chain by the extra hops' RTTs.

The search is Dijkstra over `(stage boundary, peer)` nodes: node `(s, p)` means "the output of
stage `s - 1` sits on `p`, mid-hop". From it, "continue" goes to `(s + 1, p)` at the cost of one
stage on `p`; "switch" goes through a per-boundary handoff node, which any peer `q` serving stage
`s` can be entered from at `q`'s entry cost. Every edge goes from boundary `s` to `s + 1` (the
handoff node adds none), so the graph is a DAG in stage order and relaxing it boundary by
boundary gives Dijkstra's answer with no heap, in `O(stages x peers)`. The handoff node keeps
the edge count linear in the number of peers instead of quadratic.

Determinism: peers are visited in peer-id order, costs compare with strict `<`, so equal costs
go to the lowest peer id; between "continue" and "switch" at equal cost, "continue" wins (fewer
hops). The same swarm always yields the same route, whatever order the snapshots come in.

Eligibility: a peer is used only if it serves the request's model, is `ONLINE`, is not banned,
has announced a non-zero throughput and has at least the session's KV-cache tokens free. When
some stage has no eligible peer, `NoRouteError` names the stages and why peers were left out.

`BanList` is the client's memory of failures: a pure value (every method takes `now` and
returns a new list) with exponential backoff, doubled per failure and reset by a success.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from types import MappingProxyType

from node._snapshots import PeerSnapshot, PeerState, _check_real, _check_span, _is_int

#: The ranking hook's shape: seconds added each time a route enters this peer.
TrustPenalty = Callable[[str], float]


class NoRouteError(LookupError):
    """No eligible peer serves some of the stages a request needs.

    Attributes:
        missing_stages: The stages no eligible peer serves, ascending.
        excluded: Why each left-out peer was left out (peer id -> reason).
    """

    def __init__(self, *, missing_stages: Sequence[int], excluded: Mapping[str, str]) -> None:
        self.missing_stages = tuple(missing_stages)
        self.excluded = MappingProxyType(dict(excluded))
        noun = "stage" if len(self.missing_stages) == 1 else "stages"
        message = f"no peer serves {noun} {format_stages(self.missing_stages)}"
        if self.excluded:
            reasons = Counter(self.excluded.values())
            listed = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
            message += f" (peers left out: {listed})"
        super().__init__(message)


def no_trust_penalty(peer_id: str) -> float:
    """The default trust hook: no evidence, no penalty (the ranking system replaces it)."""
    return 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteRequest:
    """What a session needs from the swarm.

    Attributes:
        model_id: The model to run.
        first: First stage to run remotely (1 when the client runs the embedding itself).
        last: One past the last stage to run remotely (L+1 when the client runs the head).
        tokens_in_flight: Tokens per step (prompt length for prefill, batch size for decode);
            scales compute and serialization.
        cache_tokens: KV-cache tokens the session will hold on every hop (its max length);
            peers with less free cache are left out.
    """

    model_id: str
    first: int
    last: int
    tokens_in_flight: int = 1
    cache_tokens: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"model_id must be a non-empty string, got {self.model_id!r}")
        _check_span(self.first, self.last, what="requested stages")
        if not _is_int(self.tokens_in_flight) or self.tokens_in_flight < 1:
            raise ValueError(f"tokens_in_flight must be an int >= 1, got {self.tokens_in_flight!r}")
        if not _is_int(self.cache_tokens) or self.cache_tokens < 0:
            raise ValueError(f"cache_tokens must be an int >= 0, got {self.cache_tokens!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class CostModel:
    """Constants that turn announcements into seconds.

    Attributes:
        default_rtt_s: RTT assumed for a peer the client has not measured yet. Pessimistic
            enough that measured nearby peers win, not so large that new peers are never tried.
        bandwidth_bytes_per_s: Link bandwidth estimate for serialization time (100 Mbit/s).
        activation_bytes_per_token: Bytes one token's hidden state takes on the wire
            (hidden size x bytes per element of the codec).
        max_load: Loads above this are treated as this, keeping the queueing factor finite
            (0.95 -> at most 19x the compute time) so a saturated peer is avoided, not banned.
    """

    default_rtt_s: float = 0.1
    bandwidth_bytes_per_s: float = 12.5e6
    activation_bytes_per_token: float = 4096.0
    max_load: float = 0.95

    def __post_init__(self) -> None:
        _check_real(self.default_rtt_s, low=0.0, high=math.inf, what="default_rtt_s")
        _check_real(
            self.bandwidth_bytes_per_s, low=0.0, high=math.inf, what="bandwidth_bytes_per_s"
        )
        if self.bandwidth_bytes_per_s == 0:
            raise ValueError("bandwidth_bytes_per_s must be > 0")
        _check_real(
            self.activation_bytes_per_token, low=0.0, high=math.inf,
            what="activation_bytes_per_token",
        )
        _check_real(self.max_load, low=0.0, high=1.0, what="max_load")
        if self.max_load >= 1.0:
            raise ValueError("max_load must be < 1 (a load of 1 means an unbounded queue)")


@dataclass(frozen=True, slots=True)
class Hop:
    """Stages `[start, end)` run on one peer, as one session on that peer."""

    peer_id: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if not isinstance(self.peer_id, str) or not self.peer_id:
            raise ValueError(f"peer_id must be a non-empty string, got {self.peer_id!r}")
        _check_span(self.start, self.end, what=f"hop on {self.peer_id}")


@dataclass(frozen=True, slots=True)
class Route:
    """The chosen hops, in stage order, and their estimated cost per step in seconds."""

    hops: tuple[Hop, ...]
    cost_s: float


_DEFAULT_COST = CostModel()
_NO_RTTS: Mapping[str, float] = MappingProxyType({})


def find_route(
    peers: Iterable[PeerSnapshot],
    *,
    request: RouteRequest,
    cost: CostModel = _DEFAULT_COST,
    rtt_s: Mapping[str, float] = _NO_RTTS,
    trust_penalty: TrustPenalty = no_trust_penalty,
    banned: Set[str] = frozenset(),
) -> Route:
    """The cheapest route over eligible peers for `request` (see the module docstring).

    Args:
        peers: The swarm as snapshots; order does not matter, peer ids must be unique.
        request: The stages, model and session size to route.
        cost: Constants for the cost estimate.
        rtt_s: Client-measured round-trip times by peer id; missing peers get the default.
        trust_penalty: Seconds added per entry into a peer; must be finite and >= 0
            (a negative one would reward splitting a hop on one peer into many).
        banned: Peer ids never to use, e.g. `BanList.banned(now=...)`.

    Raises:
        NoRouteError: Some requested stage has no eligible peer.
        ValueError: Duplicate peer ids, or a bad RTT or trust value.
    """
    by_id = _index(peers)
    useful, excluded = _eligible(by_id, request=request, banned=banned)
    stages = range(request.first, request.last)
    missing = [s for s in stages if not any(peer.serves(s) for peer in useful)]
    if missing:
        # Report only the left-out peers that would have covered a missing stage: a banned
        # peer elsewhere in the model is not why these stages have no route.
        relevant = {
            pid: reason for pid, reason in excluded.items()
            if any(by_id[pid].serves(s) for s in missing)
        }
        raise NoRouteError(missing_stages=missing, excluded=relevant)
    prices = _Prices(useful, request=request, cost=cost, rtt_s=rtt_s, trust_penalty=trust_penalty)

    # best[p]: cost so far with the output of the current stage on p, p mid-hop.
    best: dict[str, float] = {}
    # entered[i][p]: at boundary first+i+1, p's hop began at stage first+i (else it continued).
    entered: list[dict[str, bool]] = []
    # handoff[i]: (cost, owner) of the cheapest holder at boundary first+i; owner None = client.
    handoff: list[tuple[float, str | None]] = [(0.0, None)]
    for stage in range(request.first, request.last):
        hand_cost = handoff[-1][0]
        layer: dict[str, float] = {}
        how: dict[str, bool] = {}
        for peer in useful:
            if not peer.serves(stage):
                continue
            pid = peer.peer_id
            step = prices.stage[pid]
            stay = best[pid] + step if pid in best else math.inf
            switch = hand_cost + prices.enter[pid] + step
            layer[pid], how[pid] = (stay, False) if stay <= switch else (switch, True)
        best = layer
        entered.append(how)
        handoff.append(_cheapest((c, pid) for pid, c in best.items()))

    total, last_peer = _cheapest((c + prices.leave[pid], pid) for pid, c in best.items())
    hops: list[Hop] = []
    boundary = request.last
    owner: str | None = last_peer
    while owner is not None:
        end = boundary
        while not entered[boundary - 1 - request.first][owner]:
            boundary -= 1
        hops.append(Hop(owner, boundary - 1, end))
        boundary -= 1
        owner = handoff[boundary - request.first][1]
    hops.reverse()
    return Route(hops=tuple(hops), cost_s=total)


def route_cost(
    hops: Sequence[Hop],
    *,
    peers: Iterable[PeerSnapshot],
    request: RouteRequest,
    cost: CostModel = _DEFAULT_COST,
    rtt_s: Mapping[str, float] = _NO_RTTS,
    trust_penalty: TrustPenalty = no_trust_penalty,
) -> float:
    """The cost `find_route` assigns to `hops`, for comparing a live route with a new one.

    Sums in the same order as `find_route`, so the cost of its route matches to the last bit.
    Eligibility (bans, state, cache) is not checked: a route in use may be costed after its
    peers changed state; only the shape is.

    Raises:
        ValueError: The hops do not tile `[first, last)`, or a hop is outside its peer's span,
            or a hop names an unknown peer.
    """
    by_id = _index(peers)
    expected = request.first
    for hop in hops:
        peer = by_id.get(hop.peer_id)
        if peer is None:
            raise ValueError(f"hop on unknown peer {hop.peer_id}")
        if hop.start != expected:
            raise ValueError(f"hop {hop} starts at {hop.start}, expected stage {expected}")
        if not peer.start <= hop.start < hop.end <= peer.end:
            raise ValueError(f"hop {hop} is outside the peer's span [{peer.start}, {peer.end})")
        expected = hop.end
    if not hops or expected != request.last:
        raise ValueError(f"hops end at stage {expected}, expected {request.last}")
    used = [by_id[pid] for pid in sorted({hop.peer_id for hop in hops})]
    prices = _Prices(used, request=request, cost=cost, rtt_s=rtt_s, trust_penalty=trust_penalty)
    total = 0.0
    for hop in hops:
        step = prices.stage[hop.peer_id]
        total = total + prices.enter[hop.peer_id] + step
        for _ in range(hop.start + 1, hop.end):
            total = total + step
    return total + prices.leave[hops[-1].peer_id]


def format_stages(stages: Iterable[int]) -> str:
    """Stages as inclusive ranges for people: `[5, 6, 7, 9]` -> `"5-7, 9"`."""
    ordered = sorted(set(stages))
    runs: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        runs.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ", ".join(runs)


def _index(peers: Iterable[PeerSnapshot]) -> dict[str, PeerSnapshot]:
    by_id: dict[str, PeerSnapshot] = {}
    for peer in peers:
        if peer.peer_id in by_id:
            raise ValueError(f"duplicate snapshot for peer {peer.peer_id}")
        by_id[peer.peer_id] = peer
    return dict(sorted(by_id.items()))


def _eligible(
    by_id: Mapping[str, PeerSnapshot], *, request: RouteRequest, banned: Set[str]
) -> tuple[list[PeerSnapshot], dict[str, str]]:
    """Peers that may carry the request and overlap it (in `by_id` order), and why others not."""
    useful: list[PeerSnapshot] = []
    excluded: dict[str, str] = {}
    for pid, peer in by_id.items():
        if peer.model_id != request.model_id:
            continue  # another model's peer is not "left out", it is simply elsewhere
        reason = _exclusion(peer, request=request, banned=banned)
        if reason is not None:
            excluded[pid] = reason
        elif peer.start < request.last and peer.end > request.first:
            useful.append(peer)
    return useful, excluded


def _exclusion(peer: PeerSnapshot, *, request: RouteRequest, banned: Set[str]) -> str | None:
    if peer.state is not PeerState.ONLINE:
        return peer.state.value
    if peer.peer_id in banned:
        return "banned"
    if peer.throughput_tokens_per_s <= 0:
        return "without throughput"
    if peer.free_cache_tokens < request.cache_tokens:
        return "short of cache"
    return None


def _cheapest(options: Iterable[tuple[float, str]]) -> tuple[float, str]:
    # min() on (cost, peer id) tuples: lowest cost, then lowest id.
    return min(options)


class _Prices:
    """Per-peer edge costs, computed once per search (the trust hook is called once a peer)."""

    __slots__ = ("enter", "leave", "stage")

    def __init__(
        self,
        peers: Sequence[PeerSnapshot],
        *,
        request: RouteRequest,
        cost: CostModel,
        rtt_s: Mapping[str, float],
        trust_penalty: TrustPenalty,
    ) -> None:
        transfer = request.tokens_in_flight * cost.activation_bytes_per_token
        serialize = transfer / cost.bandwidth_bytes_per_s
        self.enter: dict[str, float] = {}
        self.leave: dict[str, float] = {}
        self.stage: dict[str, float] = {}
        for peer in peers:
            pid = peer.peer_id
            rtt = rtt_s.get(pid, cost.default_rtt_s)
            _check_real(rtt, low=0.0, high=math.inf, what=f"RTT to {pid}")
            penalty = trust_penalty(pid)
            _check_real(penalty, low=0.0, high=math.inf, what=f"trust penalty of {pid}")
            load = min(peer.load, cost.max_load)
            compute = request.tokens_in_flight / peer.throughput_tokens_per_s
            self.enter[pid] = rtt / 2 + serialize + penalty
            self.stage[pid] = compute * (1.0 + load / (1.0 - load))
            self.leave[pid] = rtt / 2 + serialize


# --------------------------------------------------------------------------------------------
# Bans


@dataclass(frozen=True, slots=True, kw_only=True)
class BanPolicy:
    """Backoff constants for `BanList`.

    Attributes:
        base_s: Ban after a first failure.
        cap_s: Longest ban; doubling stops here so a peer that recovers is retried.
        forget_after_s: A peer that has not failed for this long after its ban ended starts
            over at `base_s`, so one bad evening does not follow a peer for days.
    """

    base_s: float = 1.0
    cap_s: float = 300.0
    forget_after_s: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("base_s", "cap_s", "forget_after_s"):
            _check_real(getattr(self, name), low=0.0, high=math.inf, what=name)
        if self.base_s <= 0:
            raise ValueError("base_s must be > 0")
        if self.cap_s < self.base_s:
            raise ValueError(f"cap_s ({self.cap_s}) must be >= base_s ({self.base_s})")


@dataclass(frozen=True, slots=True)
class BanEntry:
    """A peer's failure streak and when its current ban ends (on the caller's clock)."""

    failures: int
    banned_until: float


@dataclass(frozen=True, slots=True, kw_only=True)
class BanList:
    """Peers to avoid after failures, with exponential backoff; a pure value.

    Each failure doubles the ban (`base_s`, `2 x base_s`, ... up to `cap_s`); a success
    clears the peer. Failures reported while the peer is already banned do not lengthen it:
    they are the same outage seen by requests that were in flight when it began, and counting
    them would ban a peer for 2^n seconds because n sessions happened to share it.

    Time is whatever monotonic clock the caller uses (`trio.current_time()`), passed as `now`.
    """

    policy: BanPolicy = field(default_factory=BanPolicy)
    entries: Mapping[str, BanEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Copy and freeze, so neither the caller's dict nor ours can change under us.
        object.__setattr__(self, "entries", MappingProxyType(dict(self.entries)))

    def record_failure(self, peer_id: str, *, now: float) -> BanList:
        """This list with `peer_id` banned for its next backoff step from `now`."""
        _check_now(now)
        entry = self.entries.get(peer_id)
        if entry is not None and now < entry.banned_until:
            return self
        forgotten = entry is not None and now >= entry.banned_until + self.policy.forget_after_s
        failures = 1 if entry is None or forgotten else entry.failures + 1
        # min() before the power keeps 2.0 ** failures from overflowing on long streaks.
        duration = min(self.policy.base_s * 2.0 ** min(failures - 1, 64), self.policy.cap_s)
        entries = dict(self.entries)
        entries[peer_id] = BanEntry(failures=failures, banned_until=now + duration)
        return BanList(policy=self.policy, entries=entries)

    def record_success(self, peer_id: str) -> BanList:
        """This list with `peer_id`'s streak and ban cleared."""
        if peer_id not in self.entries:
            return self
        entries = dict(self.entries)
        del entries[peer_id]
        return BanList(policy=self.policy, entries=entries)

    def is_banned(self, peer_id: str, *, now: float) -> bool:
        """Whether `peer_id` is banned at `now`."""
        _check_now(now)
        entry = self.entries.get(peer_id)
        return entry is not None and now < entry.banned_until

    def banned(self, *, now: float) -> frozenset[str]:
        """Every peer banned at `now`, ready for `find_route(banned=...)`."""
        _check_now(now)
        return frozenset(pid for pid, e in self.entries.items() if now < e.banned_until)

    def prune(self, *, now: float) -> BanList:
        """This list without entries that `record_failure` would forget anyway (bounds memory)."""
        _check_now(now)
        horizon = self.policy.forget_after_s
        kept = {pid: e for pid, e in self.entries.items() if now < e.banned_until + horizon}
        return self if len(kept) == len(self.entries) else BanList(policy=self.policy, entries=kept)


def _check_now(now: float) -> None:
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise ValueError(f"now must be a finite number, got {now!r}")
