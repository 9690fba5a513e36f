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


async def test_router_reads_engine_caches_and_its_own_dispatches() -> None:
    from benchmarks.oracle import OracleRouter
    from pixiu_kv.sim.engine import SimEngine
    from pixiu_kv.sim.engine_config import EngineConfig
    from pixiu_kv.sim.tokenizer import tokenize_prompt

    engines = [SimEngine(EngineConfig(instance_id=f"engine-{i}", speed=1000.0, gpu_kv_tokens=8192,
                                      max_model_len=4096, cpu_tier_tokens=0)) for i in range(2)]
    router = OracleRouter(engines)
    shared = tokenize_prompt(" ".join(f"w{i}" for i in range(600)))
    # engine-1 has served the prompt: its GPU prefix cache holds it.
    await engines[1].scheduler.generate(shared, 1)
    first = router.pick(shared)
    assert first.index == 1
    views = router.views(shared)
    assert views[1].gpu_hit_tokens > 500 and views[0].gpu_hit_tokens == 0
    # Not yet admitted by engine-1: its predicted prefill counts in engine-1's backlog.
    assert views[1].backlog_s > 0 and views[0].backlog_s == 0

    other = tokenize_prompt(" ".join(f"x{i}" for i in range(600)))
    second = router.pick(other)
    assert second.index == 0  # nothing cached anywhere: the idle engine
    # While it is in flight, engine-0 counts as holding ``other``'s blocks.
    assert router.views(other)[0].gpu_hit_tokens > 500

    # Requests that end without the engine ever planning them (refused) leave no backlog.
    router.done(first)
    router.done(second)
    after = router.views(other)
    assert after[0].backlog_s == 0 and after[1].backlog_s == 0
    assert after[0].gpu_hit_tokens == 0
    assert set(router.stats()) == {"engine-0", "engine-1"}
