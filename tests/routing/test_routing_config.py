"""The routing table of the kvcache filter's configuration."""

from __future__ import annotations

from typing import Any

import pytest

from pixiu_kv._config_parse import ConfigError, Table
from pixiu_kv.routing import Router, RoutingConfig, TokenizerSpec, read_routing_config


def _read(data: dict[str, Any]) -> RoutingConfig:
    return read_routing_config(Table(data, "http_filters[0].config.routing"))


def test_an_empty_table_gives_the_defaults() -> None:
    assert _read({}) == RoutingConfig()


def test_every_switch_and_value_is_read() -> None:
    cfg = _read({
        "enabled": True, "prefix_index": False, "max_index_entries": 1000, "block_size": 16,
        "max_block_size": 64,
        "engine_cache_tokens": 100_000, "cost_model": False, "prefill_tokens_per_second": 12000,
        "cached_tokens_per_second": 1e6, "base_latency": "15ms", "running_request_cost": "1ms",
        "learning_rate": 0.1, "overload_in_flight_ratio": 0.9, "overload_queue_time": "3s",
        "affinity_load_factor": 1.5, "new_prefix_spread": False,
        "hot_spread": False, "hot_threshold": 0.5, "hot_window": "1m", "hot_min_requests": 4,
        "hot_min_tokens": 512, "max_hot_prefixes": 8, "session_affinity": False,
        "session_header": "X-Conversation", "session_load_factor": 1.5, "max_pending": 100,
        "reservation_timeout": "5m", "tokenize_on_route": False,
        "tokenizers": [{"model": "m1", "path": "builtin:sim"}, {"model": "m2", "path": "/t.json"}],
    })
    assert cfg.enabled
    assert (cfg.prefix_index, cfg.cost_model, cfg.hot_spread, cfg.session_affinity,
            cfg.tokenize_on_route, cfg.new_prefix_spread) == (False,) * 6
    assert cfg.engine_cache_tokens == 100_000
    assert cfg.affinity_load_factor == 1.5
    assert (cfg.base_latency, cfg.overload_queue_time, cfg.hot_window) == (0.015, 3, 60)
    assert cfg.session_header == "x-conversation"
    assert cfg.tokenizers == (TokenizerSpec("m1", "builtin:sim"), TokenizerSpec("m2", "/t.json"))
    Router(cfg)  # every combination of switches builds


@pytest.mark.parametrize(("data", "path", "problem"), [
    ({"block_size": 12}, "block_size", "power of two"),
    ({"block_size": 64, "max_block_size": 32}, "max_block_size", "smaller than block_size"),
    ({"overload_in_flight_ratio": 1.5}, "overload_in_flight_ratio", "outside (0, 1]"),
    ({"prefill_tokens_per_second": 0}, "prefill_tokens_per_second", "greater than 0"),
    ({"session_load_factor": 0.9}, "session_load_factor", ""),
    ({"affinity_load_factor": 0.5}, "affinity_load_factor", "0 (off) or >= 1"),
    ({"affinity_load_factor": -1}, "affinity_load_factor", "at least 0"),
    ({"hot_window": "-1s"}, "hot_window", "negative"),
    ({"new_prefix_spread": "yes"}, "new_prefix_spread", "true or false"),
    ({"cost_modle": True}, "cost_modle", "unknown key"),
    ({"tokenizers": [{"model": "m", "path": "a"}, {"model": "m", "path": "b"}]}, "tokenizers", "twice"),
    ({"tokenizers": [{"model": "m"}]}, "tokenizers[0].path", "required"),
])
def test_bad_values_name_their_path(data: dict[str, Any], path: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        _read(data)
    assert err.value.path == f"http_filters[0].config.routing.{path}"
    assert problem in str(err.value)
