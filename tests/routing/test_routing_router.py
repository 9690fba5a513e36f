"""The Router: one cost per endpoint, overload guard, bursts, hot prefixes, sessions, feedback."""

from __future__ import annotations

import copy
import random
from collections import Counter

import attrs
import pytest

from pixiu_kv.routing import Decision, EndpointView, Router, RoutingConfig


def _prompt(seed: int, n: int) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(32000) for _ in range(n)]


def _fleet(n: int = 4, max_in_flight: int = 64, **in_flight: int) -> list[EndpointView]:
    return [EndpointView(f"e{i}", in_flight=in_flight.get(f"e{i}", 0), max_in_flight=max_in_flight)
            for i in range(n)]


def _holding(prefix_tokens: int, **config: object) -> tuple[Router, list[int]]:
    """A router (no hot spread, no sessions) that believes e0 holds a ``prefix_tokens`` prefix."""
    router = Router(RoutingConfig(hot_spread=False, session_affinity=False, **config))  # type: ignore[arg-type]
    prefix = _prompt(1, prefix_tokens)
    assert router.index is not None
    router.index.record("e0", prefix)
    return router, prefix


def _serve(router: Router, d: Decision, ttft: float = 0.05) -> None:
    router.on_first_byte(d, ttft)
    router.on_complete(d, cached_tokens=None, prompt_tokens=None)


# -- cache vs load ----------------------------------------------------------------------

@pytest.mark.parametrize(("case", "e0", "queued_before", "winner_is_holder", "reason"), [
    ("idle holder wins on cache", {}, 0, True, "cache"),
    ("holder near its in-flight cap gets no cache credit", {"in_flight": 58}, 0, False, "load"),
    ("full holder is not eligible", {"in_flight": 64}, 0, False, "load"),
    ("unhealthy holder is not eligible", {"healthy": False}, 0, False, "load"),
    ("holder with a long prefill queue gets no cache credit", {}, 12, False, "load"),
])
def test_overload_beats_affinity(case: str, e0: dict[str, object], queued_before: int,
                                 winner_is_holder: bool, reason: str) -> None:
    router = Router(RoutingConfig(hot_spread=False, session_affinity=False))
    prompt = _prompt(1, 3000)
    assert router.index is not None
    router.index.record("e0", prompt)
    fleet = _fleet()
    # Queue work on e0 only (its own distinct prompts, in one instant): 12 x 0.5 s > 5 s guard.
    for i in range(queued_before):
        router.decide([fleet[0]], _prompt(100 + i, 4000), None, None, now=1.0)
    fleet[0] = attrs.evolve(fleet[0], **e0)  # type: ignore[arg-type]
    d = router.decide(fleet, prompt + _prompt(2, 50), None, None, now=1.0)
    assert (d.endpoint_id == "e0") is winner_is_holder, case
    assert d.reason == reason, case
    if not winner_is_holder:
        assert d.matched_tokens == 0


def test_a_saturated_fleet_keeps_cache_affinity() -> None:
    # Every engine has ~4.5 s queued (past a 2 s guard): none is faster than another, so
    # computing the prefix again elsewhere would only add work; the holder keeps its credit.
    router = Router(RoutingConfig(hot_spread=False, session_affinity=False, overload_queue_time=2.0))
    prompt = _prompt(1, 3000)
    assert router.index is not None
    router.index.record("e2", prompt)
    fleet = _fleet()
    for e, view in enumerate(fleet):
        for i in range(9):
            router.decide([view], _prompt(100 + 10 * e + i, 4000), None, None, now=1.0)
    d = router.decide(fleet, prompt + _prompt(2, 50), None, None, now=1.0)
    assert (d.endpoint_id, d.reason) == ("e2", "cache")
    assert d.matched_tokens > 2800  # whole blocks of the 3000-token prompt


@pytest.mark.parametrize(("others_in_flight", "expect"), [
    (0, ("e1", "load")),      # the holder carries more than its share: the guard moves the request
    (12, ("e0", "affinity")),  # every engine carries as much: its queue is not a hot spot
])
def test_the_queue_guard_fires_only_on_an_endpoint_above_the_mean_load(
        others_in_flight: int, expect: tuple[str, str]) -> None:
    # e0 holds the prefix and has 12 x 0.5 s queued (past the 5 s guard). When the others
    # carry as many requests, that queue is the whole fleet's state (a KV-bound fleet waits
    # everywhere): moving the request would only compute the prefix a second time.
    router, prefix = _holding(3000)
    for i in range(12):
        router.decide([EndpointView("e0", max_in_flight=64)], _prompt(100 + i, 4000), None, None, now=1.0)
    fleet = [EndpointView("e0", in_flight=12, max_in_flight=64)] + [
        EndpointView(f"e{i}", in_flight=others_in_flight, max_in_flight=64) for i in (1, 2, 3)]
    d = router.decide(fleet, prefix + _prompt(2, 50), None, None, now=1.0)
    assert (d.endpoint_id, d.reason) == expect
    assert (d.matched_tokens > 2800) is (expect[0] == "e0")


