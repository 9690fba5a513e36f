"""How long a simulated engine takes: prefill by cache source, decode by batch size."""

from __future__ import annotations

import math

import attrs

from .engine_config import EngineConfig

__all__ = ["CostModel", "PrefillPlan"]


@attrs.frozen
class PrefillPlan:
    """Where a prompt's tokens come from, and what prefilling it costs (scaled seconds).

    ``gpu_hit_tokens`` and ``cpu_hit_tokens`` do not overlap: the CPU tier serves only
    the part of the prompt beyond the GPU prefix hit.
    """

    prompt_tokens: int
    gpu_hit_tokens: int
    cpu_hit_tokens: int
    cpu_compressed_tokens: int
    seconds: float

    @property
    def cached_tokens(self) -> int:
        return self.gpu_hit_tokens + self.cpu_hit_tokens

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


class CostModel:
    __slots__ = ("_chunk_seconds", "_config", "_scale")

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._scale = 1.0 / config.speed
        self._chunk_seconds = config.max_num_batched_tokens / config.prefill_tokens_per_s * self._scale

    @property
    def chunk_seconds(self) -> float:
        """Prefill work one decode step carries (0: prefill never shares a step)."""
        return self._chunk_seconds

    def plan_prefill(
        self, prompt_tokens: int, gpu_hit_tokens: int, cpu_hit_tokens: int, cpu_compressed_tokens: int
    ) -> PrefillPlan:
        c = self._config
        computed = prompt_tokens - gpu_hit_tokens - cpu_hit_tokens
        seconds = (
            computed / c.prefill_tokens_per_s
            + gpu_hit_tokens * c.gpu_hit_seconds_per_token
            + cpu_hit_tokens / c.load_tokens_per_s
            + cpu_compressed_tokens / c.decompress_tokens_per_s
        )
        return PrefillPlan(prompt_tokens, gpu_hit_tokens, cpu_hit_tokens, cpu_compressed_tokens,
                           seconds * self._scale)

    def interleaved_decode(self, prefill_seconds: float, running: int) -> float:
        """What a prefill of ``prefill_seconds`` of work waits for decode while a batch
        decodes: one decode step per chunk (vLLM schedules the running decodes first and
        fills the rest of the step's token budget with prefill)."""
        if self._chunk_seconds <= 0.0 or prefill_seconds <= 0.0:
            return 0.0
        chunks = math.ceil(prefill_seconds / self._chunk_seconds - 1e-9)
        return chunks * self.decode_interval(running)

    def decode_interval(self, running: int) -> float:
        c = self._config
        return c.decode_interval_s * (1.0 + c.decode_batch_slope * running) * self._scale
