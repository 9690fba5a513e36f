"""Simulated vLLM engines with LMCache, and an LMCache controller emulator.

Never imported by the request path. Names are loaded on first use, so importing one
submodule (say :mod:`pixiu_kv.sim.tokenizer`) does not pull in the servers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cpu_tier import CpuTier, NullChunkSink, TierMatch
    from .engine import SimEngine
    from .engine_config import EngineConfig
    from .faults import FaultConfig
    from .fleet import ChunkSinkFactory, Fleet, FleetEngine, open_fleet, serve_engine
    from .prefix_cache import PrefixCache, block_hashes
    from .scheduler import EngineOverloaded, Generation, Scheduler
    from .tokenizer import detokenize, render_chat, tokenize, tokenize_chat, tokenize_prompt

_HOMES = {
    "CpuTier": "cpu_tier", "NullChunkSink": "cpu_tier", "TierMatch": "cpu_tier",
    "SimEngine": "engine",
    "EngineConfig": "engine_config",
    "FaultConfig": "faults",
    "ChunkSinkFactory": "fleet", "Fleet": "fleet", "FleetEngine": "fleet", "open_fleet": "fleet",
    "serve_engine": "fleet",
    "PrefixCache": "prefix_cache", "block_hashes": "prefix_cache",
    "EngineOverloaded": "scheduler", "Generation": "scheduler", "Scheduler": "scheduler",
    "detokenize": "tokenizer", "render_chat": "tokenizer", "tokenize": "tokenizer",
    "tokenize_chat": "tokenizer", "tokenize_prompt": "tokenizer",
}

__all__ = [
    "ChunkSinkFactory",
    "CpuTier",
    "EngineConfig",
    "EngineOverloaded",
    "FaultConfig",
    "Fleet",
    "FleetEngine",
    "Generation",
    "NullChunkSink",
    "PrefixCache",
    "Scheduler",
    "SimEngine",
    "TierMatch",
    "block_hashes",
    "detokenize",
    "open_fleet",
    "render_chat",
    "serve_engine",
    "tokenize",
    "tokenize_chat",
    "tokenize_prompt",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
