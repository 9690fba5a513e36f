"""The configuration of one simulated engine, as a frozen value."""

from __future__ import annotations

from typing import Any

import attrs

from .faults import FaultConfig
from .lmcache_link import CHUNK_SIZE

__all__ = ["EngineConfig"]


def _positive(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attr.name} must be > 0, got {value!r}")


def _non_negative(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attr.name} must be >= 0, got {value!r}")


@attrs.frozen
class EngineConfig:
    """A simulated vLLM engine. Defaults resemble an 8B model on one modern GPU.

    Every duration of the cost model is divided by ``speed`` (``speed=100`` runs 100x
    faster); fault delays are not.
    """

    model: str = "sim-llama-8b"
    instance_id: str = "engine-0"
    engine_index: int = attrs.field(default=0, validator=_non_negative)
    speed: float = attrs.field(default=1.0, validator=_positive)
    max_num_seqs: int = attrs.field(default=256, validator=_positive)
    max_waiting: int = attrs.field(default=1024, validator=_non_negative)
    """Requests queued beyond ``max_num_seqs``; more than that are answered 503."""
    max_concurrent_requests: int = attrs.field(default=4096, validator=_positive)
    """HTTP requests handled at once (all routes); beyond it 503."""
    max_body_bytes: int = attrs.field(default=8 * 1024 * 1024, validator=_positive)
    block_size: int = attrs.field(default=16, validator=_positive)
    gpu_kv_tokens: int = attrs.field(default=131072, validator=_positive)
    cpu_tier_tokens: int = attrs.field(default=524288, validator=_non_negative)
    """LMCache CPU tier capacity; 0 runs without LMCache."""
    chunk_size: int = attrs.field(default=CHUNK_SIZE, validator=_positive)
    compression_ratio: float = attrs.field(default=2.0, validator=_positive)
    prefill_tokens_per_s: float = attrs.field(default=10_000.0, validator=_positive)
    gpu_hit_seconds_per_token: float = attrs.field(default=2e-6, validator=_non_negative)
    load_tokens_per_s: float = attrs.field(default=50_000.0, validator=_positive)
    """CPU-tier (LMCache) hits are loaded at this rate."""
    decompress_tokens_per_s: float = attrs.field(default=100_000.0, validator=_positive)
    """Extra cost for compressed CPU-tier chunks, on top of loading."""
    decode_interval_s: float = attrs.field(default=0.015, validator=_positive)
    decode_batch_slope: float = attrs.field(default=0.002, validator=_non_negative)
    """Each running sequence lengthens the decode step by this fraction."""
    max_num_batched_tokens: int = attrs.field(default=2048, validator=_non_negative)
    """vLLM's per-step token budget with chunked prefill: prefill and decode share the GPU.
    While the batch decodes, a prefill advances this many tokens' worth of work per decode
    step, and each such step takes that much longer (lockstep decode only). 0 gives prefill a
    lane of its own that never slows decode (as if the engine had spare compute beside its
    decode batch)."""
    lockstep_decode: bool = True
    """Streams advance together, one token per batch step, as in vLLM (token writes come in
    bursts). False gives every stream its own decode timer (writes spread out in time)."""
    stream_interval: int = attrs.field(default=1, validator=_positive)
    """Like vLLM's ``--stream-interval``: a stream carries new tokens every this many steps."""
    max_model_len: int = attrs.field(default=32768, validator=_positive)
    default_max_tokens: int = attrs.field(default=16, validator=_positive)
    seed: int = 0
    faults: FaultConfig = attrs.field(factory=FaultConfig)

    def __attrs_post_init__(self) -> None:
        if self.max_model_len > self.gpu_kv_tokens:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) must fit in gpu_kv_tokens ({self.gpu_kv_tokens})"
            )
        if self.chunk_size % self.block_size:
            raise ValueError("chunk_size must be a multiple of block_size")
