"""Routing and bans: unit cases on hand-built swarms, then seeded simulations at scale."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence

import pytest

from node._routing import (
    BanList,
    BanPolicy,
    CostModel,
    Hop,
    NoRouteError,
    Route,
    RouteRequest,
    find_route,
    format_stages,
    route_cost,
)
from node._snapshots import PeerSnapshot, PeerState

MODEL = "model-a"


def peer(
    peer_id: str,
    start: int,
    end: int,
    *,
    throughput: float = 100.0,
    state: PeerState = PeerState.ONLINE,
    load: float = 0.0,
    free_cache: int = 10_000,
    model_id: str = MODEL,
) -> PeerSnapshot:
    return PeerSnapshot(
        peer_id=peer_id, model_id=model_id, start=start, end=end, state=state,
        throughput_tokens_per_s=throughput, load=load, free_cache_tokens=free_cache,
    )


def request(first: int = 0, last: int = 10, **kwargs: int) -> RouteRequest:
    return RouteRequest(model_id=MODEL, first=first, last=last, **kwargs)


def hops(route: Route) -> list[tuple[str, int, int]]:
    return [(h.peer_id, h.start, h.end) for h in route.hops]


# --------------------------------------------------------------------------------------------
# Choices on small swarms


def test_picks_the_faster_chain() -> None:
    swarm = [
        peer("a1", 0, 5, throughput=50), peer("a2", 5, 10, throughput=50),
        peer("b1", 0, 5, throughput=500), peer("b2", 5, 10, throughput=500),
    ]
    assert hops(find_route(swarm, request=request())) == [("b1", 0, 5), ("b2", 5, 10)]


def test_avoids_an_overloaded_peer() -> None:
    # Twice as fast, but 90% busy: the queue makes it five times slower than the idle one.
    swarm = [peer("busy", 0, 10, throughput=200, load=0.9), peer("idle", 0, 10)]
    assert hops(find_route(swarm, request=request())) == [("idle", 0, 10)]


def test_load_at_one_is_capped_not_infinite() -> None:
    route = find_route([peer("full", 0, 10, load=1.0)], request=request())
    assert math.isfinite(route.cost_s)


def test_avoids_banned_peers() -> None:
    swarm = [peer("a", 0, 10), peer("b", 0, 10)]
    assert hops(find_route(swarm, request=request())) == [("a", 0, 10)]
    assert hops(find_route(swarm, request=request(), banned={"a"})) == [("b", 0, 10)]
    with pytest.raises(NoRouteError, match=r"stages 0-9 \(peers left out: 2 banned\)"):
        find_route(swarm, request=request(), banned={"a", "b"})


def test_stitches_overlapping_peers_with_sub_spans() -> None:
    swarm = [peer("p1", 0, 4), peer("p2", 3, 8), peer("p3", 7, 10)]
    route = find_route(swarm, request=request())
    # Where inside an overlap the switch happens costs the same either way; only the chain
    # and the tiling are fixed.
    assert [h.peer_id for h in route.hops] == ["p1", "p2", "p3"]
    assert route.hops[0].end in (3, 4) and route.hops[1].end in (7, 8)
    assert route.cost_s == route_cost(route.hops, peers=swarm, request=request())


def test_uses_a_sub_span_starting_inside_the_peer() -> None:
    # The client runs the embedding and the head itself.
    route = find_route([peer("p", 0, 12)], request=request(first=1, last=11))
    assert hops(route) == [("p", 1, 11)]


def test_no_route_names_the_missing_stages() -> None:
    swarm = [peer("a", 0, 5), peer("b", 8, 10), peer("d", 5, 8, state=PeerState.DRAINING)]
    with pytest.raises(NoRouteError) as caught:
        find_route(swarm, request=request())
    assert caught.value.missing_stages == (5, 6, 7)
    assert dict(caught.value.excluded) == {"d": "draining"}
    assert str(caught.value) == "no peer serves stages 5-7 (peers left out: 1 draining)"


def test_no_route_only_blames_peers_that_would_have_helped() -> None:
    swarm = [peer("a", 0, 9), peer("far", 0, 3, state=PeerState.JOINING)]
    with pytest.raises(NoRouteError) as caught:
        find_route(swarm, request=request())
    assert str(caught.value) == "no peer serves stage 9"
    assert not caught.value.excluded


def test_prefers_one_peer_over_an_equal_compute_chain() -> None:
    # Same per-stage compute everywhere; the chain would win a tie on peer id ("c" < "z").
    swarm = [peer("c1", 0, 5), peer("c2", 5, 10), peer("z", 0, 10)]
    single = find_route(swarm, request=request())
    assert hops(single) == [("z", 0, 10)]
    chain = route_cost([Hop("c1", 0, 5), Hop("c2", 5, 10)], peers=swarm, request=request())
    extra_hop = CostModel().default_rtt_s / 2 + 4096 / 12.5e6
    assert chain - single.cost_s == pytest.approx(extra_hop)


def test_a_much_faster_chain_beats_the_extra_hop() -> None:
    swarm = [peer("c1", 0, 5, throughput=10_000), peer("c2", 5, 10, throughput=10_000),
             peer("z", 0, 10, throughput=10)]
    assert [h.peer_id for h in find_route(swarm, request=request()).hops] == ["c1", "c2"]


def test_measured_rtt_beats_the_default() -> None:
    swarm = [peer("far", 0, 10), peer("near", 0, 10), peer("unknown", 0, 10)]
    rtts = {"far": 0.3, "near": 0.01}
    assert hops(find_route(swarm, request=request(), rtt_s=rtts)) == [("near", 0, 10)]


def test_trust_penalty_steers_away_from_a_peer() -> None:
    swarm = [peer("a", 0, 10), peer("b", 0, 10)]
    route = find_route(swarm, request=request(), trust_penalty=lambda pid: 1.0 * (pid == "a"))
    assert hops(route) == [("b", 0, 10)]
    with pytest.raises(ValueError, match="trust penalty of a"):
        find_route(swarm, request=request(), trust_penalty=lambda pid: -1.0)


def test_excludes_short_cache_other_models_and_non_online_peers() -> None:
    swarm = [
        peer("a-small-cache", 0, 10, free_cache=100, throughput=1e6),
        peer("b-other-model", 0, 10, model_id="model-b", throughput=1e6),
        peer("c-joining", 0, 10, state=PeerState.JOINING, throughput=1e6),
        peer("d-unmeasured", 0, 10, throughput=0.0),
        peer("e-ok", 0, 10),
    ]
    route = find_route(swarm, request=request(cache_tokens=512))
    assert hops(route) == [("e-ok", 0, 10)]
    with pytest.raises(NoRouteError) as caught:
        find_route(swarm[:4], request=request(cache_tokens=512))
    assert dict(caught.value.excluded) == {
        "a-small-cache": "short of cache", "c-joining": "joining",
        "d-unmeasured": "without throughput",
    }


def test_cost_matches_the_formula() -> None:
    cost = CostModel(bandwidth_bytes_per_s=1e6, activation_bytes_per_token=1000)
    swarm = [peer("p", 0, 3, load=0.5)]
    route = find_route(
        swarm, request=request(0, 3, tokens_in_flight=4), cost=cost, rtt_s={"p": 0.02}
    )
    enter = leave = 0.01 + 4 * 1000 / 1e6
    per_stage = 4 / 100 * (1 + 0.5 / 0.5)
    assert route.cost_s == pytest.approx(enter + 3 * per_stage + leave)


def test_deterministic_whatever_the_input_order() -> None:
    swarm = [peer(f"p{i}", s, e) for i, (s, e) in enumerate([(0, 4), (0, 4), (4, 10), (4, 10)])]
    expected = hops(find_route(swarm, request=request()))
    assert expected == [("p0", 0, 4), ("p2", 4, 10)]  # ties go to the lowest id
    rng = random.Random(7)
    for _ in range(10):
        rng.shuffle(swarm)
        assert hops(find_route(swarm, request=request())) == expected


def test_rejects_duplicate_peers_and_bad_inputs() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        find_route([peer("a", 0, 10), peer("a", 0, 10)], request=request())
    with pytest.raises(ValueError, match="RTT to a"):
        find_route([peer("a", 0, 10)], request=request(), rtt_s={"a": -1.0})
    with pytest.raises(ValueError, match="0 <= start < end"):
        RouteRequest(model_id=MODEL, first=3, last=3)
    with pytest.raises(ValueError, match="tokens_in_flight"):
        request(tokens_in_flight=0)
    with pytest.raises(ValueError, match="load"):
        peer("a", 0, 1, load=1.5)
    with pytest.raises(ValueError, match="max_load"):
        CostModel(max_load=1.0)


def test_route_cost_rejects_routes_that_do_not_tile() -> None:
    swarm = [peer("a", 0, 10)]
    for bad in ([Hop("a", 0, 4), Hop("a", 5, 10)], [Hop("a", 0, 9)], [],
                [Hop("nobody", 0, 10)]):
        with pytest.raises(ValueError):
            route_cost(bad, peers=swarm, request=request())


def test_format_stages() -> None:
    assert format_stages([9, 5, 6, 7]) == "5-7, 9"
    assert format_stages([3]) == "3"


# --------------------------------------------------------------------------------------------
# Bans


def test_ban_doubles_per_failure_and_caps() -> None:
    bans = BanList(policy=BanPolicy(base_s=1.0, cap_s=5.0))
    now = 0.0
    durations = []
    for _ in range(5):
        bans = bans.record_failure("p", now=now)
        until = bans.entries["p"].banned_until
        durations.append(until - now)
        assert bans.is_banned("p", now=until - 1e-9)
        assert not bans.is_banned("p", now=until)
        now = until
    assert durations == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_success_resets_the_backoff() -> None:
    bans = BanList().record_failure("p", now=0.0).record_failure("p", now=1.0)
    assert bans.entries["p"].failures == 2
    bans = bans.record_success("p")
    assert bans.banned(now=1.5) == frozenset()
    assert bans.record_failure("p", now=2.0).entries["p"].banned_until == 3.0


def test_failures_during_a_ban_do_not_stack() -> None:
    bans = BanList().record_failure("p", now=0.0)
    assert bans.record_failure("p", now=0.5) is bans


def test_long_quiet_peers_are_forgotten() -> None:
    policy = BanPolicy(base_s=1.0, cap_s=60.0, forget_after_s=10.0)
    bans = BanList(policy=policy).record_failure("p", now=0.0).record_failure("q", now=0.0)
    bans = bans.record_failure("p", now=1.0)  # p: streak 2, banned until 3
    assert bans.record_failure("p", now=12.9).entries["p"].failures == 3
    assert bans.record_failure("p", now=13.0).entries["p"].failures == 1
    assert set(bans.prune(now=11.0).entries) == {"p"}
    assert bans.prune(now=0.0) is bans


def test_ban_list_is_a_pure_value() -> None:
    empty = BanList()
    banned = empty.record_failure("p", now=0.0)
    assert not empty.entries and set(banned.entries) == {"p"}
    assert banned.banned(now=0.5) == frozenset({"p"})
    with pytest.raises(ValueError, match="now"):
        banned.is_banned("p", now=math.nan)
    with pytest.raises(ValueError, match="cap_s"):
        BanPolicy(base_s=2.0, cap_s=1.0)


# --------------------------------------------------------------------------------------------
# Seeded simulations


def random_swarm(
    rng: random.Random, *, peers: int, stages: int
) -> tuple[list[PeerSnapshot], dict[str, float], frozenset[str]]:
    swarm = []
    for i in range(peers):
        # Starts lean toward 0 and spans toward long, so most swarms cover the model and the
        # search (not only the error path) gets exercised.
        start = 0 if rng.random() < 0.15 else rng.randrange(stages)
        end = rng.randint(start + 1, min(stages, start + rng.randint(stages // 4, stages)))
        swarm.append(peer(
            f"p{i:03d}", start, end,
            throughput=rng.choice([0.0, 10.0, 50.0, 100.0, 100.0, 400.0, 400.0]),
            state=rng.choices(list(PeerState), weights=[1, 12, 1])[0],
            load=rng.choice([0.0, 0.0, 0.3, 0.7, 0.99]),
            free_cache=rng.choice([0, 4096, 4096, 8192]),
            model_id=MODEL if rng.random() < 0.9 else "model-b",
        ))
    rtts = {p.peer_id: rng.uniform(0.001, 0.3) for p in swarm if rng.random() < 0.7}
    banned = frozenset(p.peer_id for p in swarm if rng.random() < 0.1)
    return swarm, rtts, banned


def eligible(p: PeerSnapshot, req: RouteRequest, banned: frozenset[str]) -> bool:
    return (p.model_id == req.model_id and p.state is PeerState.ONLINE
            and p.peer_id not in banned and p.throughput_tokens_per_s > 0
            and p.free_cache_tokens >= req.cache_tokens)


def random_request(rng: random.Random, stages: int) -> RouteRequest:
    first = rng.choice([0, 0, 1])
    last = rng.choice([stages, stages, stages - 1])
    return request(first, last, tokens_in_flight=rng.choice([1, 1, 64]),
                   cache_tokens=rng.choice([0, 256, 4096]))


def test_simulated_swarms_keep_the_invariants() -> None:
    rng = random.Random(20240601)
    stages = 34  # 32 blocks + embedding + head
    routed = 0
    for _ in range(200):
        swarm, rtts, banned = random_swarm(rng, peers=50, stages=stages)
        req = random_request(rng, stages)
        by_id = {p.peer_id: p for p in swarm}
        ok = [p for p in swarm if eligible(p, req, banned)]
        try:
            route = find_route(swarm, request=req, rtt_s=rtts, banned=banned)
        except NoRouteError as exc:
            uncovered = tuple(s for s in range(req.first, req.last)
                              if not any(p.serves(s) for p in ok))
            assert exc.missing_stages == uncovered and uncovered
            continue
        routed += 1
        assert route.hops[0].start == req.first and route.hops[-1].end == req.last
        for before, after in itertools.pairwise(route.hops):
            assert before.end == after.start
            assert before.peer_id != after.peer_id  # a peer is never split into two hops
        for hop in route.hops:
            p = by_id[hop.peer_id]
            assert eligible(p, req, banned) and p.start <= hop.start < hop.end <= p.end
        assert route.cost_s == route_cost(route.hops, peers=swarm, request=req, rtt_s=rtts)
    assert routed > 100  # the generator must exercise the search, not only the error


def all_routes(swarm: Sequence[PeerSnapshot], first: int, last: int) -> Iterator[list[Hop]]:
    if first == last:
        yield []
        return
    for p in swarm:
        if p.serves(first):
            for end in range(first + 1, min(p.end, last) + 1):
                for rest in all_routes(swarm, end, last):
                    yield [Hop(p.peer_id, first, end), *rest]


def test_route_cost_is_the_brute_force_minimum() -> None:
    rng = random.Random(99)
    stages = 6
    checked = 0
    for _ in range(300):
        swarm, rtts, banned = random_swarm(rng, peers=8, stages=stages)
        req = random_request(rng, stages)
        ok = [p for p in swarm if eligible(p, req, banned)]
        penalties = {p.peer_id: rng.choice([0.0, 0.0, 0.05]) for p in swarm}
        costs = [
            route_cost(r, peers=swarm, request=req, rtt_s=rtts,
                       trust_penalty=penalties.__getitem__)
            for r in all_routes(ok, req.first, req.last)
        ]
        if not costs:
            with pytest.raises(NoRouteError):
                find_route(swarm, request=req, rtt_s=rtts, banned=banned)
            continue
        route = find_route(swarm, request=req, rtt_s=rtts, banned=banned,
                           trust_penalty=penalties.__getitem__)
        assert route.cost_s == pytest.approx(min(costs), rel=1e-12)
        checked += 1
    assert checked > 60
