"""Span choice: which stages a serving node should load, and when it should move.

Theory of operation
-------------------
This follows Petals' `block_selection`: the swarm's capacity at a stage is the sum of the
announced throughputs of the peers serving it (`JOINING` peers count, since they are about to
serve; `DRAINING` peers do not). A pipeline is only as fast as its slowest stage, so a new node
goes where that sum is lowest.

Stages differ in memory (the embedding and the head are not the size of a block), so windows
differ in length, and where a window sits decides whether the nodes that come later can tile
what is left. Candidates are therefore windows *flush against a step*: starting right after a
stage with more throughput (or the model's edge, or a stage too big for this node), or ending
right before one, then grown as far as the budget allows. On an empty swarm that is the
span from stage 0 or the one ending at the head, whichever holds more stages (stage 0 on a
tie); next to an existing span it is the span that continues it, leaving one contiguous gap
instead of two fragments. The leftmost
lowest-throughput stage is always such a start, so the bottleneck is always a candidate.

Candidates are ranked by their stages' throughputs sorted ascending, compared lexicographically
(Petals' rule: the window holding the lowest stage wins, then the lowest second-lowest, ...);
a window that holds the same low stages and more wins over a shorter one; then lowest start.

Nodes started together would all see the same swarm and pick the same span; a random startup
delay (`startup_jitter_s`) orders their joins so each sees the ones before it.

When a gap opens (a node left), every node whose stages others also serve sees the same gap
at about the same moment, and each would move there. `move_rank` orders them: among the peers
that could leave their stages without uncovering any (the ones that will want to move), a node
ranks by peer id. The daemon waits `rank` settle periods before it re-checks and moves, so the
first mover's `joining` announcement for the gap reaches the others first and their re-check
then says stay. The rank is computed from announcements alone, so every node computes the same
order without talking to the others.

`should_rebalance` asks whether moving this node alone to the span `choose_span` would pick
(with itself taken out of the swarm) raises the swarm's bottleneck by more than a threshold.
Petals also simulates every other peer moving in turn; that estimates what the whole swarm
could reach, not what this node's move achieves, and needs a random shuffle, so it is left out.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence

from node._snapshots import PeerSnapshot, PeerState, StageSpan, _check_real, _is_int


class SpanDoesNotFitError(ValueError):
    """The memory budget cannot hold even one stage, so this node cannot serve the model."""


def stage_memory_bytes(
    *, weight_bytes: Sequence[int], cache_bytes_per_block: int
) -> tuple[int, ...]:
    """Memory each stage costs on this node: its weights plus, for blocks, a KV-cache reserve.

    Stages 0 (embedding) and L+1 (head) keep no cache; blocks 1..L each keep one. Folding the
    reserve into each block's cost is what makes a budget "including room for the KV cache"
    buy fewer blocks, not the same blocks with no room to serve anyone.

    Raises:
        ValueError: Fewer than 3 stages, or a negative or non-int size.
    """
    if len(weight_bytes) < 3:
        raise ValueError(f"a model has at least 3 stages, got {len(weight_bytes)}")
    if not _is_int(cache_bytes_per_block) or cache_bytes_per_block < 0:
        raise ValueError(f"cache_bytes_per_block must be an int >= 0, got {cache_bytes_per_block}")
    last = len(weight_bytes) - 1
    return tuple(
        w if stage in (0, last) else w + cache_bytes_per_block
        for stage, w in enumerate(_checked_bytes(weight_bytes))
    )


def per_stage_throughput(
    *, num_stages: int, model_id: str, swarm: Iterable[PeerSnapshot]
) -> tuple[float, ...]:
    """Total announced throughput at each stage of `model_id`, over joining and online peers.

    Peers of another model, draining peers and peers announcing stages past `num_stages`
    (a peer with our `model_id` cannot do so honestly) are ignored, not raised on: a bad
    announcement must not stop this node from choosing. Sums run in peer-id order, so the same
    swarm gives bit-identical totals whatever order it comes in.

    Raises:
        ValueError: `num_stages` < 1, or duplicate peer ids.
    """
    totals = [0.0] * num_stages
    for peer in _counted(swarm, num_stages=num_stages, model_id=model_id):
        for stage in range(peer.start, peer.end):
            totals[stage] += peer.throughput_tokens_per_s
    return tuple(totals)


def _counted(
    swarm: Iterable[PeerSnapshot], *, num_stages: int, model_id: str
) -> list[PeerSnapshot]:
    """The peers that count toward the swarm's capacity (see `per_stage_throughput`), by id."""
    if not _is_int(num_stages) or num_stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
    by_id: dict[str, PeerSnapshot] = {}
    for peer in swarm:
        if peer.peer_id in by_id:
            raise ValueError(f"duplicate snapshot for peer {peer.peer_id}")
        by_id[peer.peer_id] = peer
    return [
        peer for _, peer in sorted(by_id.items())
        if peer.state in (PeerState.JOINING, PeerState.ONLINE)
        and peer.model_id == model_id and peer.end <= num_stages
    ]


