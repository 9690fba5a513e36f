"""Embed pixiu-kv's KV-cache routing in any trio program (no gateway).

    python examples/embed_trio.py --vllm http://127.0.0.1:8000 --lmcache http://127.0.0.1:9000 \\
        --prompt "You are a helpful assistant. Summarise ..." --repeat 3

For every request the program asks the KV-cache core which engine holds the prompt's
prefix, then would forward the request there (printed here as one JSON line per request).
Cache management (tokenize, lookup, pin/compress/evict) runs in the request's own nursery:
leaving the nursery waits for it, cancelling the nursery abandons it at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import trio

from pixiu_kv.config import CacheStrategyConfig, KvCacheConfig, TokenCacheConfig
from pixiu_kv.filters.kvcache import KvCache, open_kvcache


async def handle_request(kv: KvCache, body: dict[str, Any]) -> dict[str, Any]:
    """One request of your application: route, then (here) just report the decision."""
    async with trio.open_nursery() as request_nursery:
        hint = await kv.route(body, request_nursery)
        # A real application forwards ``body`` to the engine named ``hint.endpoint_id``
        # (None: any engine) while cache management runs alongside.
        decision = {"endpoint": hint.endpoint_id, "reason": hint.reason,
                    "matched_tokens": hint.matched_tokens, "prompt_tokens": hint.prompt_tokens}
    return decision


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm", required=True, help="base URL of a vLLM server (for /tokenize)")
    parser.add_argument("--lmcache", required=True, help="base URL of the LMCache controller")
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--pin-after", type=int, default=0,
                        help="pin a prompt's cache once it was seen this many times (0: never)")
    parser.add_argument("--lookup-timeout", type=float, default=0.05,
                        help="seconds the routing lookup may take before the request goes on "
                             "without it (lookup_routing_timeout)")
    args = parser.parse_args(argv)

    config = KvCacheConfig(
        enabled=True,
        vllm_endpoint=args.vllm,
        lmcache_endpoint=args.lmcache,
        default_model=args.model,
        token_cache=TokenCacheConfig(enabled=True, max_size=1000, ttl=600.0),
        cache_strategy=CacheStrategyConfig(enable_pinning=args.pin_after > 0,
                                           hot_content_threshold=args.pin_after),
        hot_max_records=max(300, args.pin_after),
        lookup_routing_timeout=args.lookup_timeout,
    )
    async with open_kvcache(config) as kv:
        for _ in range(args.repeat):
            for prompt in args.prompt:
                decision = await handle_request(kv, {"prompt": prompt, "max_tokens": 16})
                print(json.dumps(decision), flush=True)
        stats = kv.stats
        print(json.dumps({"lookups": stats.lookups, "tokenize_calls": stats.tokenize_calls,
                          "pins": stats.actions["pin"]["ok"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(trio.run(main, sys.argv[1:]))