@pytest.mark.parametrize(("holder_queue_requests", "duplicate_cost_factor", "expect_holder"), [
    (0, 0.0, True),   # cached prefix: ~2 s of prefill saved
    (1, 0.0, True),   # 0.5 s queued < 2 s saved
    (3, 0.0, True),   # 1.5 s queued < 2 s saved
    (5, 0.0, False),  # 2.5 s queued > 2 s saved: computing it again elsewhere is faster
    (5, 1.0, True),   # ... but a copy costs cache space: spill only past twice the savings
    (9, 1.0, False),  # 4.5 s queued
])
def test_cache_and_queue_are_traded_in_one_cost(holder_queue_requests: int, duplicate_cost_factor: float,
                                                expect_holder: bool) -> None:
    # 2 s of prefill at the prior 8000 tokens/s
    router, prefix = _holding(16_000, overload_queue_time=10.0, duplicate_cost_factor=duplicate_cost_factor)
    fleet = _fleet(2)
    for i in range(holder_queue_requests):
        router.decide([fleet[0]], _prompt(100 + i, 4000), None, None, now=1.0)
    d = router.decide(fleet, prefix + _prompt(2, 100), None, None, now=1.0)
    assert (d.endpoint_id == "e0") is expect_holder
    assert d.reason == ("cache" if expect_holder else "load")
    assert d.predicted_ttft is not None
    assert d.predicted_ttft == next(c.predicted_ttft for c in d.costs if c.endpoint_id == d.endpoint_id)


@pytest.mark.parametrize(("case", "holder_load", "factor", "expect_holder"), [
    # 4 endpoints, the others at 8 in flight each; the holder has 3 s of queued prefill, the
    # others none: by the predicted TTFT alone, computing the prefix again elsewhere is faster.
    ("cost alone: the faster non-holder wins", 8, 0.0, False),
    ("bounded: the holder keeps it at the mean load", 8, 1.25, True),
    ("bounded: ... and up to 1.25 x the mean + 1", 11, 1.25, True),
    ("bounded: past the bound the cost decides again", 13, 1.25, False),
    ("a looser bound keeps it longer", 13, 2.0, True),
])
def test_bounded_load_affinity_keeps_a_prefix_on_its_holder(case: str, holder_load: int, factor: float,
                                                            expect_holder: bool) -> None:
    # 1 s of prefill at the prior 8000 tokens/s
    router, prefix = _holding(8000, duplicate_cost_factor=0.0, affinity_load_factor=factor)
    holder = EndpointView("e0", in_flight=holder_load, max_in_flight=64)
    for i in range(6):  # 6 x 0.5 s queued on the holder, within the 5 s overload guard
        d = router.decide([holder], _prompt(100 + i, 4000), None, None, now=1.0)
        assert d.endpoint_id == "e0"
    fleet = [holder] + [EndpointView(f"e{i}", in_flight=8, max_in_flight=64) for i in (1, 2, 3)]
    d = router.decide(fleet, prefix + _prompt(2, 100), None, None, now=1.0)
    assert (d.endpoint_id == "e0") is expect_holder, case
    assert d.reason == ("affinity" if expect_holder else "load"), case
    assert d.matched_tokens == (7936 if expect_holder else 0), case  # whole 256-token blocks
    # The explanation shows a cheaper endpoint than the winner when the bound decided.
    assert (d.costs[0].endpoint_id != "e0") is True, case


def test_bounded_load_affinity_allows_a_heavier_endpoint_more_load() -> None:
    # Weight 2 = twice the hardware: its bound is twice the mean load per unit of weight.
    for weight, load, expect_holder in [(1, 14, False), (2, 14, True)]:
        router, prefix = _holding(8000, duplicate_cost_factor=0.0, affinity_load_factor=1.25)
        holder = EndpointView("e0", in_flight=load, max_in_flight=64, weight=weight)
        others = [EndpointView(f"e{i}", in_flight=8, max_in_flight=64) for i in (1, 2, 3)]
        for i in range(6):  # queued prefill on the holder: by cost alone, another is faster
            router.decide([holder], _prompt(100 + i, 4000), None, None, now=1.0)
        # 1.25 x (14 + 24) / (weight + 3) per unit of weight, + 1: 12.9 (weight 1), 20 (weight 2)
        d = router.decide([holder, *others], prefix + _prompt(2, 100), None, None, now=1.0)
        assert (d.endpoint_id == "e0") is expect_holder, weight
        assert d.reason == ("affinity" if expect_holder else "load")
        assert d.costs[0].endpoint_id != "e0"  # the cost alone would not have chosen it