def choose_span(
    *,
    num_stages: int,
    stage_bytes: Sequence[int],
    memory_budget_bytes: int,
    model_id: str,
    swarm: Iterable[PeerSnapshot],
) -> StageSpan:
    """The span this node should serve: the bottleneck, as long as the budget allows.

    Args:
        num_stages: L + 2 for a model of L blocks.
        stage_bytes: Memory each stage costs here, KV reserve included
            (see `stage_memory_bytes`); one entry per stage.
        memory_budget_bytes: What this node may use for the model in total.
        model_id: The model to serve; other models' peers are ignored.
        swarm: The other peers' snapshots (not this node's own).

    Raises:
        SpanDoesNotFitError: No single stage fits the budget.
        ValueError: Inconsistent or invalid arguments.
    """
    costs = _checked_costs(num_stages, stage_bytes, memory_budget_bytes)
    totals = per_stage_throughput(num_stages=num_stages, model_id=model_id, swarm=swarm)
    return _best_window(totals, costs, memory_budget_bytes)


def should_rebalance(
    *,
    current: StageSpan,
    own_throughput_tokens_per_s: float,
    num_stages: int,
    stage_bytes: Sequence[int],
    memory_budget_bytes: int,
    model_id: str,
    swarm: Iterable[PeerSnapshot],
    min_improvement: float = 1.2,
) -> bool:
    """Whether this node should move from `current` to the span `choose_span` now picks.

    "Better" is judged on the whole swarm with this node counted: first by the number of stages
    nobody serves (fewer is better, whatever the ratio — an uncovered stage makes the model
    unusable), then, when every stage is served both ways, by the bottleneck (lowest per-stage
    throughput), which must grow by more than `min_improvement` times. The margin keeps nodes
    from swapping back and forth over small differences; a move costs a reload.

    Args:
        current: The span this node serves now.
        own_throughput_tokens_per_s: This node's per-stage throughput (as it announces it).
        num_stages: As for `choose_span`.
        stage_bytes: As for `choose_span`.
        memory_budget_bytes: As for `choose_span`.
        model_id: As for `choose_span`.
        swarm: The other peers (not this node).
        min_improvement: Required bottleneck ratio, >= 1.

    Raises:
        SpanDoesNotFitError: No single stage fits the budget.
        ValueError: Inconsistent or invalid arguments.
    """
    costs = _checked_costs(num_stages, stage_bytes, memory_budget_bytes)
    if current.end > num_stages:
        raise ValueError(f"current span {current} is outside the model's {num_stages} stages")
    _check_real(
        own_throughput_tokens_per_s, low=0.0, high=math.inf, what="own_throughput_tokens_per_s"
    )
    if own_throughput_tokens_per_s <= 0:
        raise ValueError("own_throughput_tokens_per_s must be > 0")
    _check_real(min_improvement, low=1.0, high=math.inf, what="min_improvement")
    others = per_stage_throughput(num_stages=num_stages, model_id=model_id, swarm=swarm)
    best = _best_window(others, costs, memory_budget_bytes)
    if best == current:
        return False
    before = _with_node(others, current, own_throughput_tokens_per_s)
    after = _with_node(others, best, own_throughput_tokens_per_s)
    uncovered_before, uncovered_after = before.count(0.0), after.count(0.0)
    if uncovered_before or uncovered_after:
        return uncovered_after < uncovered_before
    return min(after) > min(before) * min_improvement


def move_rank(
    *,
    peer_id: str,
    current: StageSpan,
    num_stages: int,
    model_id: str,
    swarm: Iterable[PeerSnapshot],
) -> int:
    """How many peers go before this one when several may move to the same gap.

    A peer "may move" when every stage it serves is also served by another peer (joining or
    online, this node counted at `current`): those are the ones `should_rebalance` lets leave
    their stages for a gap. The rank is the number of such peers, other than this node, whose
    peer id sorts before ours; 0 moves first. Deterministic: the same swarm gives every node
    the same order, whatever order the snapshots come in.

    Args:
        peer_id: This node's peer id.
        current: The span this node serves now.
        num_stages: As for `choose_span`.
        model_id: As for `choose_span`; other models' peers are ignored.
        swarm: The other peers (a snapshot of this node itself is ignored).

    Raises:
        ValueError: `current` outside the model, `num_stages` < 1, or duplicate peer ids.
    """
    if current.end > num_stages:
        raise ValueError(f"current span {current} is outside the model's {num_stages} stages")
    others = [p for p in swarm if p.peer_id != peer_id]
    counted = _counted(others, num_stages=num_stages, model_id=model_id)
    cover = [0] * num_stages
    for span in [current, *(p.span for p in counted)]:
        for stage in span.stages:
            cover[stage] += 1
    return sum(
        1 for p in counted
        if p.peer_id < peer_id and all(cover[stage] >= 2 for stage in p.span.stages)
    )


