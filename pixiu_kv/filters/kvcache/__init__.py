"""``dgp.filter.ai.kvcache``: KV-cache-aware routing hints and LMCache cache management.

Gateway use: ``async with open_kvcache_filter(config, nursery) as f`` then
``await f.decode(ctx)`` per request. Any trio program: ``async with open_kvcache(config)
as kv`` then ``hint = await kv.route(body, request_nursery)`` (see docs/embedding.md).
"""

from .core import DEFAULT_HTTP_POOL_SIZE, KvCache, open_kvcache
from .filter import BACKGROUND_GRACE, KvCacheFilter, PassThroughFilter, open_kvcache_filter
from .hotness import HotnessTracker
from .prompt import Prompt, extract_prompt, prompt_key
from .routing import ROUTED_REASON
from .stats import KvCacheStats
from .strategy import DEFAULT_LOCATION, Action, decide
from .tokens import TokenCache, TokenSeq

__all__ = [
    "BACKGROUND_GRACE",
    "DEFAULT_HTTP_POOL_SIZE",
    "DEFAULT_LOCATION",
    "ROUTED_REASON",
    "Action",
    "HotnessTracker",
    "KvCache",
    "KvCacheFilter",
    "KvCacheStats",
    "PassThroughFilter",
    "Prompt",
    "TokenCache",
    "TokenSeq",
    "decide",
    "extract_prompt",
    "open_kvcache",
    "open_kvcache_filter",
    "prompt_key",
]