@pytest.mark.parametrize(("engine_kv_tokens", "expect"), [(0, "e0"), (10_000, "e1")])
def test_a_full_kv_cache_steers_a_request_away_from_its_prefix(engine_kv_tokens: int, expect: str) -> None:
    router = Router(RoutingConfig(hot_spread=False, session_affinity=False, affinity_load_factor=0.0,
                                  engine_kv_tokens=engine_kv_tokens))
    e0, e1 = EndpointView("e0", max_in_flight=64), EndpointView("e1", max_in_flight=64)
    # One request lives 9 s on e0 (its lifetime there), reporting 100 output tokens.
    d = router.decide([e0], _prompt(50, 1000), None, None, now=0.0)
    router.on_first_byte(d, 0.2)
    router.on_complete(d, cached_tokens=0, prompt_tokens=1000, now=9.0, completion_tokens=100)
    # Four 2300-token requests now decode on e0 (prefilled: no queue, but their KV is held).
    for i in range(4):
        d = router.decide([e0], _prompt(100 + i, 2300), None, None, now=10.0)
        router.on_first_byte(d, 0.0)
    prefix = _prompt(1, 1024)
    assert router.index is not None
    router.index.record("e0", prefix)
    d = router.decide([e0, e1], prefix + _prompt(2, 976), None, None, now=10.0)
    # e0 saves 1024 tokens of prefill (~0.13 s) but holds 9220 of its 10000 KV tokens
    # (4 x (2300 + 5 output tokens, the learned mean)): the new request (976 + 5 tokens of
    # its own, its 1024-token prefix revived) overflows by 1225, so waits for 1225 / 9220 of
    # e0's requests to end: ~1.2 s of their 9 s lifetime.
    assert d.endpoint_id == expect
    costs = {c.endpoint_id: c.predicted_ttft for c in d.costs}
    if engine_kv_tokens:
        assert costs["e0"] - costs["e1"] > 0.5
    else:
        assert costs["e0"] < costs["e1"]


def test_a_burst_sees_its_own_reservations_and_never_overruns_an_endpoint() -> None:
    router = Router(RoutingConfig(hot_spread=False))
    fleet = _fleet(4, max_in_flight=8)
    prompt = _prompt(1, 2000)
    decisions = [router.decide(fleet, prompt, None, None, now=0.0) for _ in range(40)]
    placed = Counter(d.endpoint_id for d in decisions if d.endpoint_id is not None)
    assert len(placed) == 4
    assert max(placed.values()) <= 8  # the proxy's in_flight (0 here) lags: reservations count
    assert sum(placed.values()) == 32
    assert all(d.reason == "no-endpoint" for d in decisions[32:])


def test_a_burst_goes_to_the_cache_holder_while_it_is_cheap_then_spills() -> None:
    router = Router(RoutingConfig(hot_spread=False))
    fleet = _fleet(4, max_in_flight=16)
    prompt = _prompt(1, 4000)
    first = router.decide(fleet, prompt, None, None, now=0.0)
    holder = first.endpoint_id
    router.on_first_byte(first, 0.5)  # its prefill is done: the prefix is cached there
    burst = [router.decide(fleet, prompt, None, None, now=1.0) for _ in range(30)]
    on_holder = [d for d in burst if d.endpoint_id == holder]
    # Cached requests are cheap: the holder takes them until the overload guard (85% of 16)...
    assert len(on_holder) == 13
    assert all(d.reason == "cache" and d.matched_tokens == 3840 for d in burst[:13])  # whole blocks
    assert [d.endpoint_id for d in burst[:13]] == [holder] * 13
    # ... then the burst spills to the others, which compute the prompt themselves once each
    # and take the rest as cache hits of their own.
    spilled = burst[13:]
    assert {d.endpoint_id for d in spilled} - {holder}
    assert spilled[0].matched_tokens == 0


# -- new prefixes ----------------------------------------------------------------------

def _spreading(spread: bool = True) -> Router:
    return Router(RoutingConfig(hot_spread=False, session_affinity=False, new_prefix_spread=spread))


@pytest.mark.parametrize("spread", [True, False])
def test_new_prompts_spread_over_the_endpoints_that_got_fewest_requests(spread: bool) -> None:
    router = _spreading(spread)
    fleet = _fleet()
    counts: Counter[str] = Counter()
    for i in range(12):  # distinct prompts, each served before the next arrives
        d = router.decide(fleet, _prompt(300 + i, 3000), None, None, now=float(i))
        assert d.endpoint_id is not None
        counts[d.endpoint_id] += 1
        _serve(router, d)
    if spread:
        assert counts == {"e0": 3, "e1": 3, "e2": 3, "e3": 3}
    else:
        assert router.stats().decisions.get("new-prefix", 0) == 0


@pytest.mark.parametrize(
        ("case", "shared", "new", "e1_in_flight", "e2_queue", "spread", "expect", "reason"), [
    # e0 holds a 256-token system prompt and served a request lately; the new prompt is the
    # system prompt and 3000 new tokens: e0 is cheapest by the prefill it saves.
    ("a mostly new prompt goes where fewest requests went lately", 256, 3000, 0, 0, True,
     {"e1", "e2", "e3"}, "new-prefix"),
    ("off: the short prefix's holder takes it", 256, 3000, 0, 0, False, {"e0"}, "cache"),
    ("a prompt mostly held follows its holder", 2048, 1000, 0, 0, True, {"e0"}, "cache"),
    ("never to a more loaded endpoint", 256, 3000, 1, 0, True, {"e2", "e3"}, "new-prefix"),
    ("never to one slower by more than the match saves", 256, 3000, 1, 2, True, {"e3"}, "new-prefix"),
])
def test_a_new_prefix_is_placed_by_recent_requests_within_the_cost_band(
        case: str, shared: int, new: int, e1_in_flight: int, e2_queue: int, spread: bool,
        expect: set[str], reason: str) -> None:
    router = _spreading(spread)
    system = _prompt(1, shared)
    # e0 served one request with the system prompt (it holds it and got a request lately).
    d = router.decide([EndpointView("e0")], system + _prompt(2, 64), None, None, now=0.0)
    _serve(router, d)
    # Queued prefill on e2: ``e2_queue`` requests of 1 s each (8000 tokens at the prior).
    for i in range(e2_queue):
        router.decide([EndpointView("e2")], _prompt(400 + i, 8000), None, None, now=0.5)
    fleet = [EndpointView("e0"), EndpointView("e1", in_flight=e1_in_flight), EndpointView("e2"),
             EndpointView("e3")]
    d = router.decide(fleet, system + _prompt(3, new), None, None, now=1.0)
    assert d.endpoint_id in expect and d.reason == reason, case
    # The holder is the cheapest by the cost alone: the explanation shows what was passed over.
    assert d.costs[0].endpoint_id == "e0", case


