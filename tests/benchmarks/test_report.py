"""summary.md: tables, ratios to round-robin, goal verdicts; gateway configs parse."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.report import evaluate_goals, render_summary
from benchmarks.targets import GATEWAY_TARGETS, gateway_config, routing_settings


def _run(workload: str, target: str, **metrics: Any) -> dict[str, Any]:
    base = {"hit_ratio": 0.1, "ttft_p50_s": 1.0, "ttft_p90_s": 2.0, "ttft_p99_s": 3.0, "e2e_p50_s": 2.0,
            "itl_p50_s": 0.02, "throughput_rps": 10.0, "output_tps": 100.0, "load_cv": 0.01, "errors": 0,
            "routed": 0, "fallback": 0, "gateway_cpu_ms_per_req": 1.0, "gateway_peak_rss_mb": 40.0}
    base.update(metrics)
    return {"workload": workload, "target": target, "metrics": base}


def test_summary_has_one_ratio_line_per_target_against_round_robin() -> None:
    records = [
        _run("shared-prefix", "round-robin"),
        _run("shared-prefix", "pixiu-kv", hit_ratio=0.5, ttft_p90_s=0.5, throughput_rps=20.0),
        _run("shared-prefix", "oracle", hit_ratio=0.52),
        {"workload": "shared-prefix", "target": "sglang", "unavailable": "smg is not installed"},
    ]
    text = render_summary(records, command="python -m benchmarks --quick", settings={"engines": 4})
    assert "| pixiu-kv |" in text and "| round-robin |" in text
    assert "**pixiu-kv**: hit ratio 5.00x" in text
    assert "TTFT p90 0.25x" in text and "throughput 2.00x" in text
    assert "sglang: unavailable: smg is not installed" in text
    assert "python -m benchmarks --quick" in text
    assert "--mode closed" not in text  # the open-loop note appears only for open-loop runs
    assert "--mode closed" in render_summary(records, command="c", settings={"mode": "open"})


def test_goal_verdicts() -> None:
    records = [
        _run("shared-prefix", "round-robin", throughput_rps=10.0),
        _run("shared-prefix", "pixiu-kv", hit_ratio=0.50, throughput_rps=19.5, ttft_p90_s=1.0),
        _run("shared-prefix", "oracle", hit_ratio=0.52),
        _run("shared-prefix", "sglang", ttft_p90_s=1.1),
        _run("hot-prompt", "pixiu-kv", load_cv=0.1, hit_ratio=0.85),
        _run("hot-prompt", "oracle", hit_ratio=0.9),
    ]
    verdicts = {goal: status for goal, status, _ in evaluate_goals(records)}
    assert verdicts["shared-prefix: pixiu-kv hit ratio within 5% of oracle"] == "met"
    assert verdicts["shared-prefix: pixiu-kv throughput >= 1.9x round-robin"] == "met"
    assert verdicts["shared-prefix: pixiu-kv TTFT p90 <= 0.8x sglang cache_aware"] == "missed"
    assert verdicts["multi-turn: pixiu-kv hit ratio within 5% of oracle"] == "not measured"
    assert verdicts["hot-prompt: pixiu-kv load CV <= 0.15 with hit ratio >= 90% of oracle"] == "met"


@pytest.mark.parametrize("target", GATEWAY_TARGETS)
def test_gateway_configs_are_valid_gateway_configurations(target: str) -> None:
    from pixiu_kv.config import parse_config

    engines = [("engine-0", "http://127.0.0.1:9001"), ("engine-1", "http://127.0.0.1:9002")]
    routing = routing_settings("m", {"speed": 0.5, "gpu_kv_tokens": 4096, "cpu_tier_tokens": 4096})
    config = parse_config(gateway_config(target, engines, "http://127.0.0.1:9100", model="m",
                                         routing=routing))
    assert [e.id for e in config.clusters[0].endpoints] == ["engine-0", "engine-1"]
    kv = config.kvcache
    if target in ("seed", "pixiu-kv"):
        assert kv is not None and kv.enabled and kv.token_cache.enabled
        routing_config = getattr(kv, "routing", None)
        if routing_config is not None:  # the routing table exists in this configuration
            assert routing_config.enabled == (target == "pixiu-kv")
            if target == "pixiu-kv":
                assert routing_config.engine_cache_tokens == 4096
                assert routing_config.prefill_tokens_per_second == 5000.0
                assert routing_config.overload_queue_time == 10.0  # 5 s at half speed
                assert [t.path for t in routing_config.tokenizers] == ["builtin:sim"]
    else:
        assert kv is None or not kv.enabled
