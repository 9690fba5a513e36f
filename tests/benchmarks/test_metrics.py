"""Aggregation math on synthetic samples."""

from __future__ import annotations

import math

import pytest

from benchmarks.metrics import (
    Sample,
    aggregate,
    classify_route,
    coefficient_of_variation,
    hit_ratio_timeline,
    merge_engine_stats,
    percentile,
    route_outcomes,
)


def test_percentile_interpolates_between_ranks() -> None:
    values = [float(v) for v in range(1, 11)]  # 1..10
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 10.0
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 90) == pytest.approx(9.1)
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_coefficient_of_variation() -> None:
    assert coefficient_of_variation([5, 5, 5, 5]) == 0.0
    assert coefficient_of_variation([0, 0, 0, 8]) == pytest.approx(math.sqrt(3))
    assert coefficient_of_variation([0, 0]) == 0.0
    assert coefficient_of_variation([]) is None


def test_classify_route() -> None:
    assert classify_route("") == ""
    assert classify_route("fallback") == "fallback"
    assert classify_route("cache-hit") == "routed"
    assert classify_route("routed") == "routed"
    assert classify_route("reason=kv_prefix; hinted=e1; used=yes; matched=512") == "routed"
    assert classify_route("reason=kv_prefix; hinted=e1; used=no") == "fallback"
    assert classify_route("reason=no_match; hinted=-; used=no") == "fallback"
    assert classify_route("reason=load; hinted=e2; used=yes; matched=0; prompt=547") == "fallback"
    assert classify_route("reason=cache; hinted=e2; used=yes; matched=512; prompt=546") == "routed"


def _s(i: int, *, start: float, ttft: float, end: float, endpoint: str, prompt: int, cached: int,
       ok: bool = True, route: str = "") -> Sample:
    return Sample(session_id=f"s{i}", turn=0, start_s=start, end_s=end, ok=ok,
                  first_token_s=start + ttft if ok else None, itl_s=(0.01, 0.03) if ok else (),
                  prompt_tokens=prompt, cached_tokens=cached, completion_tokens=10 if ok else 0,
                  usage_seen=ok, endpoint=endpoint, route=route, error="" if ok else "timeout")


def test_aggregate_on_synthetic_samples() -> None:
    samples = [
        _s(0, start=0.0, ttft=0.1, end=1.0, endpoint="a", prompt=100, cached=0, route="fallback"),
        _s(1, start=0.5, ttft=0.2, end=1.5, endpoint="a", prompt=100, cached=80, route="routed"),
        _s(2, start=1.0, ttft=0.3, end=2.0, endpoint="b", prompt=200, cached=120, route="routed"),
        _s(3, start=1.0, ttft=0.4, end=4.0, endpoint="b", prompt=100, cached=0),
        _s(4, start=2.0, ttft=0.0, end=3.0, endpoint="a", prompt=999, cached=999, ok=False),
    ]
    m = aggregate(samples, engines=["a", "b", "c"])
    assert m["requests"] == 5 and m["completed"] == 4 and m["errors"] == 1
    assert m["error_kinds"] == {"timeout": 1}
    assert m["hit_ratio"] == pytest.approx(200 / 500)
    assert m["ttft_p50_s"] == pytest.approx(0.25)
    assert m["ttft_p99_s"] == pytest.approx(0.397)
    assert m["e2e_p50_s"] == pytest.approx(1.0)
    assert m["itl_p50_s"] == pytest.approx(0.02)
    assert m["wall_s"] == pytest.approx(4.0)
    assert m["throughput_rps"] == pytest.approx(1.0)
    assert m["output_tps"] == pytest.approx(10.0)
    assert m["routed"] == 2 and m["fallback"] == 1
    per = m["per_engine"]
    assert per["a"]["requests"] == 2 and per["b"]["requests"] == 2 and per["c"]["requests"] == 0
    assert per["b"]["hit_ratio"] == pytest.approx(120 / 300)
    assert per["c"]["hit_ratio"] is None
    assert m["load_cv"] == pytest.approx(coefficient_of_variation([2, 2, 0]), abs=1e-4)
    assert m["unattributed"] == 0


def test_missing_verdict_counts_as_fallback_only_when_routing_is_expected() -> None:
    samples = [_s(0, start=0, ttft=0.1, end=1, endpoint="a", prompt=10, cached=0)]
    assert aggregate(samples)["fallback"] == 0
    assert aggregate(samples, routing_expected=True)["fallback"] == 1


def test_aggregate_of_nothing_is_empty_not_an_error() -> None:
    m = aggregate([], engines=["a"])
    assert m["requests"] == 0 and m["hit_ratio"] is None and m["throughput_rps"] is None
    assert m["load_cv"] is None


def test_engine_counters_replace_missing_attribution() -> None:
    samples = [_s(i, start=0, ttft=0.1, end=1, endpoint="", prompt=10, cached=5) for i in range(4)]
    m = aggregate(samples, engines=["a", "b"])
    assert m["unattributed"] == 4
    merge_engine_stats(m, {"a": {"requests": 3, "prompt_tokens": 30, "cached_tokens": 15},
                           "b": {"requests": 1, "prompt_tokens": 10, "cached_tokens": 0}})
    assert m["per_engine"]["a"]["requests"] == 3
    assert m["load_cv"] == pytest.approx(0.5)


def test_hit_ratio_timeline_bins_by_completion_time() -> None:
    samples = [
        _s(0, start=0.0, ttft=0.1, end=1.0, endpoint="a", prompt=100, cached=0),
        _s(1, start=0.0, ttft=0.1, end=9.0, endpoint="a", prompt=100, cached=100),
    ]
    line = hit_ratio_timeline(samples, bins=2)
    assert [p["hit_ratio"] for p in line] == [0.0, 1.0]


def test_route_outcomes_compare_the_expected_match_with_the_engine_report() -> None:
    route = "reason={}; hinted=e; used=yes; matched={}; prompt=600; endpoint=e"
    samples = [
        _s(0, start=0.0, ttft=0.1, end=1.0, endpoint="e", prompt=600, cached=512,
           route=route.format("cache", 512)),
        _s(1, start=0.0, ttft=0.1, end=1.0, endpoint="e", prompt=600, cached=256,
           route=route.format("cache", 512)),
        _s(2, start=0.0, ttft=0.1, end=1.0, endpoint="e", prompt=600, cached=16,
           route=route.format("cache", 512)),
        _s(3, start=0.0, ttft=0.1, end=1.0, endpoint="e", prompt=600, cached=32,
           route=route.format("load", 0)),
        _s(4, start=0.0, ttft=0.1, end=1.0, endpoint="e", prompt=600, cached=0,
           route=route.format("load", 0)),
        _s(5, start=0.0, ttft=0.1, end=1.0, endpoint="e", prompt=600, cached=0, route="routed"),  # no matched
        _s(6, start=0.0, ttft=0.1, end=1.0, endpoint="e", prompt=600, cached=0, ok=False,
           route=route.format("cache", 512)),
    ]
    assert route_outcomes(samples) == {"held": 2, "short": 1, "unexpected": 1, "cold": 1}
    assert aggregate(samples)["route_outcomes"] == {"held": 2, "short": 1, "unexpected": 1, "cold": 1}
