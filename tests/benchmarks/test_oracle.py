"""The oracle's choice: minimum predicted TTFT from backlog and uncached prefill."""

from __future__ import annotations

import pytest

from benchmarks.oracle import CostRates, EngineView, choose, predict_ttft, prefill_seconds

RATES = CostRates(prefill_tokens_per_s=10_000.0, gpu_hit_seconds_per_token=2e-6,
                  load_tokens_per_s=50_000.0, speed=1.0)


def test_prefill_seconds_follow_the_cost_model() -> None:
    assert prefill_seconds(1000, 0, 0, RATES) == pytest.approx(0.1)
    assert prefill_seconds(1000, 512, 256, RATES) == pytest.approx(232 / 10_000 + 512 * 2e-6 + 256 / 50_000)
    fast = CostRates(10_000.0, 2e-6, 50_000.0, speed=4.0)
    assert prefill_seconds(1000, 0, 0, fast) == pytest.approx(0.025)


def test_cached_engine_wins_when_it_is_not_too_busy() -> None:
    views = [EngineView("cold", 0.0, 0, 0), EngineView("warm", 0.05, 896, 0)]
    assert choose(views, 1000, RATES) == 1
    assert predict_ttft(views[1], 1000, RATES) < predict_ttft(views[0], 1000, RATES)


def test_backlog_outweighs_cache_when_the_queue_is_long() -> None:
    views = [EngineView("cold", 0.0, 0, 0), EngineView("warm", 0.5, 896, 0)]
    assert choose(views, 1000, RATES) == 0


def test_ties_go_to_fewer_running_then_order() -> None:
    views = [EngineView("a", 0.0, 0, 0, running=3), EngineView("b", 0.0, 0, 0, running=1),
             EngineView("c", 0.0, 0, 0, running=1)]
    assert choose(views, 100, RATES) == 1
    with pytest.raises(ValueError):
        choose([], 100, RATES)