# -- hot prefixes ---------------------------------------------------------------------

def _hot_traffic(router: Router, fleet: list[EndpointView], n: int) -> Counter[str | None]:
    """A shared prefix arriving faster than it is served: requests pile up in flight."""
    system = _prompt(1, 2048)
    placed: Counter[str | None] = Counter()
    for i in range(n):
        d = router.decide(fleet, system + _prompt(1000 + i, 64), None, None, now=i * 0.02)
        placed[d.endpoint_id] += 1
    return placed


def test_a_hot_prefix_is_placed_on_more_engines_and_named_for_pinning() -> None:
    fleet = _fleet(4)
    cold = Router(RoutingConfig(hot_spread=False))
    placed_cold = _hot_traffic(cold, fleet, 50)
    # The holder keeps it until its queue (each request holds the engine for its fixed part
    # and its uncached tokens) passes the recomputation plus the duplicate penalty; then one
    # more engine computes it. No replicas are planned.
    assert len(placed_cold) <= 2 and max(placed_cold.values()) >= 30
    assert cold.hot_placements() == []

    hot = Router(RoutingConfig(hot_spread=True, hot_threshold=1.0))
    placed_hot = _hot_traffic(hot, fleet, 50)
    # 100% of traffic = 4 engines' fair share -> up to 4 replicas, added while they are busy.
    assert len(placed_hot) == 4
    assert max(placed_hot.values()) < 30
    placements = hot.hot_placements(now=1.0)
    assert {p.endpoint_id for p in placements} == {"e0", "e1", "e2", "e3"}
    assert len({p.key for p in placements}) == 1
    assert placements[0].tokens == tuple(_prompt(1, 2048))
    assert len(placements[0].chunk_aligned(256)) == 2048
    assert hot.stats().decisions["hot-spread"] >= 3  # one first placement per new replica


def test_a_popular_prefix_whose_engines_keep_up_is_not_copied() -> None:
    router = Router(RoutingConfig(hot_spread=True))
    fleet = _fleet(4)
    system = _prompt(1, 2048)
    placed: Counter[str | None] = Counter()
    for i in range(100):
        # 40% of the traffic (1.6 engines' fair shares), each served before the next arrives.
        prompt = system + _prompt(1000 + i, 64) if i % 5 < 2 else _prompt(5000 + i, 2112)
        d = router.decide(fleet, prompt, None, None, now=i * 0.1)
        if i % 5 < 2:
            placed[d.endpoint_id] += 1
        _serve(router, d)
    assert len(placed) == 1
    assert router.hot_placements(now=10.0) == []


def test_a_prompt_shared_by_every_request_is_copied_everywhere_and_spread_evenly() -> None:
    # One engine keeps up with it, but it would take all the fleet's requests: a prefix
    # drawing at least two engines' fair shares is copied without waiting for a queue, and
    # once every engine holds it, equal costs go to whichever got fewer requests lately.
    router = Router(RoutingConfig(hot_spread=True))
    fleet = _fleet(4)
    system = _prompt(1, 2048)
    placed: Counter[str | None] = Counter()
    for i in range(80):
        d = router.decide(fleet, system + _prompt(1000 + i, 64), None, None, now=i * 0.1)
        placed[d.endpoint_id] += 1
        _serve(router, d)
    assert set(placed) == {"e0", "e1", "e2", "e3"}
    assert max(placed.values()) - min(placed.values()) <= 2
    assert {p.endpoint_id for p in router.hot_placements(now=8.0)} == {"e0", "e1", "e2", "e3"}


def test_replicas_grow_with_popularity_and_cold_prefixes_are_dropped() -> None:
    router = Router(RoutingConfig(hot_threshold=1.0, hot_window=10.0))
    fleet = _fleet(8)
    hot_prefix = _prompt(1, 1024)
    now = 0.0
    # Half of the traffic shares a prefix: 4 fair shares of 8 engines -> up to 4 replicas.
    for i in range(300):
        now += 0.01
        prompt = hot_prefix + _prompt(10_000 + i, 64) if i % 2 else _prompt(20_000 + i, 1088)
        router.decide(fleet, prompt, None, None, now=now)
    placements = router.hot_placements(now)
    assert len({p.endpoint_id for p in placements}) == 4
    assert all(p.tokens == tuple(hot_prefix) for p in placements)
    # Long after the traffic stopped, nothing is hot any more: leave it to eviction.
    assert router.hot_placements(now + 300.0) == []


