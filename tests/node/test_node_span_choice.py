"""Span choice on synthetic swarms, rebalancing, and jittered joins covering the model."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from node._snapshots import PeerSnapshot, PeerState, StageSpan
from node._span_choice import (
    SpanDoesNotFitError,
    choose_span,
    move_rank,
    per_stage_throughput,
    should_rebalance,
    stage_memory_bytes,
    startup_jitter_s,
)

MODEL = "model-a"
UNIFORM = [10] * 14  # 12 blocks + embedding + head, all the same size
HEAVY_ENDS = [30] + [10] * 12 + [30]  # a large vocabulary: embedding and head weigh 3 blocks


def peer(
    peer_id: str,
    start: int,
    end: int,
    throughput: float = 100.0,
    *,
    state: PeerState = PeerState.ONLINE,
    model_id: str = MODEL,
) -> PeerSnapshot:
    return PeerSnapshot(
        peer_id=peer_id, model_id=model_id, start=start, end=end, state=state,
        throughput_tokens_per_s=throughput, load=0.0, free_cache_tokens=0,
    )


def choose(
    swarm: Sequence[PeerSnapshot], *, costs: Sequence[int] = UNIFORM, budget: int = 50
) -> StageSpan:
    return choose_span(
        num_stages=len(costs), stage_bytes=costs, memory_budget_bytes=budget,
        model_id=MODEL, swarm=swarm,
    )


def test_empty_swarm_starts_at_zero() -> None:
    assert choose([]) == StageSpan(0, 5)
    assert choose([], costs=HEAVY_ENDS, budget=60) == StageSpan(0, 4)


def test_fills_a_gap() -> None:
    swarm = [peer("a", 0, 5), peer("b", 9, 14)]
    assert choose(swarm, budget=40) == StageSpan(5, 9)


def test_a_wide_window_covers_all_of_a_narrow_gap() -> None:
    swarm = [peer("a", 0, 6), peer("b", 8, 14)]
    span = choose(swarm, budget=50)
    assert span.length == 5 and 6 in span and 7 in span


def test_continues_an_existing_span_rather_than_fragmenting_the_gap() -> None:
    assert choose([peer("a", 0, 3)], budget=40) == StageSpan(3, 7)


def test_chooses_the_lowest_throughput_region() -> None:
    swarm = [peer("a", 0, 14), peer("b", 0, 7, 50.0), peer("c", 4, 10, 20.0)]
    # per stage: 0-3: 150, 4-6: 170, 7-9: 120, 10-13: 100
    assert per_stage_throughput(num_stages=14, model_id=MODEL, swarm=swarm)[7:11] == (
        120.0, 120.0, 120.0, 100.0,
    )
    assert choose(swarm, budget=40) == StageSpan(10, 14)


def test_counts_joining_but_not_draining_or_other_models() -> None:
    swarm = [
        peer("a", 0, 7, state=PeerState.JOINING),
        peer("b", 7, 14, state=PeerState.DRAINING),
        peer("c", 7, 14, model_id="model-b"),
        peer("d", 7, 20),  # claims stages the model does not have: ignored, not fatal
    ]
    assert per_stage_throughput(num_stages=14, model_id=MODEL, swarm=swarm) == (
        (100.0,) * 7 + (0.0,) * 7
    )
    assert choose(swarm, budget=70) == StageSpan(7, 14)


def test_respects_the_memory_budget_with_heavy_ends() -> None:
    assert choose([peer("a", 0, 4)], costs=HEAVY_ENDS, budget=60) == StageSpan(4, 10)
    # A budget too small for the embedding still serves blocks.
    assert choose([], costs=[100, 10, 10, 10, 100], budget=25) == StageSpan(1, 3)


def test_random_swarms_fit_the_budget_and_cover_the_bottleneck() -> None:
    rng = random.Random(5)
    for _ in range(300):
        n = rng.randint(3, 40)
        costs = [rng.randint(5, 40) for _ in range(n)]
        budget = rng.randint(max(costs) // 2, sum(costs))
        swarm = []
        for i in range(rng.randint(0, 12)):
            start = rng.randrange(n)
            swarm.append(peer(f"p{i}", start, rng.randint(start + 1, n), rng.choice([1.0, 5.0])))
        fitting = [s for s in range(n) if costs[s] <= budget]
        if not fitting:
            with pytest.raises(SpanDoesNotFitError):
                choose(swarm, costs=costs, budget=budget)
            continue
        span = choose(swarm, costs=costs, budget=budget)
        used = sum(costs[span.start : span.end])
        assert used <= budget
        assert span.start == 0 or used + costs[span.start - 1] > budget  # maximal
        assert span.end == n or used + costs[span.end] > budget
        totals = per_stage_throughput(num_stages=n, model_id=MODEL, swarm=swarm)
        assert min(totals[s] for s in span.stages) == min(totals[s] for s in fitting)
        rng.shuffle(swarm)
        assert choose(swarm, costs=costs, budget=budget) == span  # order does not matter


def test_deterministic_ties_go_to_the_lowest_start() -> None:
    swarm = [peer("a", 0, 2), peer("b", 12, 14)]
    assert choose(swarm, budget=40) == StageSpan(2, 6)
    assert choose(list(reversed(swarm)), budget=40) == StageSpan(2, 6)


def test_no_stage_fits_is_a_clear_error() -> None:
    with pytest.raises(SpanDoesNotFitError, match="smallest, stage 1, needs 10 bytes"):
        choose([], costs=[30, 10, 30], budget=9)


def test_rejects_inconsistent_arguments() -> None:
    with pytest.raises(ValueError, match="3 entries for 4 stages"):
        choose_span(num_stages=4, stage_bytes=[1, 1, 1], memory_budget_bytes=5,
                    model_id=MODEL, swarm=[])
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        choose([], budget=0)
    with pytest.raises(ValueError, match="duplicate"):
        choose([peer("a", 0, 1), peer("a", 1, 2)])


def test_stage_memory_adds_the_cache_reserve_to_blocks_only() -> None:
    assert stage_memory_bytes(weight_bytes=[30, 10, 10, 30], cache_bytes_per_block=5) == (
        30, 15, 15, 30,
    )
    with pytest.raises(ValueError, match="at least 3 stages"):
        stage_memory_bytes(weight_bytes=[1, 1], cache_bytes_per_block=0)


# --------------------------------------------------------------------------------------------
# Rebalancing


def rebalance(
    current: StageSpan, swarm: Sequence[PeerSnapshot], *, own: float = 100.0, budget: int = 70
) -> bool:
    return should_rebalance(
        current=current, own_throughput_tokens_per_s=own, num_stages=14, stage_bytes=UNIFORM,
        memory_budget_bytes=budget, model_id=MODEL, swarm=swarm,
    )


def test_moves_to_cover_stages_nobody_serves() -> None:
    assert rebalance(StageSpan(0, 7), [peer("a", 0, 7)])


def test_stays_when_already_best() -> None:
    assert not rebalance(StageSpan(7, 14), [peer("a", 0, 7)])


def test_never_moves_off_stages_only_it_serves() -> None:
    # The other half is doubly covered, but leaving 0-6 would leave them unserved.
    assert not rebalance(StageSpan(0, 7), [peer("a", 7, 14), peer("b", 7, 14)])


def test_moves_only_past_the_improvement_threshold() -> None:
    swarm = [peer("a", 0, 14), peer("b", 0, 7)]
    assert rebalance(StageSpan(0, 7), swarm)  # bottleneck 100 -> 200
    assert not rebalance(StageSpan(0, 7), swarm, own=10.0)  # 100 -> 110 < 1.2x
    with pytest.raises(ValueError, match="min_improvement"):
        should_rebalance(
            current=StageSpan(0, 7), own_throughput_tokens_per_s=1.0, num_stages=14,
            stage_bytes=UNIFORM, memory_budget_bytes=70, model_id=MODEL, swarm=swarm,
            min_improvement=0.5,
        )


def test_a_balanced_swarm_never_moves() -> None:
    # Two full copies of the model, in halves: every node already sits where it is needed.
    swarm = [peer("a", 0, 7), peer("b", 7, 14), peer("c", 0, 7), peer("d", 7, 14)]
    for me in swarm:
        others = [p for p in swarm if p is not me]
        assert not rebalance(me.span, others), me


def test_hysteresis_small_throughput_differences_do_not_move() -> None:
    # The second half is 15 % slower than the first: below the 1.2x margin, nobody moves,
    # even the node whose move would help a little.
    swarm = [peer("a", 0, 7, 115.0), peer("b", 7, 14, 100.0), peer("c", 0, 7, 115.0),
             peer("d", 7, 14, 100.0)]
    for me in swarm:
        others = [p for p in swarm if p is not me]
        assert not rebalance(me.span, others, own=me.throughput_tokens_per_s), me
    # At three times slower, one of the fast half's nodes moves.
    swarm[1] = peer("b", 7, 14, 30.0)
    swarm[3] = peer("d", 7, 14, 30.0)
    assert rebalance(StageSpan(0, 7), [swarm[1], swarm[2], swarm[3]], own=115.0)


def test_a_node_leaving_opens_a_gap_that_exactly_one_node_fills() -> None:
    # a and c both serve 0-6; b served 7-13 and left. Both would move there ...
    a, c = peer("a", 0, 7), peer("c", 0, 7)
    assert rebalance(a.span, [c]) and rebalance(c.span, [a])
    # ... but a ranks first (c, too, could leave 0-6 without uncovering it), so c waits,
    # re-checks, sees a joining at 7-13, and stays.
    assert move_rank(peer_id="a", current=a.span, num_stages=14, model_id=MODEL,
                     swarm=[c]) == 0
    assert move_rank(peer_id="c", current=c.span, num_stages=14, model_id=MODEL,
                     swarm=[a]) == 1
    moved = peer("a", 7, 14, state=PeerState.JOINING)
    assert not rebalance(c.span, [moved])
    assert not rebalance(moved.span, [c])  # and a does not move back


def test_move_rank_counts_only_peers_that_could_move_first() -> None:
    me = StageSpan(0, 7)
    swarm = [
        peer("a", 7, 14),  # sole server of 7-13: cannot move, does not go first
        peer("b", 0, 7),  # shares 0-6 with us: goes first
        peer("c", 0, 3, state=PeerState.DRAINING),  # leaving: not counted at all
        peer("d", 0, 7, model_id="model-b"),  # another model
        peer("z", 0, 7),  # sorts after us
    ]
    assert move_rank(peer_id="m", current=me, num_stages=14, model_id=MODEL, swarm=swarm) == 1
    # A snapshot of ourselves in the view is ignored, and order does not matter.
    both = [*reversed(swarm), peer("m", 0, 7)]
    assert move_rank(peer_id="m", current=me, num_stages=14, model_id=MODEL, swarm=both) == 1
    with pytest.raises(ValueError, match="outside"):
        move_rank(peer_id="m", current=StageSpan(0, 20), num_stages=14, model_id=MODEL,
                  swarm=[])


def settle(
    swarm: list[PeerSnapshot], budgets: dict[str, int], costs: Sequence[int], rounds: int
) -> tuple[list[PeerSnapshot], int]:
    """Let each node in turn (by peer id) move while `should_rebalance` says so.

    Returns the swarm and the number of moves once a whole round moved nobody.
    """
    moves = 0
    for _ in range(rounds):
        moved = False
        for i in sorted(range(len(swarm)), key=lambda k: swarm[k].peer_id):
            me = swarm[i]
            others = swarm[:i] + swarm[i + 1 :]
            kw = dict(num_stages=len(costs), stage_bytes=costs,
                      memory_budget_bytes=budgets[me.peer_id], model_id=MODEL, swarm=others)
            if should_rebalance(current=me.span,
                                own_throughput_tokens_per_s=me.throughput_tokens_per_s, **kw):
                span = choose_span(**kw)
                swarm[i] = peer(me.peer_id, span.start, span.end, me.throughput_tokens_per_s)
                moves += 1
                moved = True
        if not moved:
            return swarm, moves
    raise AssertionError(f"still moving after {rounds} rounds: {swarm}")


def test_random_swarms_settle_and_then_stay_put() -> None:
    """Every move improves the swarm by a margin, so moving cannot go on forever (no flapping),
    and a swarm that can cover the model ends up covering it."""
    rng = random.Random(11)
    for _ in range(200):
        n = rng.randint(3, 24)
        costs = [rng.randint(5, 20) for _ in range(n)]
        budgets, swarm = {}, []
        for i in range(rng.randint(1, 8)):
            name = f"p{i:02d}"
            budgets[name] = rng.randint(max(costs), sum(costs))
            span = choose([], costs=costs, budget=budgets[name])
            start = rng.randint(0, n - span.length)  # anywhere: a swarm after churn
            swarm.append(peer(name, start, start + span.length, rng.choice([10.0, 30.0, 50.0])))
        settled, _ = settle(swarm, budgets, costs, rounds=50)
        again, moves = settle(list(settled), budgets, costs, rounds=2)
        assert moves == 0 and again == settled


def test_after_a_departure_the_survivors_recover_coverage() -> None:
    """Three nodes that each hold half the model; one leaves; one survivor moves, once."""
    rng = random.Random(3)
    for _ in range(50):
        budgets = {name: 70 for name in ("a", "b", "c")}
        swarm = join_in_jitter_order(rng.randrange(1000), nodes=3, costs=UNIFORM, budget=70)
        nodes = [peer(name, s.start, s.end, rng.uniform(80, 120))
                 for name, s in zip("abc", swarm, strict=True)]
        nodes, _ = settle(nodes, budgets, UNIFORM, rounds=20)
        cover = [sum(stage in p.span for p in nodes) for stage in range(14)]
        sole = next(p for p in nodes if any(cover[s] == 1 for s in p.span.stages))
        survivors = [p for p in nodes if p is not sole]
        settled, moves = settle(survivors, budgets, UNIFORM, rounds=20)
        assert moves == 1
        assert {s for p in settled for s in p.span.stages} == set(range(14))


# --------------------------------------------------------------------------------------------
# Jittered joins


def test_jitter_is_in_range_and_seeded() -> None:
    values = [startup_jitter_s(rng=random.Random(1), max_s=5.0) for _ in range(3)]
    assert values[0] == values[1] == values[2]
    rng = random.Random(2)
    assert all(0.0 <= startup_jitter_s(rng=rng, max_s=5.0) < 5.0 for _ in range(1000))
    assert startup_jitter_s(rng=rng, max_s=0.0) == 0.0
    with pytest.raises(ValueError, match="max_s"):
        startup_jitter_s(rng=rng, max_s=-1.0)


def join_in_jitter_order(
    seed: int, *, nodes: int, costs: Sequence[int], budget: int
) -> list[StageSpan]:
    """Each node waits its jitter, then chooses seeing every node that joined before it."""
    rng = random.Random(seed)
    delays = sorted((startup_jitter_s(rng=rng, max_s=10.0), f"n{i}") for i in range(nodes))
    swarm: list[PeerSnapshot] = []
    for _, name in delays:
        span = choose(swarm, costs=costs, budget=budget)
        swarm.append(peer(name, span.start, span.end, state=PeerState.JOINING))
    return [p.span for p in swarm]


@pytest.mark.parametrize(
    ("costs", "budget"),
    [
        (UNIFORM, 50),  # 14 stages, 5 a node
        ([10] * 34, 120),  # 32 blocks + ends, 12 a node
        (HEAVY_ENDS, 60),  # exactly a third of 180 bytes
        ([7] + [10] * 20 + [25], 88),  # light embedding, heavy head
        ([40] + [10] * 30 + [15], 130),
    ],
)
def test_three_equal_nodes_with_jitter_cover_the_model(costs: list[int], budget: int) -> None:
    assert budget * 3 < sum(costs) * 1.2  # about a third each: little slack to waste
    for seed in range(5):
        spans = join_in_jitter_order(seed, nodes=3, costs=costs, budget=budget)
        covered = {stage for span in spans for stage in span.stages}
        assert covered == set(range(len(costs))), spans


def test_without_jitter_simultaneous_nodes_collide() -> None:
    # All three read the same empty swarm: the reason for the jitter.
    assert len({choose([], budget=50) for _ in range(3)}) == 1

