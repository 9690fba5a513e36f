"""Routing: which endpoint serves a request, from cache knowledge and load in one cost.

Pure and synchronous: the kvcache filter and the LLM proxy own all I/O and call
:class:`Router` (``decide`` on the request path, ``on_first_byte`` / ``on_complete`` /
``on_failure`` as the response goes). See ``docs/routing.md``.
"""

from ._blocks import NATIVE_KEYS, BlockSchedule, PrefixKeys
from ._cost import PredictionLag, PrefillLearner, PrefillQueue
from ._hot import HotPlacement, HotPrefixes
from ._prefix_index import PrefixIndex
from ._request import ROUTING_INPUT_KEY, RoutingInput, session_key_of
from ._router import LearnedCost, Router, RouterStats
from ._session import SessionRing, stable_hash
from ._types import CostLine, Decision, EndpointView, Reason
from .config import RoutingConfig, TokenizerSpec, read_routing_config
from .usage import Usage, UsageScanner

__all__ = [
    "NATIVE_KEYS",
    "ROUTING_INPUT_KEY",
    "BlockSchedule",
    "CostLine",
    "Decision",
    "EndpointView",
    "HotPlacement",
    "HotPrefixes",
    "LearnedCost",
    "PredictionLag",
    "PrefillLearner",
    "PrefillQueue",
    "PrefixIndex",
    "PrefixKeys",
    "Reason",
    "Router",
    "RouterStats",
    "RoutingConfig",
    "RoutingInput",
    "SessionRing",
    "TokenizerSpec",
    "Usage",
    "UsageScanner",
    "read_routing_config",
    "session_key_of",
    "stable_hash",
]