# -- session affinity ---------------------------------------------------------------------

def test_session_fallback_is_stable_and_shared_by_independent_routers() -> None:
    a, b = Router(), Router()
    fleet = _fleet(5)
    for user in ("alice", "bob", "carol", "dave"):
        picks = set()
        for router in (a, b):
            for _ in range(3):
                d = router.decide(fleet, None, None, user, now=0.0)
                assert d.reason == "session"
                picks.add(d.endpoint_id)
                router.on_complete(d, None, None)
        assert len(picks) == 1, user


def test_session_load_is_bounded() -> None:
    router = Router(RoutingConfig(session_load_factor=1.25))
    fleet = _fleet(4, max_in_flight=1000)
    placed: Counter[str | None] = Counter()
    for i in range(400):
        placed[router.decide(fleet, None, None, f"user-{i % 7}", now=0.0).endpoint_id] += 1
    # Sessions of 7 users on 4 engines: hashing alone would pile them unevenly.
    assert max(placed.values()) <= 1.25 * 400 / 4 + 1


def test_session_moves_only_when_its_engine_goes() -> None:
    router = Router()
    fleet = _fleet(5)
    users = [f"user-{i}" for i in range(50)]
    before = {}
    for u in users:
        d = router.decide(fleet, None, None, u, now=0.0)
        before[u] = d.endpoint_id
        router.on_complete(d, None, None)
    gone = "e2"
    fleet = [attrs.evolve(v, healthy=False) if v.id == gone else v for v in fleet]
    for u in users:
        d = router.decide(fleet, None, None, u, now=1.0)
        router.on_complete(d, None, None)
        if before[u] != gone:
            assert d.endpoint_id == before[u], u
        else:
            assert d.endpoint_id != gone


def test_a_cache_signal_beats_the_session_hash() -> None:
    router = Router()
    fleet = _fleet(4)
    prompt = _prompt(1, 2000)
    d = router.decide(fleet, prompt, {"e3": 1792}, "alice", now=0.0)
    assert (d.endpoint_id, d.reason, d.matched_tokens) == ("e3", "cache", 1792)


# -- LMCache lookup, explanations, switches ----------------------------------------------

def test_lmcache_lookup_counts_as_a_match_and_unknown_instances_are_ignored() -> None:
    router = Router(RoutingConfig(prefix_index=False))
    fleet = _fleet(3)
    prompt = _prompt(1, 2048)
    d = router.decide(fleet, prompt, {"e1": 1024, "elsewhere": 2048}, None, now=0.0)
    assert (d.endpoint_id, d.reason, d.matched_tokens, d.prompt_tokens) == ("e1", "cache", 1024, 2048)
    hint = d.route_hint()
    assert (hint.endpoint_id, hint.reason, hint.matched_tokens) == ("e1", "cache", 1024)
    line = d.explain()
    assert line.startswith("endpoint=e1;reason=cache;matched=1024/2048;")
    assert str(prompt[0]) not in line.split(";", 3)[3]  # costs only, no token ids


def test_first_sight_prompt_is_routed_and_its_next_turn_follows_it() -> None:
    router = Router()
    fleet = _fleet(4)
    turn1 = _prompt(1, 1500)
    d1 = router.decide(fleet, turn1, None, None, now=0.0)
    assert d1.reason == "load"
    _serve(router, d1)
    turn2 = turn1 + _prompt(2, 300)
    d2 = router.decide(fleet, turn2, None, None, now=5.0)
    assert d2.endpoint_id == d1.endpoint_id
    assert (d2.reason, d2.matched_tokens) == ("cache", 1408)


def test_a_next_turn_keyed_by_extending_the_previous_turn_routes_like_its_full_keys() -> None:
    router = Router()
    fleet = _fleet(4)
    turn1 = router.prefix_keys(_prompt(1, 1500)).compact()
    d1 = router.decide(fleet, turn1, None, None, now=0.0)
    _serve(router, d1)
    turn2 = router.extend_keys(turn1, _prompt(2, 300))
    assert turn2.keys == router.prefix_keys(list(turn1.tokens) + _prompt(2, 300)).keys
    d2 = router.decide(fleet, turn2, None, None, now=5.0)
    assert (d2.endpoint_id, d2.reason, d2.matched_tokens) == (d1.endpoint_id, "cache", 1408)
    assert d2.prompt_tokens == 1800


def test_without_the_cost_model_the_best_match_wins_then_the_least_loaded() -> None:
    router = Router(RoutingConfig(cost_model=False, hot_spread=False))
    fleet = _fleet(3, e1=5, e2=1)
    d = router.decide(fleet, _prompt(1, 1000), {"e0": 256, "e1": 512, "e2": 512}, None, now=0.0)
    assert (d.endpoint_id, d.reason) == ("e2", "cache")
    d = router.decide(fleet, _prompt(2, 1000), None, None, now=0.0)
    assert (d.endpoint_id, d.reason) == ("e0", "load")


