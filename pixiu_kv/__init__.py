"""pixiu-kv: a KV-cache-aware, OpenAI-compatible gateway for LLM inference, on trio.

The public API: build and serve the gateway (:func:`create_app`, :func:`serve`,
:func:`open_gateway`), load its configuration (:func:`load_config` and friends), and embed
the cache-aware filter in any trio program (:func:`open_kvcache`).
"""

from .app import create_app, open_gateway, serve
from .config import (
    ConfigError,
    GatewayConfig,
    KvCacheConfig,
    config_to_dict,
    load_config,
    loads_config,
    parse_config,
)
from .context import BackgroundScope, RequestContext, RouteHint
from .errors import GatewayError
from .filters.kvcache import KvCache, open_kvcache, open_kvcache_filter

__version__ = "0.1.0"

__all__ = [
    "BackgroundScope",
    "ConfigError",
    "GatewayConfig",
    "GatewayError",
    "KvCache",
    "KvCacheConfig",
    "RequestContext",
    "RouteHint",
    "__version__",
    "config_to_dict",
    "create_app",
    "load_config",
    "loads_config",
    "open_gateway",
    "open_kvcache",
    "open_kvcache_filter",
    "parse_config",
    "serve",
]
