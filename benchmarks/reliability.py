"""Reliability figures: added latency during an LMCache outage, and concurrent SSE streams
one gateway process sustains without errors.

    python -m benchmarks.reliability outage [--samples N] [--budget-ms 50]
    python -m benchmarks.reliability streams [--streams 1000,2000] [--token-delay 4]
    python -m benchmarks.reliability all --json docs/benchmarks/reliability.json

**outage**: a gateway with the kvcache filter in front of a simulated fleet and the LMCache
controller emulator, all in one process. A prompt is taught first (tokens cached, so every
request makes a routing lookup). Three phases of sequential requests: controller healthy;
controller hanging (every lookup waits out ``lookup_routing_timeout``) until the lookup
breaker opens; then with the breaker open. For each phase: the time the request spends in
the kvcache filter (the latency the cache side adds, measured around the filter in the
gateway) and the time to first byte seen by the client. The breaker's failure threshold is
raised so the "until it opens" phase has enough samples for a p99.

**streams**: the fleet (``python -m pixiu_kv.sim``) and a load generator run in processes of
their own; the gateway runs here. For each target N, N streamed requests are opened at once
(one connection each) and held open by a per-token delay; the run counts streams that did
not end with ``[DONE]`` and any non-200 answer, and records the peak number of streams the
gateway had in flight at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from subprocess import PIPE
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx
import psutil
import trio

from pixiu_kv.app import open_gateway
from pixiu_kv.config import GatewayConfig, loads_config
from pixiu_kv.context import RequestContext
from pixiu_kv.sim.controller import Faults
from pixiu_kv.sim.engine_config import EngineConfig
from pixiu_kv.sim.fleet import open_fleet

from ._process import process_starter, read_line, sim_fleet_process
from .metrics import percentile

MODEL = "sim-llama-8b"
PROMPT = "the quick brown fox jumps over the lazy dog " * 70


def _config(engines: Sequence[tuple[str, str]], tokenizer_url: str, lmcache_url: str, *,
            budget_ms: float, failure_threshold: int, first_byte_timeout: str = "60s",
            health_timeout: str = "1s", background_jobs: int = 64) -> GatewayConfig:
    eps = "\n".join(f'[[clusters.endpoints]]\nid = "{i}"\naddress = "{u}"\nmax_in_flight = 8192\n'
                    for i, u in engines)
    return loads_config(f"""
[listener]
max_concurrent_requests = 16384

[[clusters]]
name = "fleet"
[clusters.health_check]
interval = "1s"
timeout = "{health_timeout}"
unhealthy_threshold = 5
{eps}

[[http_filters]]
name = "kvcache"
[http_filters.config]
enabled = true
vllm_endpoint = "{tokenizer_url}"
lmcache_endpoint = "{lmcache_url}"
default_model = "{MODEL}"
lookup_routing_timeout = "{budget_ms}ms"
request_timeout = "500ms"
max_background_jobs = {background_jobs}
[http_filters.config.token_cache]
enabled = true
[http_filters.config.retry]
max_attempts = 1
[http_filters.config.circuit_breaker]
failure_threshold = {failure_threshold}
recovery_timeout = "10m"

[[http_filters]]
name = "llm_proxy"
[http_filters.config]
max_connections_per_endpoint = 8192
first_byte_timeout = "{first_byte_timeout}"
idle_timeout = "60s"
""")


@attrs.define
class _TimedFilter:
    """Wraps the kvcache decode filter and records how long each request spends in it."""

    inner: Any
    samples: list[float] = attrs.field(factory=list)

    async def decode(self, ctx: RequestContext) -> None:
        started = time.perf_counter()
        try:
            await self.inner.decode(ctx)
        finally:
            self.samples.append(time.perf_counter() - started)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@attrs.define
class _TimedRouter:
    """Wraps the kvcache filter's routing lookup (the only step an LMCache outage slows)."""

    inner: Any
    samples: list[float] = attrs.field(factory=list)

    async def route(self, prompt: Any) -> Any:
        started = time.perf_counter()
        try:
            return await self.inner.route(prompt)
        finally:
            self.samples.append(time.perf_counter() - started)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _summary(values: Sequence[float]) -> dict[str, float | int | None]:
    ms = [v * 1e3 for v in values]
    return {"n": len(ms), "p50_ms": _r(percentile(ms, 50)), "p99_ms": _r(percentile(ms, 99)),
            "max_ms": _r(max(ms) if ms else None)}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