def test_without_session_affinity_no_session_decides() -> None:
    router = Router(RoutingConfig(session_affinity=False))
    reasons = {router.decide(_fleet(3), None, None, "alice", now=0.0).reason for _ in range(6)}
    assert reasons == {"load"}


def test_decisions_are_deterministic() -> None:
    def run() -> list[str | None]:
        router = Router()
        fleet = _fleet(6)
        out = []
        for i in range(50):
            d = router.decide(fleet, _prompt(i % 5, 800 + i), None, f"u{i % 3}", now=i * 0.01)
            out.append(d.endpoint_id)
            if i % 2:
                _serve(router, d)
        return out

    assert run() == run()


# -- feedback ---------------------------------------------------------------------------

def test_learned_costs_converge_from_observed_ttfts() -> None:
    router = Router(RoutingConfig(prefix_index=False, hot_spread=False))
    fleet = _fleet(1)
    rnd = random.Random(3)
    now = 0.0
    for i in range(300):
        prompt = _prompt(i, rnd.randrange(200, 6000))
        d = router.decide(fleet, prompt, None, None, now=now)
        ttft = 0.03 + len(prompt) / 3000  # the engine prefills 3000 tokens/s
        router.on_first_byte(d, ttft)
        now += ttft + 0.5
        router.on_complete(d, cached_tokens=0, prompt_tokens=len(prompt), now=now)
    learned = router.stats().endpoints[0]
    assert learned.prefill_tokens_per_second == pytest.approx(3000, rel=0.1)
    assert learned.base_latency == pytest.approx(0.03, abs=0.02)
    assert learned.samples == 300
    d = router.decide(fleet, _prompt(999, 3000), None, None, now=now)
    assert d.predicted_ttft == pytest.approx(1.03, rel=0.1)


def test_engine_reports_correct_the_index_through_the_router() -> None:
    router = Router(RoutingConfig(hot_spread=False))
    fleet = _fleet(2)
    old = _prompt(1, 1024)
    d = router.decide(fleet, old, None, None, now=0.0)
    _serve(router, d)
    holder = d.endpoint_id
    d2 = router.decide(fleet, old + _prompt(2, 64), None, None, now=100.0)
    assert (d2.endpoint_id, d2.matched_tokens) == (holder, 1024)
    router.on_first_byte(d2, 0.1)
    router.on_complete(d2, cached_tokens=0, prompt_tokens=1088, now=100.2)
    assert router.stats().corrections == 1


def test_failure_releases_the_reservation_and_the_unheld_blocks() -> None:
    router = Router(RoutingConfig(hot_spread=False))
    fleet = _fleet(2)
    prompt = _prompt(1, 2048)
    d = router.decide(fleet, prompt, None, None, now=0.0)
    assert router.stats().pending == 1
    router.on_failure(d)
    router.on_failure(d)  # twice is harmless
    assert router.stats().pending == 0
    assert router.index is not None
    assert router.index.match(prompt) == {}
    assert all(e.outstanding == 0 and e.queued_seconds == 0 for e in router.stats().endpoints)


def test_forgotten_callbacks_expire_and_pending_work_is_bounded() -> None:
    router = Router(RoutingConfig(reservation_timeout=10.0, max_pending=5, hot_spread=False))
    fleet = _fleet(2)
    for i in range(8):
        router.decide(fleet, _prompt(i, 100), None, None, now=0.0)
    assert router.stats().pending == 5
    router.decide(fleet, _prompt(99, 100), None, None, now=20.0)
    assert router.stats().pending == 1
    assert sum(e.outstanding for e in router.stats().endpoints) == 1


def test_no_endpoint_decision_reserves_nothing() -> None:
    router = Router()
    d = router.decide([EndpointView("e0", healthy=False)], _prompt(1, 100), None, None, now=0.0)
    assert (d.endpoint_id, d.reason, d.reservation) == (None, "no-endpoint", 0)
    router.on_complete(d, None, None)
    assert router.stats().pending == 0


def test_a_restarted_endpoint_holds_nothing_but_keeps_its_learned_speed() -> None:
    router = Router(RoutingConfig(hot_spread=False))
    fleet = _fleet(2)
    prompt = _prompt(1, 2048)
    d = router.decide(fleet, prompt, None, None, now=0.0)
    router.on_first_byte(d, 1.0)
    router.on_complete(d, cached_tokens=0, prompt_tokens=2048, now=1.5)
    learned = {e.endpoint_id: e.samples for e in router.stats().endpoints}
    assert d.endpoint_id is not None
    router.forget_endpoint(d.endpoint_id)
    assert router.index is not None
    assert router.index.match(prompt) == {}
    assert {e.endpoint_id: e.samples for e in router.stats().endpoints} == learned


# -- endpoints going down ---------------------------------------------------------------

