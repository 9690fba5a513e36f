"""The router forgets what an engine held once the gateway's health checks find it down."""

from __future__ import annotations

import attrs
import httpx
from kv_fakes import wait_until
from test_kv_gateway import LONG, complete, config_for
from test_kv_routing import ROUTING

from pixiu_kv.app import open_gateway
from pixiu_kv.config import HealthCheckConfig
from pixiu_kv.filters.kvcache import KvCacheFilter
from pixiu_kv.sim import tokenizer as sim_tokenizer
from pixiu_kv.sim.engine_config import EngineConfig
from pixiu_kv.sim.fleet import open_fleet


async def test_an_engine_failing_its_health_checks_is_forgotten_by_the_router() -> None:
    async with open_fleet(3, EngineConfig(speed=100.0)) as fleet:
        config = config_for(fleet, ROUTING)
        checks = HealthCheckConfig(enabled=True, interval=0.02, timeout=1.0, unhealthy_threshold=1)
        config = attrs.evolve(config, clusters=tuple(attrs.evolve(c, health_check=checks)
                                                     for c in config.clusters))
        async with open_gateway(config) as gw, \
                httpx.AsyncClient(base_url=gw.url, timeout=httpx.Timeout(30.0)) as http:
            runtime = gw.app.runtime
            assert runtime is not None
            kv_filter = runtime.decode_filters[0]
            assert isinstance(kv_filter, KvCacheFilter)
            router = kv_filter.kv.decider
            assert router is not None and router.index is not None
            index = router.index
            engine, _, _ = await complete(http, LONG)
            keys = router.prefix_keys(sim_tokenizer.tokenize_prompt(LONG))
            second, _, _ = await complete(http, "unrelated " + LONG)
            assert engine in index.match(keys)
            fleet.by_id(engine).engine.set_faults(dead=True)
            # No request is routed meanwhile: the health loop itself tells the router.
            await wait_until(lambda: engine not in index.match(keys))
            if second != engine:  # what the healthy engines hold is kept
                assert second in index.match(router.prefix_keys(
                    sim_tokenizer.tokenize_prompt("unrelated " + LONG)))
