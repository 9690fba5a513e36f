"""CPU cost of the kvcache filter per request: ``python -m benchmarks.kvcache_overhead``.

Two cases, each over ``--requests`` sequential requests of one cached prompt
(``--prompt-tokens`` tokens), measured as process CPU time per request (the upstream
runs in a separate process, so its CPU does not count):

* ``lmcache_up``: the routing lookup goes to a controller answering in ~1 ms
  (``--lookup-delay``); the filter extracts, records hotness, looks up, sets the hint
  and runs background management (a decision, no action).
* ``lmcache_down``: the controller's port is closed; after the first failures both
  breakers are open, so a request costs extraction, hotness and two breaker checks.

References measured the same way, to read the numbers on a noisy shared machine:

* ``baseline``: a body without prompt (the harness's per-request nursery, nothing else);
* ``trio_sleep_1ms``: one trio sleep/wake-up, the floor of any call that waits on I/O;
* ``bare_lookup``: the routing client's POST /lookup alone (no filter logic);
* ``httpx_lookup``: the same POST through httpx, for comparison.

Each figure is the median of ``--rounds`` rounds. Goals: <= 0.3 ms (up) and <= 0.05 ms
(down) of CPU per request.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

GOALS_MS = {"lmcache_up": 0.3, "lmcache_down": 0.05}


# -- the upstream, in its own process ---------------------------------------------------------

def _fake_upstream(delay: float, prompt_tokens: int) -> Any:
    from pixiu_kv._asgi import serve_lifespan

    tokens = list(range(1000, 1000 + prompt_tokens))
    tokenize_reply = json.dumps({"count": len(tokens), "tokens": tokens, "max_model_len": 32768}).encode()
    lookup_reply = json.dumps({"event_id": "e", "layout_info": {
        "engine-0": ["LocalCPUBackend", prompt_tokens // 256 * 256]}}).encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        if scope["path"] == "/lookup":
            await trio.sleep(delay)
            reply = lookup_reply
        else:
            reply = tokenize_reply
        # Like the real controller (FastAPI): a JSON reply with its length.
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"%d" % len(reply))]})
        await send({"type": "http.response.body", "body": reply})

    return app


async def _serve_upstream(delay: float, prompt_tokens: int) -> None:
    import hypercorn.config
    import hypercorn.trio

    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        app = _fake_upstream(delay, prompt_tokens)
        binds = await nursery.start(partial(hypercorn.trio.serve, app, config))
        print(binds[0], flush=True)
        # Run until the benchmark closes our stdin.
        await trio.to_thread.run_sync(sys.stdin.read)
        nursery.cancel_scope.cancel()


# -- measurement ---------------------------------------------------------------------------

async def _cpu_per_request(route: Callable[[trio.Nursery], Any], requests: int, rounds: int) -> float:
    """Median over rounds of process CPU seconds per ``await route(nursery)``, background included."""
    for _ in range(min(200, requests)):  # warm-up: connections, caches, breakers
        async with trio.open_nursery() as nursery:
            await route(nursery)
    per_round = max(1, requests // rounds)
    samples = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(per_round):
            async with trio.open_nursery() as nursery:
                await route(nursery)
        samples.append((time.process_time() - start) / per_round)
    return statistics.median(samples)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(requests: int, prompt_tokens: int, lookup_delay: float, rounds: int) -> dict[str, Any]:
    import httpx

    from pixiu_kv.config import KvCacheConfig, TokenCacheConfig
    from pixiu_kv.filters.kvcache import open_kvcache
    from pixiu_kv.upstream import Http11Pool

    measure = partial(_cpu_per_request, requests=requests, rounds=rounds)

    upstream = subprocess.Popen(  # noqa: ASYNC220 - started once, before any measurement
        [sys.executable, "-m", "benchmarks.kvcache_overhead", "--serve-upstream",
         "--lookup-delay", str(lookup_delay), "--prompt-tokens", str(prompt_tokens)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert upstream.stdout is not None
        url = upstream.stdout.readline().strip()
        body = {"model": "m", "prompt": "a cached prompt " * 10}
        base = partial(KvCacheConfig, enabled=True, token_cache=TokenCacheConfig(enabled=True),
                       lookup_routing_timeout=0.05, request_timeout=2.0)
        results: dict[str, Any] = {}
        async with open_kvcache(base(vllm_endpoint=url, lmcache_endpoint=url)) as kv:
            async with trio.open_nursery() as nursery:  # first sight: tokenize into the cache
                await kv.route(body, nursery)
            results["baseline"] = await measure(lambda n: kv.route({"model": "m"}, n))
            results["lmcache_up"] = await measure(lambda n: kv.route(body, n))
            up_stats = kv.stats
            assert up_stats.lookups["routed"] >= requests, up_stats.lookups
        down = f"http://127.0.0.1:{_closed_port()}"
        async with open_kvcache(base(vllm_endpoint=url, lmcache_endpoint=down)) as kv:
            async with trio.open_nursery() as nursery:
                await kv.route(body, nursery)
            results["lmcache_down"] = await measure(lambda n: kv.route(body, n))
            down_stats = kv.stats
            assert down_stats.breakers["lookup_routing"] == "open", down_stats.breakers
            assert down_stats.lookups["breaker_open"] >= requests, down_stats.lookups
        lookup_body = b'{"tokens":[' + b",".join(b"%d" % i for i in range(prompt_tokens)) + b"]}"
        async def sleep_1ms(_: trio.Nursery) -> None:
            await trio.sleep(0.001)

        results["trio_sleep_1ms"] = await measure(sleep_1ms)
        pool = Http11Pool(url, max_connections=4, connect_timeout=2.0, write_timeout=2.0)
        results["bare_lookup"] = await measure(lambda _: pool.post_json("/lookup", lookup_body))
        pool.close()
        async with httpx.AsyncClient(base_url=url) as client:
            results["httpx_lookup"] = await measure(lambda _: client.post("/lookup", content=lookup_body))
    finally:
        if upstream.stdin is not None:
            upstream.stdin.close()
        upstream.wait(timeout=10)
    report: dict[str, Any] = {
        "requests": requests, "rounds": rounds, "prompt_tokens": prompt_tokens,
        "lookup_delay_ms": lookup_delay * 1000,
        "cpu_ms_per_request": {k: round(v * 1000, 4) for k, v in results.items()},
    }
    cpu = report["cpu_ms_per_request"]
    # The filter's own work on top of the lookup round trip it cannot avoid.
    report["lmcache_up_minus_bare_lookup_ms"] = round(cpu["lmcache_up"] - cpu["bare_lookup"], 4)
    report["httpx_over_bare_lookup"] = round(cpu["httpx_lookup"] / cpu["bare_lookup"], 2)
    report["goals_ms"] = GOALS_MS
    report["within_goal"] = {k: report["cpu_ms_per_request"][k] <= goal for k, goal in GOALS_MS.items()}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--lookup-delay", type=float, default=0.001)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        trio.run(_serve_upstream, args.lookup_delay, args.prompt_tokens)
        return 0
    report = trio.run(run, args.requests, args.prompt_tokens, args.lookup_delay, args.rounds)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