def test_an_endpoint_seen_down_loses_what_it_was_believed_to_hold_once() -> None:
    router = Router(RoutingConfig(hot_spread=False, session_affinity=False))
    prompt = _prompt(7, 2048)
    first = router.decide(_fleet(), prompt, None, None, now=0.0)
    router.on_complete(first, cached_tokens=None, prompt_tokens=None)
    holder = first.endpoint_id
    assert holder is not None
    # Drained (or failing its checks): its engine may come back empty.
    drained = [attrs.evolve(v, healthy=False, down=True) if v.id == holder else v for v in _fleet()]
    away = router.decide(drained, prompt, None, None, now=0.1)
    assert away.endpoint_id != holder and away.reason == "load"
    router.on_complete(away, cached_tokens=None, prompt_tokens=None)
    keys = router.prefix_keys(prompt)
    assert router.index is not None
    assert router.index.match(keys) == {away.endpoint_id: 2048}
    # Back up: nothing is believed about it until it serves the prompt again, and being seen
    # up forgets nothing that is learned from then on.
    again = router.decide(_fleet(), prompt, None, None, now=0.2)
    assert again.endpoint_id == away.endpoint_id and again.reason == "cache"
    router.on_complete(again, cached_tokens=None, prompt_tokens=None)
    other = _prompt(8, 2048)
    back = router.decide([EndpointView(holder, max_in_flight=64)], other, None, None, now=0.3)
    router.on_complete(back, cached_tokens=None, prompt_tokens=None)
    router.decide(_fleet(), other, None, None, now=0.4)
    assert router.index.match(router.prefix_keys(other)).get(holder) == 2048


def test_a_cooling_down_endpoint_keeps_its_cache_beliefs() -> None:
    router = Router(RoutingConfig(hot_spread=False, session_affinity=False))
    prompt = _prompt(9, 2048)
    first = router.decide(_fleet(), prompt, None, None, now=0.0)
    _serve(router, first)
    holder = first.endpoint_id
    cooling = [attrs.evolve(v, healthy=False) if v.id == holder else v for v in _fleet()]
    router.decide(cooling, prompt, None, None, now=0.1)
    assert router.index is not None
    assert router.index.match(router.prefix_keys(prompt)).get(holder) == 2048


def test_an_engine_answering_later_than_predicted_gets_the_next_uncached_request_less() -> None:
    router = Router(RoutingConfig(hot_spread=False, session_affinity=False))
    fleet = _fleet(2)
    late = router.decide(fleet, _prompt(20, 1024), None, None, now=0.0)
    assert late.predicted_ttft is not None
    # Its first token comes a second later than the model predicted (a large decode batch,
    # another gateway's traffic): the model's open-loop queue does not see that.
    router.on_first_byte(late, late.predicted_ttft + 1.0)
    router.on_complete(late, cached_tokens=0, prompt_tokens=1024, now=1.5)
    nxt = router.decide(fleet, _prompt(21, 1024), None, None, now=1.5)
    assert nxt.endpoint_id != late.endpoint_id


def test_endpoints_of_equal_weight_share_one_learned_cost() -> None:
    router = Router(RoutingConfig(prefix_index=False, hot_spread=False, session_affinity=False))
    fleet = [EndpointView("a"), EndpointView("b"), EndpointView("big", weight=2)]
    for i in range(40):
        d = router.decide(fleet[:2], _prompt(i, 2000), None, None, now=float(i))
        router.on_first_byte(d, 0.5)
        router.on_complete(d, cached_tokens=0, prompt_tokens=2000, now=i + 0.6)
    router.decide(fleet, _prompt(99, 100), None, None, now=50.0)
    costs = {e.endpoint_id: e for e in router.stats().endpoints}
    assert costs["a"].prefill_tokens_per_second == costs["b"].prefill_tokens_per_second
    assert costs["a"].samples == costs["b"].samples == 40
    assert costs["big"].samples == 0  # other hardware: its own prior


@pytest.mark.parametrize(("kv_room", "teaches"), [(True, True), (False, False)])
def test_a_request_that_found_the_kv_cache_full_does_not_teach_the_prefill_cost(
        kv_room: bool, teaches: bool) -> None:
    # Its TTFT is mostly a wait for KV room (here 3 s for 1000 tokens): learning it as prefill
    # would make the engine look 20x slower and inflate every queue predicted there.
    router = Router(RoutingConfig(hot_spread=False, session_affinity=False,
                                  engine_kv_tokens=100_000 if kv_room else 3000))
    e0 = EndpointView("e0", max_in_flight=64)
    for i in range(2):  # two requests hold 2 x 1500 tokens of KV (nothing ends)
        router.on_first_byte(router.decide([e0], _prompt(10 + i, 1500), None, None, now=0.0), 0.2)
    d = router.decide([e0], _prompt(3, 1000), None, None, now=1.0)
    router.on_first_byte(d, 3.0)
    router.on_complete(d, cached_tokens=0, prompt_tokens=1000, now=6.0, completion_tokens=10)
    learned = router.stats().endpoints[0]
    assert (learned.samples == 1) is teaches
    if not teaches:
        assert learned.prefill_tokens_per_second == RoutingConfig().prefill_tokens_per_second