def startup_jitter_s(*, rng: random.Random, max_s: float) -> float:
    """A random delay in `[0, max_s)` before a node first chooses its span.

    Nodes started together (a devnet, a fleet after a power cut) would otherwise all read the
    same empty swarm and load the same stages. The generator is injected so tests and the
    devnet can seed it; `max_s == 0` turns jitter off and returns 0.

    Raises:
        ValueError: `max_s` negative or not finite.
    """
    _check_real(max_s, low=0.0, high=math.inf, what="max_s")
    # random() is in [0, 1), so the product stays below max_s (uniform() may return max_s).
    return rng.random() * max_s


def _best_window(totals: Sequence[float], costs: Sequence[int], budget: int) -> StageSpan:
    candidates = _anchored_windows(totals, costs, budget)
    if not candidates:
        cheapest = min(range(len(costs)), key=lambda s: (costs[s], s))
        raise SpanDoesNotFitError(
            f"a memory budget of {budget} bytes cannot hold a single stage; the smallest, "
            f"stage {cheapest}, needs {costs[cheapest]} bytes"
        )

    def key(window: StageSpan) -> tuple[tuple[float, ...], int]:
        # The sentinel makes a window that covers the same low stages *and more* compare lower.
        return (*sorted(totals[window.start : window.end]), math.inf), window.start

    return min(candidates, key=key)


def _anchored_windows(
    totals: Sequence[float], costs: Sequence[int], budget: int
) -> list[StageSpan]:
    """Maximal fitting windows flush against a step up in throughput (or an edge, or a wall).

    A window starts at `s` when stage `s - 1` has more throughput than `s` (or is the model's
    edge, or cannot fit alone), or ends at `e` when stage `e` has more than `e - 1` (likewise);
    it is then grown the other way, and back, as far as the budget allows.
    """
    n = len(costs)
    fits = [c <= budget for c in costs]

    def grow(stage: int, *, rightward_first: bool) -> StageSpan:
        start, end, used = stage, stage + 1, costs[stage]
        for rightward in (rightward_first, not rightward_first):
            if rightward:
                while end < n and used + costs[end] <= budget:
                    used, end = used + costs[end], end + 1
            else:
                while start > 0 and used + costs[start - 1] <= budget:
                    start, used = start - 1, used + costs[start - 1]
        return StageSpan(start, end)

    found: set[StageSpan] = set()
    for s in range(n):
        if fits[s] and (s == 0 or not fits[s - 1] or totals[s - 1] > totals[s]):
            found.add(grow(s, rightward_first=True))
    for e in range(1, n + 1):
        if fits[e - 1] and (e == n or not fits[e] or totals[e] > totals[e - 1]):
            found.add(grow(e - 1, rightward_first=False))
    return sorted(found, key=lambda w: (w.start, w.end))


def _with_node(totals: Sequence[float], span: StageSpan, throughput: float) -> list[float]:
    return [t + throughput if stage in span else t for stage, t in enumerate(totals)]


def _checked_costs(num_stages: int, stage_bytes: Sequence[int], budget: int) -> tuple[int, ...]:
    if not _is_int(num_stages) or num_stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
    if len(stage_bytes) != num_stages:
        raise ValueError(f"stage_bytes has {len(stage_bytes)} entries for {num_stages} stages")
    if not _is_int(budget) or budget <= 0:
        raise ValueError(f"memory_budget_bytes must be an int > 0, got {budget!r}")
    costs = _checked_bytes(stage_bytes)
    if any(c == 0 for c in costs):
        raise ValueError("every stage costs some memory; got a stage of 0 bytes")
    return costs


def _checked_bytes(values: Sequence[int]) -> tuple[int, ...]:
    for stage, value in enumerate(values):
        if not _is_int(value) or value < 0:
            raise ValueError(f"stage {stage}: size must be an int >= 0 bytes, got {value!r}")
    return tuple(values)
