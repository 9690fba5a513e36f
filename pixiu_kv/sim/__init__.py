"""Simulated vLLM engines with LMCache, and an LMCache controller emulator.

Never imported by the request path.
"""

from .cpu_tier import CpuTier, NullChunkSink, TierMatch
from .engine import SimEngine
from .engine_config import EngineConfig
from .faults import FaultConfig
from .fleet import ChunkSinkFactory, Fleet, FleetEngine, open_fleet, serve_engine
from .prefix_cache import PrefixCache, block_hashes
from .scheduler import EngineOverloaded, Generation, Scheduler
from .tokenizer import detokenize, render_chat, tokenize, tokenize_chat, tokenize_prompt

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