def test_a_request_lifetime_on_the_kv_cache_leaves_out_its_wait_for_room() -> None:
    # Decided at 0, first token at 4 s (it waited for room; ~0.15 s of prefill predicted),
    # done at 9 s: it held its KV blocks ~5.15 s, not 9 s. Counting the wait would make the
    # predicted wait of the next requests grow with every wait before them.
    router = Router(RoutingConfig(hot_spread=False, session_affinity=False, engine_kv_tokens=2000))
    e0 = EndpointView("e0", max_in_flight=64)
    d = router.decide([e0], _prompt(1, 1000), None, None, now=0.0)
    router.on_first_byte(d, 4.0)
    router.on_complete(d, cached_tokens=0, prompt_tokens=1000, now=9.0, completion_tokens=10)
    work = 0.02 + 1000 / 8000  # the prior: base latency + 1000 tokens at 8000 tokens/s
    assert router._states["e0"].kv.lifetime == pytest.approx(9.0 - 4.0 + work)
    # Without a first byte (a failed stream's end, a non-streamed reply) the whole time counts.
    d = router.decide([e0], _prompt(2, 1000), None, None, now=10.0)
    router.on_complete(d, cached_tokens=0, prompt_tokens=1000, now=13.0, completion_tokens=10)
    assert router._states["e0"].kv.lifetime == pytest.approx(5.145 + 0.1 * (3.0 - 5.145))


@pytest.mark.parametrize(("case", "cache_tokens", "prefix_tokens", "expect"), [
    ("reused prefix on a full engine: its whole chunks", 1500, 1000, 768),
    ("the engine has computed less than its cache holds: nothing", 1_000_000, 1000, 0),
    ("less than one LMCache chunk cached: nothing", 1500, 200, 0),
])
def test_compress_when_full_asks_for_a_reused_prefix_on_a_full_engine(
        case: str, cache_tokens: int, prefix_tokens: int, expect: int) -> None:
    router = Router(RoutingConfig(hot_spread=False, session_affinity=False, compress_when_full=True,
                                  engine_cache_tokens=cache_tokens))
    e0 = EndpointView("e0", max_in_flight=64)
    prefix = _prompt(1, prefix_tokens)
    d = router.decide([e0], prefix, None, None, now=1.0)  # first sight: computed, not reused
    assert d.compress_tokens == 0, case
    for i in range(2):  # e0 computes 2 x 1500 other tokens: more than 1500 fit in its cache
        router.decide([e0], _prompt(10 + i, 1500), None, None, now=1.0)
    d = router.decide([e0], prefix + _prompt(2, 100), {"e0": prefix_tokens}, None, now=2.0)
    assert d.matched_tokens >= prefix_tokens - 16, case
    assert d.compress_tokens == expect, case
    if expect:
        # Once per prefix and endpoint per hot window (30 s), then again.
        again = router.decide([e0], prefix + _prompt(3, 100), {"e0": prefix_tokens}, None, now=3.0)
        assert again.compress_tokens == 0
        later = router.decide([e0], prefix + _prompt(4, 100), {"e0": prefix_tokens}, None, now=40.0)
        assert later.compress_tokens == expect


def test_compress_when_full_is_off_by_default() -> None:
    router = Router(RoutingConfig(hot_spread=False, session_affinity=False, engine_cache_tokens=1500))
    e0 = EndpointView("e0", max_in_flight=64)
    prefix = _prompt(1, 1000)
    router.decide([e0], prefix, None, None, now=1.0)
    for i in range(2):
        router.decide([e0], _prompt(10 + i, 1500), None, None, now=1.0)
    d = router.decide([e0], prefix + _prompt(2, 100), {"e0": 1000}, None, now=2.0)
    assert d.matched_tokens == 1000 and d.compress_tokens == 0


def test_the_decision_reads_queue_and_lag_as_their_methods_do_to_the_last_bit() -> None:
    """The decision loop reads each endpoint's queued prefill and lag inline (a call per
    endpoint cost ~5% of a decision): its prediction must hold exactly what
    PrefillQueue.backlog and PredictionLag.value give, and leave both as the methods would."""
    rnd = random.Random(3)
    router = Router(RoutingConfig(hot_spread=False, session_affinity=False, prefix_index=False))
    fleet = [EndpointView("e0", max_in_flight=100_000)]
    running = router.config.running_request_cost
    now = 0.0
    open_decisions: list[Decision] = []
    for _ in range(1500):
        now += rnd.choice([0.0, 0.0, 0.001, 0.05, 0.7])
        event = rnd.random()
        if event < 0.3 and open_decisions:
            router.on_first_byte(rnd.choice(open_decisions), rnd.uniform(0.0, 0.6))
        elif event < 0.45 and open_decisions:
            router.on_complete(open_decisions.pop(rnd.randrange(len(open_decisions))), None, None, now)
        state = router._states.get("e0")
        if state is None:
            open_decisions.append(router.decide(fleet, None, None, None, now))
            continue
        queue, lag, learner = copy.copy(state.queue), copy.copy(state.lag), copy.copy(state.learner)
        queued = queue.backlog(now) if queue.pending else 0.0
        if lag.level:
            queued += lag.value(now)
        load = max(0, queue.outstanding)
        d = router.decide(fleet, None, None, None, now)
        open_decisions.append(d)
        assert d.predicted_ttft == queued + running * load + learner.base + learner.per_token * 0 + 0.0
        queue.add(learner.predict(0), now)  # what the decision reserves
        assert (state.queue._backlog, state.queue._since, state.queue.pending, state.queue.outstanding) == (
            queue._backlog, queue._since, queue.pending, queue.outstanding)
        assert (state.lag.level, state.lag._since) == (lag.level, lag._since)