async def _ttfb(client: httpx.AsyncClient, url: str) -> tuple[float, str]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2,
            "stream": True}
    started = time.perf_counter()
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        first: float | None = None
        async for _ in response.aiter_raw():
            if first is None:
                first = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"request failed with {response.status_code}")
    reason = response.headers.get("x-pixiu-kv-route", "")
    return (first if first is not None else time.perf_counter() - started), reason


async def outage(samples: int, budget_ms: float) -> dict[str, Any]:
    engine = EngineConfig(speed=100.0)
    async with open_fleet(3, engine) as fleet:
        assert fleet.controller_url is not None
        controller = fleet.controller
        config = _config([(e.instance_id, e.url) for e in fleet.engines[:2]], fleet.engines[2].url,
                         fleet.controller_url, budget_ms=budget_ms, failure_threshold=samples,
                         # The raised threshold keeps the background breaker closed too, so
                         # every request's background lookup would also hang on the controller
                         # in this same process; few background jobs keep that artefact small.
                         background_jobs=2)
        async with open_gateway(config) as gateway, httpx.AsyncClient(timeout=30.0) as client:
            runtime = gateway.app.runtime
            assert runtime is not None
            timed = _TimedFilter(runtime.decode_filters[0])
            runtime.decode_filters[0] = timed
            # Benchmark-only instrumentation of a private step: the routing lookup itself.
            router = _TimedRouter(timed.inner.kv._router)
            timed.inner.kv._router = router
            # Teach the prompt: its tokens are cached after the first request's background work.
            for _ in range(5):
                await _ttfb(client, gateway.url)
                await trio.sleep(0.2)
            phases: dict[str, Any] = {}
            reasons: dict[str, dict[str, int]] = {}

            async def phase(name: str, count: int) -> None:
                timed.samples.clear()
                router.samples.clear()
                ttfbs: list[float] = []
                seen: dict[str, int] = {}
                for _ in range(count):
                    ttfb, route = await _ttfb(client, gateway.url)
                    ttfbs.append(ttfb)
                    reason = route.split(";", 1)[0].removeprefix("reason=")
                    seen[reason] = seen.get(reason, 0) + 1
                phases[name] = {"routing_lookup": _summary(router.samples),
                                "in_filter": _summary(timed.samples), "ttfb": _summary(ttfbs)}
                reasons[name] = seen

            await phase("healthy", samples)
            controller.faults = Faults(hang=True, hang_limit=600.0)
            # With the threshold at ``samples``, exactly that many lookups fail before it opens.
            await phase("outage_breaker_closed", samples)
            await phase("outage_breaker_open", samples)
            controller.faults = Faults()
    healthy = phases["healthy"]
    closed, opened = phases["outage_breaker_closed"], phases["outage_breaker_open"]
    return {
        "budget_ms": budget_ms,
        "phases": phases,
        "route_reasons": reasons,
        "goals": {
            "added_p99_until_breaker_opens_ms": closed["routing_lookup"]["p99_ms"],
            "limit_until_breaker_opens_ms": budget_ms + 1.0,
            "added_p99_breaker_open_ms": opened["routing_lookup"]["p99_ms"],
            "limit_breaker_open_ms": 0.1,
            "ttfb_p99_delta_breaker_open_ms": _r(opened["ttfb"]["p99_ms"] - healthy["ttfb"]["p99_ms"]),
        },
    }


# -- concurrent streams --------------------------------------------------------------------

async def streams(targets: Sequence[int], token_delay: float, tokens: int) -> dict[str, Any]:
    results = []
    async with (sim_fleet_process(3, max_num_seqs=8192, startup_timeout=60) as described,
                httpx.AsyncClient(timeout=10.0) as control):
        engines = [(e["instance_id"], e["url"]) for e in described["engines"]]
        for _, url in engines:
            (await control.post(url + "/sim/faults", json={"slow_stream_s": token_delay})).raise_for_status()
        config = _config(engines[:2], engines[2][1], described["controller_url"], budget_ms=50,
                         failure_threshold=5, health_timeout="10s")
        for target in targets:
            async with open_gateway(config) as gateway:
                runtime = gateway.app.runtime
                assert runtime is not None
                cluster = runtime.clusters["fleet"]
                process = psutil.Process()
                cpu_before = process.cpu_times()
                peak = 0
                started = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    loader: trio.Process = await nursery.start(process_starter(
                        [sys.executable, "-m", "benchmarks.reliability", "_load", gateway.url, str(target),
                         str(tokens)], stdout=PIPE))
                    assert loader.stdout is not None
                    buffer = bytearray()
                    done = trio.Event()

                    async def watch(done: trio.Event, cluster: Any) -> None:
                        nonlocal peak
                        while not done.is_set():
                            peak = max(peak, sum(e.in_flight for e in cluster.endpoints))
                            await trio.sleep(0.005)

                    nursery.start_soon(watch, done, cluster)
                    summary = json.loads(await read_line(loader.stdout, buffer))
                    done.set()
                elapsed = time.perf_counter() - started
                cpu = process.cpu_times()
                cpu_used = cpu.user + cpu.system - cpu_before.user - cpu_before.system
                results.append({
                    "streams": target, "peak_in_flight": peak, "wall_s": round(elapsed, 2),
                    "gateway_process_cpu_s": round(cpu_used, 2),
                    "rss_mb": round(process.memory_info().rss / 2**20, 1),
                    **summary,
                })
    return {"token_delay_s": token_delay, "tokens": tokens, "runs": results}


async def _load(url: str, count: int, tokens: int) -> None:
    """The load generator process: ``count`` streams at once, one connection each."""
    parts = urlsplit(url)
    out = {"completed": 0, "non_200": 0, "incomplete": 0, "transport_errors": 0}

    async def one(index: int) -> None:
        body = json.dumps({"model": MODEL, "max_tokens": tokens, "stream": True, "messages": [
            {"role": "user", "content": f"[{index % 50}] {PROMPT}"}]}).encode()
        received = bytearray()
        try:
            conn = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
            async with conn:
                await conn.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n"
                                    b"content-type: application/json\r\ncontent-length: "
                                    + str(len(body)).encode() + b"\r\n\r\n" + body)
                while chunk := await conn.receive_some(65536):
                    received += chunk
        except OSError:
            out["transport_errors"] += 1
            return
        if not received.startswith(b"HTTP/1.1 200"):
            out["non_200"] += 1
        elif b"data: [DONE]" in received and b'"error"' not in received:
            out["completed"] += 1
        else:
            out["incomplete"] += 1

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
    print(json.dumps(out), flush=True)


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["_load"]:
        trio.run(_load, args_in[1], int(args_in[2]), int(args_in[3]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("outage", "streams", "all"))
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--budget-ms", type=float, default=50.0)
    parser.add_argument("--streams", default="1000,2000")
    parser.add_argument("--token-delay", type=float, default=4.0)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(args_in)
    out: dict[str, Any] = {}
    if args.what in ("outage", "all"):
        out["outage"] = trio.run(outage, args.samples, args.budget_ms)
    if args.what in ("streams", "all"):
        targets = [int(x) for x in args.streams.split(",") if x]
        out["streams"] = trio.run(streams, targets, args.token_delay, args.tokens)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
